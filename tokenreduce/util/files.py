"""One way to write a file that must never be seen half-written: artefacts (ONNX models, TensorRT engines)
and results (JSON, markdown tables).

`atomic_path(path)` yields a temporary path inside a scratch folder created in the destination's own folder
(so the final `os.replace` stays on one filesystem and is atomic). The caller writes the file there under
its final name, together with any companion files it needs beside it (an ONNX model's external weights
`model.onnx.data`). When the block finishes, every file is flushed to disk (`fsync`) and moved into the
destination folder with `os.replace`, the companions first and `path` itself last, so a visible `path`
means everything it refers to is in place; the folder entry is then synced too. On any exception, including
`KeyboardInterrupt` and `SystemExit`, nothing is moved and the scratch folder is removed: a failed or
interrupted write leaves the destination as it was (an older file at `path` survives untouched).

Refuses: a destination that is an existing directory, and a caller that writes subfolders into the scratch
folder (only plain files are moved).

Every scratch folder, here and from `scratch_folder`, is registered while it exists, so a process that must
end at once on a signal, without unwinding through torch or onnxruntime code, can still remove them all
(`remove_scratch_folders`); such an exit that lands while files are being moved into place waits until
they all are (`exit_when_safe`), so it sees either nothing moved or everything moved.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tokenreduce.errors import TokenReduceError

SCRATCH_PREFIX = ".tokenreduce-"
_LIVE: set[Path] = set()  # scratch folders that exist right now


@contextmanager
def scratch_folder(parent: str | os.PathLike[str] | None = None, prefix: str = SCRATCH_PREFIX) -> Iterator[Path]:
    """A fresh folder inside `parent` (the system's temporary folder when None), removed with everything in
    it when the block ends, however it ends."""
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    _LIVE.add(folder)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        _LIVE.discard(folder)


def remove_scratch_folders() -> None:
    """Remove every scratch folder that still exists: for a process about to end with `os._exit`."""
    for folder in list(_LIVE):
        shutil.rmtree(folder, ignore_errors=True)
        _LIVE.discard(folder)


class _Moves:
    """How many atomic writes are moving files into place right now, and the process exit that waits for
    them (`exit_when_safe`)."""

    active = 0
    pending: Callable[[], None] | None = None


@contextmanager
def _moving() -> Iterator[None]:
    _Moves.active += 1
    try:
        yield
    finally:
        _Moves.active -= 1
        if not _Moves.active and _Moves.pending is not None:
            _Moves.pending()


def exit_when_safe(end: Callable[[], None]) -> None:
    """Call `end` (which ends the process) now, or, when a signal handler interrupted an atomic write while it
    was moving files into place, as soon as that move is complete: a visible output is always whole."""
    if _Moves.active:
        _Moves.pending = end
        return
    end()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a scratch path to write `path` to; on success move it (and its companions) into place."""
    dest = Path(path)
    if dest.is_dir():
        raise TokenReduceError(f"cannot write {dest}: it is a directory; give a file name inside it")
    with scratch_folder(dest.parent) as scratch:
        yield scratch / dest.name
        staged = sorted(scratch.iterdir(), key=lambda f: (f.name == dest.name, f.name))
        folders = [f.name for f in staged if not f.is_file()]
        if folders:
            raise TokenReduceError(f"atomic write of {dest}: only files can be moved into place, found "
                                   f"{', '.join(folders)} in the scratch folder")
        if not staged or staged[-1].name != dest.name:
            raise TokenReduceError(f"atomic write of {dest}: nothing was written under the name {dest.name}")
        for f in staged:
            _fsync_file(f)
        with _moving():
            for f in staged:
                os.replace(f, dest.parent / f.name)
        _fsync_dir(dest.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically; returns `path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; returns `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)
