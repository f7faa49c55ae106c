"""Edge deployment speed: a reduced timm ViT in onnxruntime at small batch and few threads.

For each setting (ToMe r=8/13/16, EViT keep 0.7 at blocks 3, 6, 9) this script exports the unreduced model
(`method="none"`) and the reduced model twice, with the plan subgraph in its reference form (`apply_plan`
as three scatter-adds over every token) and in the exported form (`passes/inline_reference_ops.py`:
`apply_plan_reps`, a row copy of each slot's representative plus a scatter-add of only the other sources),
and times the three files in onnxruntime CPU sessions (`ORT_ENABLE_ALL`, the same intra-op threads for all
three) in interleaved rounds: unreduced, reduced (reference), reduced (exported), unreduced, ... Medians per
file; `efficiency = speedup / FLOPs speedup` with the FLOPs ratio from the compile report. Every export is
verified against the eager graph (`export_graph`), so both forms compute the same numbers.

`--profile` adds onnxruntime's per-op-type kernel time of one batch-1 file of each kind (where the time goes).
`--levels` also times the exported reduced file under the onnxruntime graph optimisation levels
basic / extended / all.
`--oracle` also times a token-count oracle: the unreduced timm model with each block's attention run on the first
n_in tokens and its MLP on the first n_out (`x[:, :n]`, Slice nodes), the reduced model's counts at that block. It
does the reduced model's GEMM and attention work with no plan ops at all, so its efficiency bounds what any plan
subgraph can reach (its output is not the reduced model's; it is timed, not verified). It also times the same
model on one token per block (`floor`): the per-call cost that no token reduction removes (reading the weights,
per-node overheads).

Methodology as `benchmarks/vit_speed.py` (house style): the first call of each session is untimed, then
`--warmup` untimed rounds, then `--repeats` interleaved timed rounds, medians; the machine is shared, so
only ratios measured inside one run are quoted.

Usage:
    python benchmarks/edge_onnx.py --settings tome13,evit --batch 1 --threads 1,2 --repeats 15 --json out/edge.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tokenreduce
from tokenreduce.targets.onnx import cpu_session, export_graph

SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "tome8": ("ToMe r=8", {"method": "tome", "r": 8}),
    "tome13": ("ToMe r=13", {"method": "tome", "r": 13}),
    "tome16": ("ToMe r=16 (clamp_r)", {"method": "tome", "r": 16, "clamp_r": True}),
    "evit": ("EViT keep 0.7 @ 3,6,9", {"method": "evit", "keep_ratio": 0.7, "layers": [3, 6, 9]}),
}


def session(path: Path, threads: int, level: str = "all") -> Any:
    return cpu_session(path, threads, level)


class TokenCountOracle(torch.nn.Module):
    """A timm ViT that runs block i's attention on its first `counts_in[i]` tokens and its MLP on the first
    `counts_out[i]`: the reduced model's GEMM and attention work (ToMe and EViT reduce between the two), no plan ops."""

    def __init__(self, vit: torch.nn.Module, counts_in: list[int], counts_out: list[int]) -> None:
        super().__init__()
        self.vit = vit
        self.counts = list(zip(counts_in, counts_out, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        x = v.norm_pre(v._pos_embed(v.patch_embed(x)))
        for blk, (n_in, n_out) in zip(v.blocks, self.counts, strict=True):
            x = x[:, :n_in]
            x = x + blk.ls1(blk.attn(blk.norm1(x)))
            x = x[:, :n_out]
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        return v.forward_head(v.norm(x))


def interleaved(calls: dict[str, Any], repeats: int, warmup: int) -> dict[str, list[float]]:
    """First call untimed, `warmup` untimed rounds, then `repeats` rounds calling each in turn (ms)."""
    for fn in calls.values():
        fn()
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - start) * 1e3)
    return times


