"""`tokenreduce bench`: latency of the reduced model against the unreduced one on the same target.

The measurement is `tokenreduce/bench.py` (shared with `benchmarks/vit_speed.py` and `tokenreduce eval`):
one untimed first call per side, warm-up rounds, then interleaved A/B rounds, medians. This module parses
the options, prepares each side once per target (a dynamic-batch runner serves every batch size), and
prints the ratio table or one JSON document. A decoder folder is handed to `cli/decoder.py`. Refuses a
setting that reduces nothing (ToMe without `--r`, `--keep-ratio 1`).
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any

from tokenreduce.cli import decoder
from tokenreduce.cli.args import (
    SOURCES_HELP,
    add_common,
    add_model,
    add_settings,
    encoder_and_decoder_choices,
    load_source,
    non_negative_float,
    non_negative_int,
    positive_int,
    targets,
)
from tokenreduce.cli.methods import require_reduction, setting_name, settings_from_args
from tokenreduce.cli.ui import EXIT_OK, UI, fmt_float

if TYPE_CHECKING:
    from tokenreduce.sources import ModelSource

EPILOG = f"""\
examples:
  tokenreduce bench timm:vit_base_patch16_224 --method tome --r 13 --target eager --batch 1,8
  tokenreduce bench timm:vit_base_patch16_224 --method evit --keep-ratio 0.7 --target onnxruntime
  tokenreduce bench timm:vit_base_patch16_224 --method tome --r 13 --target eager,inductor --repeats 20
  tokenreduce bench mymodels:build --method tome --r 4 --batch 1 --repeats 5 --json > bench.json

Each row times the unreduced and the reduced model on the same target: one untimed first call each,
--warmup untimed rounds, then --repeats rounds alternating A, B, A, B (drift on a shared machine hits
both), medians per side. latency ratio = reduced / unreduced; FLOPs ratio from the compile report;
efficiency = measured speedup / FLOPs speedup (1.0: every removed FLOP became saved time).

{SOURCES_HELP}"""


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> argparse.ArgumentParser:
    from tokenreduce.bench import TARGETS

    p: argparse.ArgumentParser = sub.add_parser(
        "bench", formatter_class=fmt, epilog=EPILOG,
        help="time the reduced model against the unreduced one (latency ratio, FLOPs ratio, efficiency)",
        description="Measure the latency of the reduced model against the unreduced model on\n"
                    "the same target and compare it with the FLOPs saved.")
    add_model(p, batch_list=True)
    add_settings(p, choices=encoder_and_decoder_choices(baseline=False), default="tome")
    g = p.add_argument_group("measurement")
    g.add_argument("--target", type=targets, default=["eager"], metavar="T[,T...]",
                   help=f"{', '.join(TARGETS)}, or a comma list (default: eager)")
    g.add_argument("--repeats", type=positive_int, default=10, metavar="N", help="timed A/B rounds per row (default: 10)")
    g.add_argument("--warmup", type=non_negative_int, default=2, metavar="N",
                   help="untimed A/B rounds after the first call (default: 2)")
    g.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch threads and onnxruntime intra-op threads, reported per row (default: the cores "
                        "available; edge CPUs have few)")
    g.add_argument("--atol", type=non_negative_float, default=1e-4,
                   help="onnxruntime target: verification tolerance of the exports (default: 1e-4)")
    add_common(p)
    return p


def run(args: argparse.Namespace, ui: UI) -> int:
    import torch

    from tokenreduce.bench import (
        default_threads,
        interleaved,
        make_row,
        prepare_baseline,
        prepare_reduced,
        threads_used,
    )

    if (folder := decoder.route(args)) is not None:
        return decoder.bench(args, ui, folder)
    require_reduction(args)
    opts = settings_from_args(args)
    dynamic = opts.pop("dynamic_batch", True)
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    name = setting_name(opts)
    rows = []
    total = 1 + len(args.target) * (2 + len(args.batch) * (args.warmup + args.repeats))
    with ui.steps(total, "loading model") as steps:
        with steps.stage(f"loading {args.model}"):
            src = load_source(args, args.batch[0])
        for target in args.target:
            base = red = None
            report = None
            for batch in args.batch:
                x_args, x_kwargs = src.inputs(batch)
                # a runner prepared with a dynamic batch serves every batch size (one compile / export)
                if base is None or not base.serves(batch):
                    with steps.stage(f"{target}: preparing the unreduced model (batch {batch})"):
                        base = prepare_baseline(src.model, x_args, x_kwargs, target, dynamic_batch=dynamic,
                                                threads=threads, atol=args.atol)
                if red is None or not red.serves(batch):
                    with steps.stage(f"{target}: preparing {name} (batch {batch})"):
                        red, report = prepare_reduced(src.model, x_args, x_kwargs, target, opts,
                                                      dynamic_batch=dynamic, threads=threads, atol=args.atol)
                steps.describe(f"{target}, batch {batch}: timing {args.repeats} interleaved rounds")
                timing = interleaved(base.bind(x_args, x_kwargs), red.bind(x_args, x_kwargs), args.repeats, args.warmup,
                                     on_round=steps.advance)
                assert report is not None
                rows.append(make_row(name, batch, target, timing, report, threads=threads_used(red)))
    if ui.json_mode:
        from dataclasses import asdict

        ui.emit_json({"command": "bench", "model": src.description, "inputs": src.input_shapes(),
                      "setting": name, "settings": {**opts, "dynamic_batch": dynamic}, "threads": threads,
                      "repeats": args.repeats, "warmup": args.warmup, "rows": [asdict(r) for r in rows]})
        return EXIT_OK
    print_bench(ui, src, name, rows, threads, args)
    return EXIT_OK


def print_bench(ui: UI, src: ModelSource, name: str, rows: list[Any], threads: int, args: argparse.Namespace) -> None:
    import torch
    from rich.table import Table
    from rich.text import Text

    ui.print(f"model: {src.description}; {name}; {threads} threads; torch {torch.__version__}")

    def lat(median: float, spread: float) -> str:
        return f"{median:.2f}" if not math.isfinite(spread) else f"{median:.2f} ± {spread / 2:.2f}"

    table = Table(title=f"latency, {args.repeats} interleaved rounds, medians (ms)", title_justify="left",
                  caption="latency ratio = reduced / unreduced; efficiency = speedup / FLOPs speedup "
                          "(± is half the interquartile range, shown from 4 rounds)", caption_justify="left")
    for col, just in (("batch", "right"), ("target", "left"), ("threads", "right"), ("unreduced ms", "right"),
                      ("reduced ms", "right"),
                      ("latency ratio", "right"), ("speedup", "right"), ("FLOPs ratio", "right"),
                      ("efficiency", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        eff = Text(fmt_float(r.efficiency, ".2f"), style="green" if r.efficiency >= 0.95 else "yellow")
        table.add_row(str(r.batch), r.target, str(r.threads), lat(r.latency_unreduced_ms, r.iqr_unreduced_ms),
                      lat(r.latency_reduced_ms, r.iqr_reduced_ms), fmt_float(r.latency_ratio),
                      fmt_float(r.speedup, ".2f", "x"), fmt_float(r.flops_ratio), eff)
    ui.print(table)
