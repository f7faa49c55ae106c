"""Everything the command line shows and how it ends: output streams, progress, `--json`, exit codes, errors.

Every command prints through `UI`: rich tables on stdout (nothing but one JSON document with `--json`),
progress bars on stderr only on a terminal, so logs and captured output stay clean. Every failure ends
as one `tokenreduce: error: ...` line on stderr with a non-zero exit code; a library error that names a
setting (`TokenReduceError.setting` / `.hint`) gets the command-line spelling of that setting appended,
looked up in the command's own parser, never by rewriting the library's words.

Signals, two ways. Called in-process (`main([...])`), a SIGTERM is turned into an exception while a command
runs, so the `finally` blocks that remove scratch folders run on every exit, as for Ctrl-C. As the process
entry (`console`), SIGINT and SIGTERM end the process on the spot instead: the handler removes every scratch
folder (`util.files.remove_scratch_folders`), prints one line and calls `os._exit`. Raising into torch.export
or onnxruntime code mid-operation and then tearing the interpreter down crashed the process with SIGSEGV
now and then; nothing is unwound this way, and an exit that lands while an atomic write moves files into
place waits until they all are, so there is still never a partial output.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

from tokenreduce.errors import TokenReduceError
from tokenreduce.jsonable import jsonable
from tokenreduce.util.files import exit_when_safe, remove_scratch_folders

PROG = "tokenreduce"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


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

    def emit_json(self, payload: dict[str, Any]) -> None:
        """The one JSON document of a `--json` run (NaN becomes null)."""
        text = json.dumps(jsonable(payload), indent=2, allow_nan=False)
        self.out.file.write(text + "\n")
        self.out.file.flush()

    def write(self, text: str) -> None:
        """Plain text to stdout as is (markdown tables), not through rich's layout."""
        self.out.file.write(text)
        self.out.file.flush()

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
        self.progress: Any = None
        if ui.show_progress:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(), console=ui.err, transient=True)
            self.progress.start()
            self.task = self.progress.add_task(description, total=total)

    def describe(self, description: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=description)

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=n)

    @contextlib.contextmanager
    def stage(self, description: str) -> Iterator[None]:
        self.describe(description)
        yield
        self.advance()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


# ============================================================================================ formatting
def fmt_flops(flops: int | float) -> str:
    if not flops:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3f} {unit}"
    return f"{flops:.0f}"


def fmt_float(x: float, spec: str = ".3f", suffix: str = "") -> str:
    return f"{x:{spec}}{suffix}" if math.isfinite(x) else "-"


def fmt_size(path: Path) -> str:
    """Size of a written model file, with its external-data file if it has one."""
    size = float(sum(f.stat().st_size for f in [path, Path(str(path) + ".data")] if f.exists()))
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def inputs_text(shapes: dict[str, list[int]]) -> str:
    return ", ".join(f"{k} {list(v)}" for k, v in shapes.items())


# ============================================================================================ errors
def flag_spelling(parser: argparse.ArgumentParser | None, setting: str, value: Any = None, *,
                  assign: bool = False) -> str | None:
    """How a user types `setting` (a `Settings` field, which is also the option's argparse dest) on this
    command line, or None when the command has no such option. With `assign`, the spelling that sets it
    to `value`: `--clamp-r` (clamp_r=True), `--protected-tokens 1`, `drop --no-fuse` (fuse=True)."""
    if parser is None:
        return None
    # argparse has no public accessor for its actions; reading the list is stable across versions
    action = next((a for a in parser._actions if a.dest == setting and a.option_strings), None)  # noqa: SLF001
    if action is None:
        return None
    flags = [s for s in action.option_strings if s.startswith("--")] or list(action.option_strings)
    if not assign:
        return " / ".join(flags)
    if isinstance(action, argparse.BooleanOptionalAction):
        return flags[0] if value else next((f for f in flags if f.startswith("--no-")), flags[-1])
    if action.nargs == 0:  # store_true / store_false / store_const
        return flags[0] if value == action.const else f"drop {flags[0]}"
    shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return f"{flags[0]} {shown}"


def hint_spelling(parser: argparse.ArgumentParser | None, hint: str) -> str | None:
    """`TokenReduceError.hint` (`"clamp_r=True"`, `"protected_tokens=1 or method='tome'"`) in this
    command's flags, or None when a part of it is not a settings assignment this command has a flag for."""
    parts = []
    for alternative in hint.split(" or "):
        try:
            call = ast.parse(f"f({alternative.strip()})", mode="eval").body
        except SyntaxError:
            return None
        if not isinstance(call, ast.Call) or call.args or not call.keywords:
            return None
        words = []
        for kw in call.keywords:
            try:
                value = ast.literal_eval(kw.value)
            except ValueError:
                return None
            spelled = flag_spelling(parser, kw.arg, value, assign=True) if kw.arg else None
            if spelled is None:
                return None
            words.append(spelled)
        parts.append(" ".join(words))
    return " or ".join(parts)


def error_line(exc: BaseException, parser: argparse.ArgumentParser | None, debug: bool) -> str:
    """The text after `tokenreduce: error: ` for any failure, on one line."""
    if isinstance(exc, TokenReduceError):
        text = str(exc)
        notes = []
        if exc.setting is not None and (flag := flag_spelling(parser, exc.setting)) is not None:
            notes.append(f"command-line flag: {flag}")
        if exc.hint is not None and (fix := hint_spelling(parser, exc.hint)) is not None:
            notes.append(f"to fix: {fix}")
        if notes:
            text += f" ({'; '.join(notes)})"
    elif isinstance(exc, OSError) and exc.filename:
        text = f"{exc.strerror or exc}: {exc.filename}"
    else:  # anything else is a bug: say what, not where
        first = (str(exc).strip().splitlines() or [""])[0]
        hint = "" if debug else " (rerun with --debug for the traceback)"
        text = f"unexpected {type(exc).__name__}: {first}{hint}"
    return " ".join(text.split())


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


# ============================================================================================ process state
@contextlib.contextmanager
def stdout_reserved(enabled: bool) -> Iterator[IO[str]]:
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


@contextlib.contextmanager
def library_noise(debug: bool) -> Iterator[None]:
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


class Terminated(SystemExit):
    """Raised in the main thread when the process receives SIGTERM, so cleanup code runs."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While a command runs, SIGTERM raises `Terminated` (a SystemExit) instead of killing the process on
    the spot: `finally` blocks remove scratch folders and partial files, as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(EXIT_TERMINATED)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_end_process() -> Iterator[None]:
    """While a command runs, SIGINT and SIGTERM remove the scratch folders, print `tokenreduce: interrupted`
    / `terminated` and end the process at once with exit status 130 / 143 (see the module notes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    said = {signal.SIGINT: ("interrupted", EXIT_INTERRUPTED), signal.SIGTERM: ("terminated", EXIT_TERMINATED)}

    def handler(signum: int, frame: FrameType | None) -> None:
        word, code = said[signal.Signals(signum)]

        def end() -> None:
            remove_scratch_folders()
            with contextlib.suppress(Exception):
                if sys.stderr.isatty():
                    sys.stderr.write("\x1b[?25h")  # a progress bar may have hidden the cursor
                sys.stderr.write(f"\n{PROG}: {word}\n")
                sys.stderr.flush()
                sys.stdout.flush()
            os._exit(code)

        exit_when_safe(end)

    previous = {sig: signal.signal(sig, handler) for sig in said}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
