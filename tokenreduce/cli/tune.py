"""`tokenreduce tune`: choose the method and per-block schedule for a FLOPs or measured-latency budget.

Runs `tokenreduce.tune` (`tuning/search.py`) on calibration inputs (a folder of images, or N generated inputs)
and writes the plan file (`-o`, JSON) that `tokenreduce.compile(..., plan=...)`, the Dynamo backend's
`options={"plan": ...}` and `convert --plan` accept, a Pareto plot PNG and the candidates table. Measurements
go to a resumable cache (`--cache`, default beside the plan). Refuses: a budget outside (0, 1), a latency
budget without a target, a calibration folder without images or for a model that takes no image.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tokenreduce.cli.args import (
    SOURCES_HELP,
    add_common,
    add_model,
    load_source,
    non_negative_int,
    positive_int,
)
from tokenreduce.cli.ui import EXIT_OK, UI
from tokenreduce.errors import TokenReduceError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

EPILOG = f"""\
examples:
  tokenreduce tune tokenreduce.tuning.samples:dinov2_small --budget latency=0.6 --target onnxruntime --batch 1 \\
      --calib ../shared/data/cifar10/train -o dinov2_plan.json
  tokenreduce tune timm:vit_small_patch16_224 --budget flops=0.5 --calib 16 -o vit_s_plan.json
  tokenreduce convert timm:vit_small_patch16_224 --plan vit_s_plan.json -o vit_s.onnx

The search tries every registered encoder method with constant, decreasing and sigmoid schedules (and keep
ratios for pruning methods), refines the best merging schedule greedily block group by block group, and
keeps the candidate closest to the full model (cosine of the pooled / CLS output on the calibration inputs)
whose FLOPs ratio, or latency ratio measured on --target at --batch, is within the budget. Use training or
dev data for --calib, never the data you report on. Measurements are cached (--cache), so a second run, or
one that was interrupted, resumes.