def profile(path: Path, feeds: dict[str, np.ndarray], threads: int, runs: int) -> dict[str, float]:
    """onnxruntime kernel time per op type (ms per run) over `runs` profiled runs after 2 untimed ones."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(2 + runs):
        sess.run(None, feeds)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    per_op: Counter[str] = Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    scale = 1e3 * (2 + runs)
    return {op: us / scale for op, us in per_op.most_common()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--settings", default="tome8,tome13,tome16,evit")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--levels", action="store_true")
    ap.add_argument("--oracle", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    x = torch.randn(2, 3, 224, 224)
    batches = [int(b) for b in args.batch.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    rows: list[dict[str, Any]] = []
    started = time.time()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="edge-onnx-") as tmp:
        folder = Path(tmp)
        with torch.no_grad():
            base = tokenreduce.compile(model, (x,), inner="eager", method="none", count_model_flops=False)
        export_graph(base.graph_module, base.example_args, base.example_kwargs, folder / "none.onnx")
        for key in args.settings.split(","):
            label, opts = SETTINGS[key]
            with torch.no_grad():
                red = tokenreduce.compile(model, (x,), inner="eager", **opts)
            ratio = red.report.flops_ratio or float("nan")
            files = {"unreduced": folder / "none.onnx"}
            for form in ("reference", "exported"):
                files[form] = folder / f"{key}-{form}.onnx"
                exp = export_graph(red.graph_module, red.example_args, red.example_kwargs, files[form], plan_form=form)
                print(f"{label} {form}: verified, max abs diff {exp.max_abs_diff:.2g}, "
                      f"{sum(exp.op_counts.values())} nodes, {exp.op_counts.get('ScatterElements', 0)} ScatterElements",
                      flush=True)
            if args.oracle:
                files["oracle"] = folder / f"{key}-oracle.onnx"
                counts_in = [b.tokens_in for b in red.report.blocks]
                counts_out = [b.tokens_out for b in red.report.blocks]
                for name, c_in, c_out in (("oracle", counts_in, counts_out), ("floor", [1] * len(counts_in),
                                                                               [1] * len(counts_in))):
                    files[name] = folder / f"{key}-{name}.onnx"
                    torch.onnx.export(TokenCountOracle(model, c_in, c_out).eval(), (x,), str(files[name]),
                                      input_names=["x"], dynamic_axes={"x": {0: "b"}}, dynamo=False)
                print(f"{label} oracle: tokens in/out per block {list(zip(counts_in, counts_out))}", flush=True)
            for t in threads:
                sessions = {k: session(p, t) for k, p in files.items()}
                if args.levels:
                    for level in ("basic", "extended"):
                        sessions[f"exported@{level}"] = session(files["exported"], t, level)
                for b in batches:
                    feed = np.random.default_rng(b).standard_normal((b, 3, 224, 224)).astype(np.float32)
                    calls = {k: (lambda s=s, f=feed: s.run(None, {s.get_inputs()[0].name: f})) for k, s in sessions.items()}
                    times = interleaved(calls, args.repeats, args.warmup)
                    med = {k: statistics.median(v) for k, v in times.items()}
                    row = {"setting": label, "batch": b, "threads": t, "flops_ratio": ratio,
                           "median_ms": med, "samples_ms": times}
                    for form in [k for k in med if k != "unreduced"]:
                        speedup = med["unreduced"] / med[form]
                        row[f"efficiency_{form}"] = speedup * ratio
                        row[f"speedup_{form}"] = speedup
                    rows.append(row)
                    print(f"{label} b={b} t={t}: unreduced {med['unreduced']:.1f} ms | "
                          + " | ".join(f"{k} {med[k]:.1f} ms (x{row[f'speedup_{k}']:.2f}, eff {row[f'efficiency_{k}']:.2f})"
                                       for k in med if k != "unreduced") + f" | FLOPs ratio {ratio:.3f}", flush=True)
            if args.profile:
                feed1 = {"x": np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)}
                for name, p in files.items():
                    name_in = session(p, 1).get_inputs()[0].name
                    prof = profile(p, {name_in: feed1["x"]}, threads[0], 10)
                    total = sum(prof.values())
                    top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(prof.items())[:8])
                    print(f"profile {label} {name} ({threads[0]} threads, batch 1): kernels {total:.1f} ms: {top}",
                          flush=True)
                    rows.append({"setting": label, "profile": name, "threads": threads[0], "kernel_ms": prof})
    meta = {"model": args.model, "minutes": (time.time() - started) / 60, "load_before": load_before,
            "load_after": os.getloadavg(), "repeats": args.repeats, "warmup": args.warmup}
    print(json.dumps(meta))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
