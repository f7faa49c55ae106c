"""Reduce the tokens of an unmodified timm ViT (random init, offline) and check what it bought.

    .venv/bin/python examples/quickstart.py [--model vit_small_patch16_224] [--r 13] [--batch 4]

Prints the per-block report, the parity against the reduced graph run eagerly, and a quick interleaved
latency ratio (for real numbers use benchmarks/vit_speed.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import tokenreduce


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random init)")
    ap.add_argument("--r", type=int, default=13, help="ToMe tokens merged per block")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--inner", default="inductor", choices=["inductor", "eager"])
    args = ap.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    print(f"compiling {args.model} with ToMe r={args.r} (inner compiler: {args.inner}) ...", flush=True)
    reduced = tokenreduce.compile(model, (x,), method="tome", r=args.r, inner=args.inner)
    print(reduced.report)

    with torch.inference_mode():
        out = reduced(x)
        ref = reduced.graph_module(x)
        full = model(x)
        print(f"compiled vs eager reduced graph: max abs diff {(out - ref).abs().max().item():.2e}")
        agree = (out.argmax(-1) == full.argmax(-1)).float().mean().item()
        print(f"top-1 agreement with the unreduced model (random weights): {agree:.0%}")
        baseline = torch.compile(model) if args.inner == "inductor" else model
        baseline(x)
        ta, tb = [], []
        for _ in range(5):
            t0 = time.perf_counter(); baseline(x); ta.append(time.perf_counter() - t0)  # noqa: E702
            t0 = time.perf_counter(); reduced(x); tb.append(time.perf_counter() - t0)  # noqa: E702
        speedup = statistics.median(ta) / statistics.median(tb)
    print(f"latency: unreduced {statistics.median(ta) * 1e3:.1f} ms, reduced {statistics.median(tb) * 1e3:.1f} ms "
          f"-> {speedup:.2f}x (FLOPs {1 / reduced.report.flops_ratio:.2f}x fewer)")


if __name__ == "__main__":
    main()
