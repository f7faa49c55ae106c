"""`tokenreduce.util.files`: an artefact or results file appears whole or not at all.

A write that finishes leaves the file (and its companions) and no scratch folder; one that raises, is
interrupted (KeyboardInterrupt, including in the middle of moving files into place) or writes nothing leaves
the destination as it was, old file included, and no scratch folder. The primary file is moved last.
A process ending on a signal finds every scratch folder in the registry, and a signal that arrives while
files are moved into place waits until all of them are.
"""

from __future__ import annotations

import os
import signal

import pytest

from tokenreduce.errors import TokenReduceError
from tokenreduce.util import files


def test_write_text_and_bytes(tmp_path):
    assert files.write_text(tmp_path / "a" / "r.json", '{"x": 1}\n') == tmp_path / "a" / "r.json"
    assert (tmp_path / "a" / "r.json").read_text() == '{"x": 1}\n'
    files.write_bytes(tmp_path / "a" / "r.json", b"new")  # replaces an existing file
    assert (tmp_path / "a" / "r.json").read_bytes() == b"new"
    assert os.listdir(tmp_path / "a") == ["r.json"]


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt(), SystemExit(3)])
def test_failure_in_the_block_leaves_the_old_file_and_no_scratch(tmp_path, exc):
    dest = tmp_path / "model.onnx"
    dest.write_bytes(b"old")
    with pytest.raises(type(exc)):
        with files.atomic_path(dest) as tmp:
            tmp.write_bytes(b"half")
            (tmp.parent / "model.onnx.data").write_bytes(b"weights")
            raise exc
    assert dest.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_companions_move_first_and_primary_last(tmp_path, monkeypatch):
    moved = []
    real_replace = os.replace

    def record(src, dst):
        moved.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", record)
    with files.atomic_path(tmp_path / "model.onnx") as tmp:
        tmp.write_bytes(b"graph")
        (tmp.parent / "model.onnx.data").write_bytes(b"weights")
        (tmp.parent / "aaa.extra").write_bytes(b"x")
    assert moved[-1] == "model.onnx" and sorted(moved) == ["aaa.extra", "model.onnx", "model.onnx.data"]
    assert sorted(os.listdir(tmp_path)) == ["aaa.extra", "model.onnx", "model.onnx.data"]


def test_interrupt_while_moving_leaves_no_primary_and_no_scratch(tmp_path, monkeypatch):
    real_replace = os.replace

    def interrupted(src, dst):
        if os.path.basename(dst) == "model.onnx":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_path(tmp_path / "model.onnx") as tmp:
            tmp.write_bytes(b"graph")
            (tmp.parent / "model.onnx.data").write_bytes(b"weights")
    assert not (tmp_path / "model.onnx").exists()
    assert not any(name.startswith(files.SCRATCH_PREFIX) for name in os.listdir(tmp_path))


def test_nothing_written_is_an_error(tmp_path):
    with pytest.raises(TokenReduceError, match="nothing was written under the name out.json"):
        with files.atomic_path(tmp_path / "out.json"):
            pass
    assert os.listdir(tmp_path) == []


def test_directory_destination_is_refused(tmp_path):
    with pytest.raises(TokenReduceError, match="is a directory"):
        files.write_text(tmp_path, "x")


def test_remove_scratch_folders_finds_every_open_one(tmp_path):
    with files.atomic_path(tmp_path / "out" / "model.onnx") as tmp, files.scratch_folder() as system_tmp:
        tmp.write_bytes(b"half")
        (system_tmp / "x").write_bytes(b"scratch")
        assert tmp.parent.is_dir() and system_tmp.is_dir()
        files.remove_scratch_folders()
        assert not tmp.parent.exists() and not system_tmp.exists()
        tmp.parent.mkdir()  # (what an os._exit never reaches: the block ending; recreate so it can end cleanly)
        tmp.write_bytes(b"whole")
    assert os.listdir(tmp_path / "out") == ["model.onnx"]
    files.remove_scratch_folders()  # nothing left registered: a no-op
    assert os.listdir(tmp_path / "out") == ["model.onnx"]


def test_an_exit_during_the_move_waits_until_everything_is_in_place(tmp_path, monkeypatch):
    events = []
    real_replace = os.replace

    def replace_and_signal(src, dst):
        real_replace(src, dst)
        events.append(os.path.basename(dst))
        os.kill(os.getpid(), signal.SIGTERM)  # arrives after the first file moved

    def handler(signum, frame):  # what the console's handler does, with os._exit replaced by a record
        files.exit_when_safe(lambda: events.append("exit"))

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        monkeypatch.setattr(files.os, "replace", replace_and_signal)
        with files.atomic_path(tmp_path / "model.onnx") as tmp:
            tmp.write_bytes(b"graph")
            (tmp.parent / "model.onnx.data").write_bytes(b"weights")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert events == ["model.onnx.data", "model.onnx", "exit"]  # held back until the primary was in place
    files.exit_when_safe(lambda: events.append("now"))  # no move under way: at once
    assert events[-1] == "now"
