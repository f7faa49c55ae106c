"""What onnxscript's optimizer (run by `torch.onnx.export(optimize=True)`, as the ONNX target does) buys a
reduced model in onnxruntime at batch 1.

Exports the same reduced graph (timm ViT-B/16, random init, ToMe r=13 by default; the plan in the exported
form the ONNX target writes) twice, with `optimize=False` and `optimize=True`, checks both against the eager
reduced graph, and times them in onnxruntime CPU sessions (`ORT_ENABLE_ALL`, the given threads) in
interleaved rounds (house style of `benchmarks/edge_onnx.py`, whose timing helper it uses). Prints node counts,
max abs diffs, medians and the ratio optimized / unoptimized.

Usage:
    python benchmarks/onnx_optimizer.py --r 13 --threads 1 --repeats 15
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

import tokenreduce
from tokenreduce.passes.inline_reference_ops import inline_reference_ops

sys.path.insert(0, str(Path(__file__).parent))
from edge_onnx import interleaved, session  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--r", type=int, default=13)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    x = torch.randn(1, 3, 224, 224)
    red = tokenreduce.compile(model, (x,), method="tome", r=args.r, inner="eager", dynamic_batch=False)
    gm = copy.deepcopy(red.graph_module).eval()
    inline_reference_ops(gm, exported_apply=True)
    with torch.no_grad():
        want = gm(x)
    want = (want[0] if isinstance(want, tuple | list) else want).numpy()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        calls, nodes, diffs = {}, {}, {}
        for optimize in (False, True):
            name = "optimized" if optimize else "unoptimized"
            path = Path(tmp) / f"{name}.onnx"
            with torch.no_grad():
                program = torch.onnx.export(gm, (x,), dynamo=True, optimize=optimize, verbose=False)
            program.save(str(path))
            nodes[name] = len(onnx.load(str(path)).graph.node)
            sess = session(path, args.threads)
            feed = {sess.get_inputs()[0].name: x.numpy()}
            diffs[name] = float(np.abs(sess.run(None, feed)[0] - want).max())
            calls[name] = (lambda s=sess, f=feed: s.run(None, f))
        start = time.perf_counter()
        samples = interleaved(calls, args.repeats, args.warmup)
    med = {k: statistics.median(v) for k, v in samples.items()}  # already ms
    for k in ("unoptimized", "optimized"):
        print(f"{k}: {nodes[k]} nodes, max abs diff vs eager {diffs[k]:.2g}, median {med[k]:.1f} ms")
    print(f"optimized / unoptimized latency: {med['optimized'] / med['unoptimized']:.3f} "
          f"(r={args.r}, batch 1, {args.threads} thread(s), {args.repeats} rounds, "
          f"{time.perf_counter() - start:.0f} s timing, load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
