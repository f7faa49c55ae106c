"""Where `convert` may write, checked before any work.

Before a model is loaded: the output must not be one of the command's input files (`convert X.pt2 -o
X.pt2` would replace its own input; a link counts as the file it points to), its suffix must match `--to`,
and its folder must be writable (found out now, and named by the output path, not after minutes of
compiling and by a scratch folder's name). The writing itself goes through `tokenreduce.util.files.
atomic_path` (a scratch folder beside the output, moved into place only when complete, removed on every
exit: errors, Ctrl-C, and SIGTERM through `ui.sigterm_raises`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenreduce.errors import TokenReduceError


def suffix_of(to: str) -> str:
    """The file suffix the artefact target `to` writes (`.onnx`, `.engine`), from the target registry."""
    from tokenreduce import targets

    target = targets.get(to)
    if not isinstance(target, targets.ArtefactTarget):
        raise TokenReduceError(f"the {to} target writes no file; choose one of {', '.join(targets.names(targets.ARTEFACT))}")
    return target.suffix


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through links and `..`), for files that may not exist yet."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output(out: Path, to: str, inputs: Iterable[Path], extra_outputs: Iterable[Path] = ()) -> None:
    """Refuse, before any work, an output that would destroy an input, has the wrong suffix for `to`,
    is a folder, or lies in a folder that cannot be written."""
    expected = suffix_of(to)
    if out.is_dir():
        raise TokenReduceError(f"output {out} is a directory; give a file name, e.g. {out / ('model' + expected)}")
    for written in (out, *extra_outputs):
        for source in inputs:
            if source.is_file() and same_file(written, source):
                raise TokenReduceError(f"output {written} is the input file {source}; writing it would destroy the "
                                       "input: choose another output name")
    if out.suffix.lower() != expected:
        raise TokenReduceError(f"output {out} does not end in {expected}, the suffix of --to {to} files; "
                               f"give e.g. -o {out.with_suffix(expected)}")
    check_writable(out)


def check_writable(out: Path) -> None:
    """The nearest existing folder of `out` must accept new files, probed by creating an anonymous temporary
    file there (permission bits do not tell for root or read-only file systems; the probe has no name on
    Linux and is gone when closed, so an interrupt cannot leave it behind)."""
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise TokenReduceError(f"cannot write {out}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise TokenReduceError(f"cannot write {out}: {folder} is not writable ({exc.strerror or exc})") from exc
