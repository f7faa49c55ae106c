"""The `tokenreduce` command line: convert, inspect, benchmark and evaluate token-reduced models.

The library API needs Python; a deployment engineer has a model name and wants a verified artefact. This
package is that front end and nothing more: it parses options into `tokenreduce.Settings`, loads the model
through `tokenreduce.sources`, runs the compiler and the targets, and prints rich tables (or one JSON
document with `--json`). Every refusal is a one-line `tokenreduce: error: ...` on stderr with a non-zero
exit code (a traceback only with `--debug`), and no command leaves a partial output file behind.

    tokenreduce convert MODEL --method tome --r 13 --to onnx -o model.onnx
    tokenreduce inspect MODEL | FILE.onnx
    tokenreduce bench MODEL --method evit --target onnxruntime --batch 1,8
    tokenreduce eval minilm --method tome --r 1 2 3 4

Layout: one module per command (`convert`, `inspect`, `bench`, `eval`), each with `add_parser` and `run`;
`decoder` holds their variants for decoder LLM/VLM folders; `ui` (output, `--json`, exit codes, errors),
`args` (option builders and parsers), `methods` (everything that depends on the set of methods) and
`files` (output checks) are shared. Imports point one way: commands import the shared modules, and only
`COMMANDS` below imports the commands.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from tokenreduce.cli import bench, convert, inspect, tune, visualize
from tokenreduce.cli import eval as evaluate
from tokenreduce.cli.args import SOURCES_HELP
from tokenreduce.cli.ui import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    PROG,
    UI,
    Terminated,
    error_line,
    library_noise,
    signals_end_process,
    sigterm_raises,
    stdout_reserved,
)

__all__ = ["COMMANDS", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_TERMINATED", "EXIT_USAGE", "console",
           "build_parser", "main"]

Handler = Callable[[argparse.Namespace, UI], int]
ParserBuilder = Callable[[Any, type[argparse.HelpFormatter]], argparse.ArgumentParser]

# command name -> (adds its subparser, runs it); the only place that imports the command modules
COMMANDS: dict[str, tuple[ParserBuilder, Handler]] = {
    "convert": (convert.add_parser, convert.run),
    "inspect": (inspect.add_parser, inspect.run),
    "bench": (bench.add_parser, bench.run),
    "eval": (evaluate.add_parser, evaluate.run),
    "tune": (tune.add_parser, tune.run),
    "visualize": (visualize.add_parser, visualize.run),
}

MAIN_EPILOG = f"""\
examples:
  tokenreduce inspect timm:vit_base_patch16_224
  tokenreduce convert timm:vit_base_patch16_224 --method tome --r 13 --to onnx -o vit_b_tome13.onnx
  tokenreduce convert timm:deit_small_patch16_224 --method evit --keep-ratio 0.7 --layers 3,6,9 -o deit_s.onnx
  tokenreduce convert hf:./all-MiniLM-L6-v2 --method tome --r 4 --seq-len 128 -o minilm.onnx
  tokenreduce bench timm:vit_base_patch16_224 --method tome --r 13 --target onnxruntime --batch 1,8
  tokenreduce inspect vit_b_tome13.onnx
  tokenreduce tune timm:vit_small_patch16_224 --budget flops=0.5 --calib 16 -o vit_s_plan.json
  tokenreduce visualize tokenreduce.tuning.samples:dinov2_small photo.jpg --method tome --r 8 -o map.png

{SOURCES_HELP}
Run `tokenreduce COMMAND --help` for the options of each command. Errors are one line on stderr with a
non-zero exit status; --debug shows the traceback.
"""


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's subparser (errors look their flags up there)."""
    from tokenreduce import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=fmt, epilog=MAIN_EPILOG,
        description="Reduce the tokens of a transformer (ToMe merging, EViT pruning) by rewriting its\n"
                    "torch.export graph, and export verified ONNX / TensorRT artefacts.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = {name: add(sub, fmt) for name, (add, _) in COMMANDS.items()}
    return parser, commands


def main(argv: Sequence[str] | None = None, *, exit_on_signal: bool = False) -> int:
    """Run one command and return its exit code. In-process callers keep the default: Ctrl-C and SIGTERM
    become exceptions, cleanup runs, and the exit code is returned. `exit_on_signal=True` (the console
    entry) ends the process on those signals instead, after removing the scratch folders (see `cli.ui`)."""
    parser, commands = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = bool(args.debug)
    _, run = COMMANDS[args.command]
    try:
        with (signals_end_process() if exit_on_signal else sigterm_raises()), stdout_reserved(args.json) as stdout, library_noise(debug):
            ui = UI(json_mode=args.json, progress=not args.no_progress, stdout=stdout)
            return int(run(args, ui))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as exc:  # noqa: BLE001 - every failure ends as one line (plus the traceback with --debug)
        if debug:
            traceback.print_exception(exc)
        print(f"{PROG}: error: {error_line(exc, commands[args.command], debug)}", file=sys.stderr)
        return EXIT_ERROR


def console() -> None:
    """The `tokenreduce` console script and `python -m tokenreduce`: `main`, then exit with its code. A
    SIGINT or SIGTERM while the command runs ends the process at once, its scratch folders removed."""
    sys.exit(main(exit_on_signal=True))