{SOURCES_HELP}"""


def budget_arg(text: str) -> dict[str, float]:
    from tokenreduce.tuning.search import parse_budget

    try:
        kind, value = parse_budget(text)
    except TokenReduceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return {kind: value}


def calib_arg(text: str) -> int | Path:
    if text.isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError("--calib N needs N >= 1")
        return int(text)
    return Path(text)


def names_arg(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> argparse.ArgumentParser:
    from tokenreduce.bench import TARGETS

    p: argparse.ArgumentParser = sub.add_parser(
        "tune", formatter_class=fmt, epilog=EPILOG,
        help="choose method and per-block schedule for a FLOPs or measured-latency budget; write a plan file",
        description="Search the registered methods and per-block schedules for the setting closest\n"
                    "to the full model within a budget, and write it as a plan file.")
    add_model(p, batch_list=False)
    g = p.add_argument_group("search")
    g.add_argument("--budget", type=budget_arg, required=True, metavar="flops=F|latency=F",
                   help="FLOPs ratio or measured latency ratio (reduced / full) the plan must reach, F in (0, 1)")
    g.add_argument("--target", choices=TARGETS, default=None,
                   help=f"where latency is measured ({', '.join(TARGETS)}); needed for a latency budget")
    g.add_argument("--calib", type=calib_arg, default=16, metavar="DIR|N",
                   help="calibration inputs: a folder of images (searched recursively), or N generated inputs "
                        "(default: 16)")
    g.add_argument("--calib-limit", type=positive_int, default=64, metavar="N",
                   help="at most N images from --calib DIR, spread over its subfolders (default: 64)")
    g.add_argument("--methods", type=names_arg, default=None, metavar="M[,M...]",
                   help="methods to search (default: every registered encoder method)")
    g.add_argument("--families", type=names_arg, default=None, metavar="F[,F...]",
                   help="schedule families: constant, decreasing, sigmoid, greedy, keep-ratio (default: all)")
    g.add_argument("--unmerge", action="store_true", default=None,
                   help="tune with the original token count restored at the outputs")
    g.add_argument("--protected-tokens", type=non_negative_int, default=None, metavar="N",
                   help="leading tokens never reduced (default: detected)")
    g.add_argument("--max-candidates", type=positive_int, default=40, metavar="N",
                   help="schedule candidates evaluated before the greedy search (default: 40)")
    g.add_argument("--max-measured", type=positive_int, default=6, metavar="N",
                   help="latency measurements at most (default: 6)")
    g.add_argument("--repeats", type=positive_int, default=10, metavar="N", help="timed A/B rounds (default: 10)")
    g.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch / onnxruntime threads (default: the cores available)")
    g.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="stop trying new candidates after S seconds (the plan notes say so)")
    g.add_argument("--cache", type=Path, default=None, metavar="FILE",
                   help="measurement cache (default: OUT with suffix .cache.json); a rerun resumes from it")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", type=Path, required=True, metavar="PLAN.json", help="plan file to write")
    o.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="Pareto plot (default: OUT with suffix .pareto.png)")
    o.add_argument("--table", type=Path, default=None, metavar="MD",
                   help="candidates table, markdown (default: OUT with suffix .candidates.md)")
    add_common(p)
    return p


def _image_files(folder: Path, limit: int) -> list[Path]:
    if not folder.is_dir():
        raise TokenReduceError(f"--calib {folder}: not a folder (give a folder of images or a number N)",
                               setting="calib")
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise TokenReduceError(f"--calib {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it",
                               setting="calib")
    by_parent: dict[Path, list[Path]] = {}
    for f in files:
        by_parent.setdefault(f.parent, []).append(f)
    picked: list[Path] = []
    while len(picked) < min(limit, len(files)):  # round-robin over subfolders (classes), so all are seen
        for group in by_parent.values():
            if group and len(picked) < limit:
                picked.append(group.pop(0))
    return picked


def calibration(args: argparse.Namespace, src: Any) -> Any:
    """Calibration batches for `tokenreduce.tune`: images from a folder, or N generated inputs."""
    import torch

    if isinstance(args.calib, int):
        a, k = src.inputs(args.calib)
        if a and k:
            raise TokenReduceError(f"{args.model} takes positional and keyword inputs; --calib N cannot generate "
                                   "those, use tokenreduce.tune(...) with your own input batches", setting="calib")
        return [dict(k)] if k else [tuple(a)]
    from tokenreduce.tuning.tokenmap import imagenet_input, load_image

    example = [*src.example_args, *src.example_kwargs.values()]
    image = next((t for t in example if isinstance(t, torch.Tensor) and t.dim() == 4), None)
    if image is None:
        raise TokenReduceError(f"--calib DIR holds images but {args.model} takes no image input; pass --calib N "
                               "or use tokenreduce.tune(...) with your own inputs", setting="calib")
    size = tuple(image.shape[-2:])
    x = torch.cat([imagenet_input(load_image(f, size)) for f in _image_files(args.calib, args.calib_limit)])
    kwarg = next((k for k, v in src.example_kwargs.items() if v is image), None)
    return [{kwarg: x[i:i + 16]} for i in range(0, x.shape[0], 16)] if kwarg else x


def run(args: argparse.Namespace, ui: UI) -> int:
    from tokenreduce.tuning import pareto
    from tokenreduce.tuning.search import tune

    out: Path = args.output
    if out.suffix.lower() != ".json":
        raise TokenReduceError(f"the plan is a JSON file; give an output ending in .json, not {out.name}")
    fixed = {k: v for k, v in (("unmerge", args.unmerge), ("protected_tokens", args.protected_tokens))
             if v is not None}
    plot = args.plot or out.with_suffix(".pareto.png")
    table = args.table or out.with_suffix(".candidates.md")
    with ui.steps(args.max_candidates + 26, "loading model") as steps:
        with steps.stage(f"loading {args.model}"):
            src = load_source(args, args.batch or 1)
        steps.describe("calibration inputs")
        calib = calibration(args, src)

        class Bar:
            def update(self, n: int = 1) -> None:
                steps.advance(n)

        steps.describe("tuning (capture, full model on the calibration inputs)")
        plan = tune(src.model, calib, args.budget, args.target, batch=args.batch or 1, methods=args.methods,
                    families=args.families, settings=fixed, cache=args.cache or out.with_suffix(".cache.json"),
                    time_budget_s=args.time_budget, max_candidates=args.max_candidates,
                    max_measured=args.max_measured, repeats=args.repeats, threads=args.threads, progress=Bar(),
                    model_name=src.description, log=lambda m: steps.describe(m[:100]))
    plan.save(out)
    pareto.plot(plan, plot)
    pareto.write_table(plan, table)
    if ui.json_mode:
        ui.emit_json({"command": "tune", "model": src.description, "plan_file": str(out), "plot": str(plot),
                      "table": str(table), "plan": plan.to_dict()})
        return EXIT_OK
    ui.print(f"model: {src.description}")
    ui.write(pareto.table(plan, limit=15))
    for note in plan.notes:
        ui.print(f"note: {note}")
    ui.print(f"chosen: {plan.summary()}")
    ui.print(f"plan written to {out}; Pareto plot {plot}; table {table}")
    return EXIT_OK
