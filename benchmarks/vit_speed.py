"""Wall-clock speed of token reduction on a timm ViT: measured speedup vs the FLOPs it removes.

For each batch size, target (`eager`, `inductor`, `onnxruntime`) and setting (ToMe r=8/13/16, EViT keep
0.7 at blocks 3, 6, 9) this script times the reduced model against the unreduced one and prints

    setting | batch | target | latency unreduced | latency reduced | speedup | FLOPs ratio |
    FLOPs speedup | efficiency

where `speedup = unreduced / reduced` (medians), `FLOPs speedup = 1 / FLOPs ratio` (from the compile
report, counted by `torch.utils.flop_counter`) and `efficiency = speedup / FLOPs speedup`. An efficiency
of 1 means every removed FLOP turned into saved time; below 1 means overhead (the matching/planning
ops, gathers, shapes the backend handles worse) eats part of the saving.

The measurement itself (preparing both models on a target, interleaved timing, medians, the row's
ratios) lives in `tokenreduce/bench.py` and is shared with `tokenreduce bench`; this script only picks
the model, the settings and the output format.

Methodology
-----------
* Fair baseline. The unreduced model is run the same way as the reduced one: for `eager` it is the plain
  `nn.Module` under inference mode; for `inductor` it is `torch.compile(model)`; for `onnxruntime` both
  models are exported with the same ONNX exporter (`tokenreduce.targets.onnx.export_onnx`, the baseline
  with `method="none"`), verified, and run in onnxruntime CPU sessions with the same thread count. By
  default both are compiled with a symbolic batch dimension, as `tokenreduce.compile` does by default
  (`dynamic_batch=True`; the inductor baseline gets `torch.compile(model, dynamic=True)`);
  `--static-batch` compiles both for the exact batch size instead (reduced: `dynamic_batch=False`;
  baseline: a fresh static `torch.compile(model)`, a static-batch ONNX export).
* Warm-up. The first call of each model (compilation, session set-up) is never timed; then both run
  `--warmup` more untimed rounds (autotuning, allocator and oneDNN caches).
* Interleaving. The machine is shared and noisy: other jobs, frequency changes and thermal drift move
  latencies by several percent over minutes. Timing all of A, then all of B would put that drift into
  the A/B ratio. Alternating A, B, A, B, ... for `--repeats` rounds exposes both models to the same
  conditions, so slow periods hit both equally.
* Medians. Interference is one-sided (a preempted call is only ever slower) and bursty, so the mean is
  pulled up by a few outliers; the median of each side is a robust estimate of the typical latency.
  The report also keeps the interquartile range so the noise level is visible.
* Threads are pinned with `torch.set_num_threads` (default: the CPU cores available to the process; the
  same count for onnxruntime's intra-op pool), and everything runs under `torch.inference_mode()` (the
  reduced graphs are built under `no_grad`).

Usage:
    python benchmarks/vit_speed.py                       # full default configuration
    python benchmarks/vit_speed.py --batch 1 --targets eager --repeats 5 --json out.json
    python benchmarks/vit_speed.py --targets onnxruntime --settings tome13,evit
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tokenreduce.bench import (
    TARGETS,
    BenchRow,
    default_threads,
    interleaved,
    make_row,
    prepare_baseline,
    prepare_reduced,
)

Row = BenchRow  # one table row; the field names are those of the JSON files quoted in docs/benchmarks.md

try:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    HAVE_RICH = True
except ImportError:  # pragma: no cover - rich is a dependency, but keep the script usable without it
    HAVE_RICH = False


@dataclass(frozen=True)
class Setting:
    name: str
    options: dict[str, Any]
    note: str = ""


SETTINGS: dict[str, Setting] = {
    "tome8": Setting("ToMe r=8", {"method": "tome", "r": 8}),
    "tome13": Setting("ToMe r=13", {"method": "tome", "r": 13}),
    "tome16": Setting("ToMe r=16 (clamp_r)", {"method": "tome", "r": 16, "clamp_r": True},
                      note="clamp_r=True: the last block cannot merge 16 tokens"),
    "evit": Setting("EViT keep 0.7 @ 3,6,9", {"method": "evit", "keep_ratio": 0.7, "layers": [3, 6, 9]}),
}


# ---------------------------------------------------------------------------------------------- output


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


COLUMNS = ["setting", "batch", "target", "latency unreduced (ms)", "latency reduced (ms)", "speedup",
           "FLOPs ratio", "FLOPs speedup", "efficiency"]


def _latency(median: float, iqr: float) -> str:
    return f"{median:.1f}" if iqr != iqr else f"{median:.1f} ± {iqr / 2:.1f}"  # no spread with < 4 samples


def _cells(row: Row) -> list[str]:
    return [row.setting, str(row.batch), row.target,
            _latency(row.latency_unreduced_ms, row.iqr_unreduced_ms),
            _latency(row.latency_reduced_ms, row.iqr_reduced_ms),
            f"{row.speedup:.2f}x", f"{row.flops_ratio:.3f}", f"{row.flops_speedup:.2f}x", f"{row.efficiency:.2f}"]


def print_table(rows: list[Row], title: str, console: Any) -> None:
    if HAVE_RICH:
        table = Table(title=title, caption="latency: median ± half the interquartile range of the interleaved samples (no ± below 4 samples)")
        for c in COLUMNS:
            table.add_column(c, justify="left" if c in ("setting", "target") else "right")
        for row in rows:
            cells = _cells(row)
            if row.efficiency < 0.95:
                cells[-1] = f"[red]{cells[-1]}[/red]"
            table.add_row(*cells)
        console.print(table)
    else:
        print(title)
        print(markdown_table(rows))


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


@contextmanager
def progress_bar(total: int) -> Iterator[Callable[..., None]]:
    """Yields `step(description, advance)`; rich when available, else plain log lines."""
    if HAVE_RICH:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=False) as progress:
            task = progress.add_task("benchmark", total=total)

            def step(description: str, advance: int = 0) -> None:
                progress.update(task, description=description, advance=advance)
                if not progress.console.is_terminal:  # keep a readable trail in logs
                    progress.console.log(description)

            yield step
    else:
        done = [0]

        def step(description: str, advance: int = 0) -> None:
            done[0] += advance
            print(f"[{done[0]}/{total}] {description}", flush=True)

        yield step


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name (random init)")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--targets", default="eager,inductor", help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {','.join(SETTINGS)}")
    p.add_argument("--repeats", default=None,
                   help="interleaved A/B rounds per measurement: one int, or one per batch size "
                        "(default: 30 at batch 1, 10 at larger batches)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls of each model before timing")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and onnxruntime threads (default: cores available)")
    p.add_argument("--static-batch", action="store_true",
                   help="compile both models for each exact batch size (default: symbolic batch dimension, "
                        "tokenreduce's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write rows and machine info to this JSON file")
    args = p.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",") if b]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    args.dynamic_batch = not args.static_batch
    if args.repeats is None:
        args.repeats = [30 if b == 1 else 10 for b in args.batch]
    else:
        args.repeats = [int(r) for r in str(args.repeats).split(",") if r]
        if len(args.repeats) == 1:
            args.repeats *= len(args.batch)
        if len(args.repeats) != len(args.batch) or min(args.repeats) < 1:
            p.error("--repeats takes one positive int or one per batch size")
    for t in args.targets:
        if t not in TARGETS:
            p.error(f"unknown target {t!r}")
    for s in args.settings:
        if s not in SETTINGS:
            p.error(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
    return args


def write_json(path: str, args: argparse.Namespace, info: dict[str, Any], rows: list[Row], elapsed: float) -> None:
    out = {"command": " ".join(["python"] + sys.argv), "args": vars(args), "machine": info,
           "elapsed_s": elapsed, "rows": [asdict(r) for r in rows]}
    with open(path, "w") as f:
        json.dump(out, f, indent=2)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    import timm

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    info = machine_info(threads)
    console = Console() if HAVE_RICH else None
    say = console.print if console else print
    say(f"{args.model} (random init) | batches {args.batch} | targets {args.targets} | "
        f"{info['cpu']}, {threads} threads | torch {info['torch']}")

    model = timm.create_model(args.model, pretrained=False).eval()
    settings = [SETTINGS[s] for s in args.settings]
    rows: list[Row] = []
    total = len(args.batch) * len(args.targets) * len(settings)
    started = time.perf_counter()

    with progress_bar(total) as step:
        for batch, repeats in zip(args.batch, args.repeats):
            x_args: tuple[Any, ...] = (torch.randn(batch, 3, 224, 224),)
            x_kwargs: dict[str, Any] = {}
            for target in args.targets:
                step(f"batch {batch} {target}: baseline")
                baseline = prepare_baseline(model, x_args, x_kwargs, target, dynamic_batch=args.dynamic_batch,
                                            threads=threads)
                for setting in settings:
                    step(f"batch {batch} {target}: {setting.name}: compiling")
                    reduced, report = prepare_reduced(model, x_args, x_kwargs, target, setting.options,
                                                      dynamic_batch=args.dynamic_batch, threads=threads)
                    step(f"batch {batch} {target}: {setting.name}: timing {repeats} rounds")
                    timing = interleaved(baseline.bind(x_args, x_kwargs), reduced.bind(x_args, x_kwargs), repeats,
                                         args.warmup)
                    row = make_row(setting.name, batch, target, timing, report, note=setting.note)
                    rows.append(row)
                    if args.json:  # partial results survive an interrupted run
                        write_json(args.json, args, info, rows, time.perf_counter() - started)
                    step(f"batch {batch} {target}: {setting.name}: {row.latency_unreduced_ms:.1f} -> "
                         f"{row.latency_reduced_ms:.1f} ms, speedup {row.speedup:.2f}x, efficiency "
                         f"{row.efficiency:.2f}", advance=1)
                    del reduced
                    gc.collect()
                del baseline
                gc.collect()

    elapsed = time.perf_counter() - started
    title = f"{args.model} (random init), {threads} threads, torch {info['torch']}"
    print_table(rows, title, console)
    say("efficiency = speedup / FLOPs speedup; ToMe r=16 uses clamp_r=True (the last block merges fewer).")
    say(f"total time {elapsed / 60:.1f} min")
    if args.json:
        write_json(args.json, args, info, rows, elapsed)
        say(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
