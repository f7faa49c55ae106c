"""One attention in onnxruntime: the standard ONNX export against `fused_attention` (onnxruntime's
`com.microsoft.MultiHeadAttention`), time and peak memory. Three files:

* `unfused`: the default export (opset 18: MatMul, Softmax, MatMul);
* `attention23`: the default export at opset 23, where the exporter writes ONNX's own `Attention` op;
* `fused`: `fused_attention=True`, onnxruntime's contrib op.

The module is `F.scaled_dot_product_attention(q, k, v)` on `[1, heads, N, head_dim]` inputs (default 8 x 40:
an SD-1.5 UNet's finest level; N = 4096 at 512 px, 16384 at 1024 px). Both files come from
`tokenreduce.targets.onnx.export_graph` (verified against eager). Each measurement runs in its own process
with numpy and onnxruntime only (so its peak resident memory, VmHWM, is its own; "added" is the peak
minus the resident memory just before the session is made, i.e. what the session and its calls took): load the session, one untimed call, `--calls` timed
calls, median. The two variants alternate for `--rounds` rounds; the table gives the median over rounds.
The unfused export materialises `[heads, N, N]` fp32 scores (and their softmax): 8.6 GB each at N = 16384,
so sizes above `--max-unfused` run fused only (and `attention23`, whose CPU kernel materialises them too).

`--unet-width W`: instead, the whole unreduced SD-1.5-shaped UNet (`benchmarks/tomesd_speed.py`'s, channels
W/2W/4W/4W, latent `--side`) exported both ways, the two onnxruntime sessions timed in interleaved rounds in one
process (`tokenreduce.bench.interleaved`, medians).

Usage:
    python benchmarks/ort_attention.py --tokens 1024,4096,16384 --rounds 3 --json out/ort_attention.json
    python benchmarks/ort_attention.py --unet-width 160 --side 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def export(path: Path, n: int, heads: int, head_dim: int, variant: str) -> float:
    import torch
    import torch.nn.functional as F

    from tokenreduce.targets.onnx import export_graph

    class Attention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v)

    g = torch.Generator().manual_seed(0)
    args = tuple(torch.randn(1, heads, n, head_dim, generator=g) for _ in range(3))
    gm = torch.export.export(Attention(), args).module()
    ex = export_graph(gm, args, {}, path, dynamic_batch=False, fused_attention=variant == "fused", atol=1e-4,
                      opset=23 if variant == "attention23" else None)
    return float(ex.max_abs_diff or 0.0)


def child(path: str, n: int, heads: int, head_dim: int, calls: int, threads: int) -> None:
    """Measure one file in this process (numpy and onnxruntime only, no torch); print one JSON line."""
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds_np: list[Any] = [rng.standard_normal((1, heads, n, head_dim), dtype=np.float32) for _ in range(3)]
    before = _status_gb("VmRSS")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feeds = dict(zip(names, feeds_np, strict=True))
    sess.run(None, feeds)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    peak = _status_gb("VmHWM")
    print(json.dumps({"median_s": statistics.median(times), "peak_rss_gb": peak, "added_gb": peak - before}))


def _status_gb(key: str) -> float:
    """A memory line of /proc/self/status in GB: VmRSS (resident now), VmHWM (peak resident of this process's
    address space; `ru_maxrss` would not do: Linux carries it over `execve` from the forking parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1e6
    return 0.0


def measure(path: Path, args: argparse.Namespace, n: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", str(path), "--n", str(n), "--heads", str(args.heads),
                          "--head-dim", str(args.head_dim), "--calls", str(args.calls), "--threads",
                          str(args.threads)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def whole_unet(args: argparse.Namespace) -> None:
    """The unreduced UNet exported unfused and fused, timed against each other (module docstring)."""
    import diffusers
    import torch

    from tokenreduce.bench import interleaved, paired_ratio, prepare_baseline

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    w, side = args.unet_width, args.side
    model = diffusers.UNet2DConditionModel(sample_size=side, block_out_channels=(w, 2 * w, 4 * w, 4 * w),
                                           cross_attention_dim=768, attention_head_dim=8).eval()
    call_args = (torch.randn(1, 4, side, side), torch.full((1,), 500))
    call_kwargs = {"encoder_hidden_states": torch.randn(1, 77, 768)}
    runners = {fused: prepare_baseline(model, call_args, call_kwargs, "onnxruntime", dynamic_batch=False,
                                       threads=args.threads, atol=1e-3, fused_attention=fused)
               for fused in (False, True)}
    load = os.getloadavg()[0]
    t = interleaved(runners[False].bind(call_args, call_kwargs), runners[True].bind(call_args, call_kwargs),
                    repeats=args.rounds)
    row = {"unet_width": w, "side": side, "threads": args.threads, "unfused_ms": t.median_unreduced_ms,
           "fused_ms": t.median_reduced_ms, "speedup": t.median_unreduced_ms / t.median_reduced_ms,
           "paired_speedup": 1 / paired_ratio(t.samples_unreduced_ms, t.samples_reduced_ms),
           "samples_unfused_ms": t.samples_unreduced_ms, "samples_fused_ms": t.samples_reduced_ms,
           "load_before": load, "load_after": os.getloadavg()[0]}
    print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1024,4096", help="sequence lengths N, comma-separated")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (one process per variant and round)")
    ap.add_argument("--calls", type=int, default=3, help="timed calls per process (after one untimed)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--max-unfused", type=int, default=4096, help="largest N the unfused export is run at")
    ap.add_argument("--unet-width", type=int, default=None,
                    help="time the whole unreduced SD-1.5-shaped UNet of this first-level width instead")
    ap.add_argument("--side", type=int, default=64, help="--unet-width: latent side (64 = 512 px)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.n, args.heads, args.head_dim, args.calls, args.threads)
        return
    if args.unet_width:
        whole_unet(args)
        return
    rows = []
    print(f"{args.heads} heads x {args.head_dim}, {args.threads} thread(s), load {os.getloadavg()[0]:.1f}", flush=True)
    print("| N | variant | verified max abs diff | median s | peak RSS GB | added GB |\n|---|---|---|---|---|---|",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="ort-attention-") as tmp:
        for n in (int(t) for t in args.tokens.split(",")):
            variants = ["fused"] + (["unfused", "attention23"] if n <= args.max_unfused else [])
            paths = {v: Path(tmp) / f"{v}_{n}.onnx" for v in variants}
            diffs = {v: export(paths[v], n, args.heads, args.head_dim, v) for v in variants}
            samples: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
            for _ in range(args.rounds):
                for v in reversed(variants):
                    samples[v].append(measure(paths[v], args, n))
            for v in reversed(variants):
                row = {"tokens": n, "variant": v, "heads": args.heads, "head_dim": args.head_dim,
                       "threads": args.threads, "max_abs_diff": diffs[v],
                       "median_s": statistics.median(s["median_s"] for s in samples[v]),
                       "peak_rss_gb": max(s["peak_rss_gb"] for s in samples[v]),
                       "added_gb": max(s["added_gb"] for s in samples[v])}
                rows.append(row)
                print(f"| {n} | {v} | {row['max_abs_diff']:.2g} | {row['median_s']:.3f} | {row['peak_rss_gb']:.2f} | "
                      f"{row['added_gb']:.2f} |", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
