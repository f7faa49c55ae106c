"""Where does the time of a token-reduced model go? A torch.profiler breakdown per forward call.

Profiles the unreduced and the reduced model (same target, same batch) and splits each call into:

* `tokenreduce::*` ops (tome_plan, topk_plan, query_row_scores, apply_plan): opaque custom ops that run
  their pure-torch reference code eagerly, inside the compiled graph; time includes their children;
* top-level ATen ops called by the graph (for inductor: the extern GEMMs, SDPA, ...), grouped by name;
* the rest: inductor's generated C++ kernels (they emit no profiler events) plus Python/guard overhead.

Usage:
    python benchmarks/profile_reduced.py --setting tome13 --batch 1 --target inductor
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import tokenreduce

SETTINGS: dict[str, dict[str, Any]] = {
    "tome8": {"method": "tome", "r": 8},
    "tome13": {"method": "tome", "r": 13},
    "tome16": {"method": "tome", "r": 16, "clamp_r": True},
    "evit": {"method": "evit", "keep_ratio": 0.7, "layers": [3, 6, 9]},
}
CALL = "benchmark::call"


def breakdown(fn: Any, x: torch.Tensor, calls: int) -> tuple[float, dict[str, float]]:
    """Profile `calls` calls; returns (ms per call, {category: ms per call})."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            with record_function(CALL):
                fn(x)
    events = prof.events()
    total = sum(e.cpu_time_total for e in events if e.name == CALL) / 1e3 / calls
    parts: dict[str, float] = defaultdict(float)

    def ancestors(e: Any) -> list[str]:
        names, p = [], e.cpu_parent
        while p is not None:
            names.append(p.name)
            p = p.cpu_parent
        return names

    for e in events:
        if e.name == CALL:
            continue
        up = ancestors(e)
        if CALL not in up or any(n.startswith(("tokenreduce::", "aten::")) for n in up):
            continue  # not inside a timed call, or nested inside an op we already count
        if e.name.startswith("tokenreduce::"):
            parts[e.name] += e.cpu_time_total / 1e3 / calls
        elif e.name.startswith("aten::"):
            parts[e.name] += e.cpu_time_total / 1e3 / calls
    parts["rest (inductor C++ kernels, Python, guards)"] = total - sum(parts.values())
    return total, dict(parts)


def tokenreduce_children(fn: Any, x: torch.Tensor, calls: int) -> dict[str, dict[str, float]]:
    """Self time of the ATen ops inside each tokenreduce op (ms per call)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn(x)
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in prof.events():
        p = e.cpu_parent
        owner = None
        while p is not None:
            if p.name.startswith("tokenreduce::"):
                owner = p.name
            p = p.cpu_parent
        if owner is not None:
            out[owner][e.name] += e.self_cpu_time_total / 1e3 / calls
    return {k: dict(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--setting", default="tome13", choices=sorted(SETTINGS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--target", default="inductor", choices=["eager", "inductor"])
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()

    import timm

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.no_grad():
        red = tokenreduce.compile(model, (x,), inner=args.target, count_model_flops=False, **SETTINGS[args.setting])
    models = {"reduced": red}
    if not args.skip_baseline:
        models["unreduced"] = model if args.target == "eager" else torch.compile(model, dynamic=True)

    with torch.inference_mode():
        for name, fn in models.items():
            t0 = time.perf_counter()
            for _ in range(3):
                fn(x)
            print(f"{name}: compile + 3 warm-up calls {time.perf_counter() - t0:.0f} s", flush=True)
        for name, fn in models.items():
            wall = []
            for _ in range(args.calls):
                t = time.perf_counter()
                fn(x)
                wall.append((time.perf_counter() - t) * 1e3)
            total, parts = breakdown(fn, x, args.calls)
            print(f"\n== {name} ({args.setting}, batch {args.batch}, {args.target}): median wall {statistics.median(wall):.1f} ms"
                  f" unprofiled; {total:.1f} ms/call profiled")
            for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
                if v >= 0.05 * total / 100 or k.startswith("tokenreduce::"):
                    print(f"  {k:<48} {v:9.2f} ms  {100 * v / total:5.1f} %")
            tr = sum(v for k, v in parts.items() if k.startswith("tokenreduce::"))
            print(f"  {'tokenreduce ops total':<48} {tr:9.2f} ms  {100 * tr / total:5.1f} %")
        children = tokenreduce_children(red, x, args.calls)
        for op, kids in children.items():
            top = sorted(kids.items(), key=lambda kv: -kv[1])[:6]
            print(f"\ninside {op}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in top))


if __name__ == "__main__":
    main()
