"""Command-line safety: no data loss, no code run from model files, nothing left behind, no invalid file passed.

Each test is a defect a user could hit (issue 18), checked the way a user meets it:

- `convert X -o X` (or an output that is a link to the input) is refused and the input survives; an output
  suffix that does not match `--to` is refused with the expected suffix.
- An output folder that cannot be written is found before the model is loaded, and the error names the
  output path.
- SIGTERM or Ctrl-C during a conversion leaves neither an output file nor a scratch folder (subprocesses).
- `inspect` of an empty ONNX file, or one without graph, opset or outputs, is an error exit.
- A `.pt2` archive whose loading would run code (a pickled weight, a symbolic shape sympy evaluates, guard
  code) is refused before torch reads it: the payload's side effect (creating a file) does not happen. The
  same payload does run when the user passes `trust_pickle=True`, which shows the test can fail.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tokenreduce import TokenReduceError
from tokenreduce.cli import main
from tokenreduce.sources import load_model, pt2_code_risks

TESTS = Path(__file__).resolve().parents[1]
CLI_DIR = TESTS / "cli"
REPO = TESTS.parent
if str(CLI_DIR) not in sys.path:
    sys.path.insert(0, str(CLI_DIR))  # tiny_models:NAME sources

NOT_LOADED = "tiny_models:not_a_model"  # loading it is an error of its own: an output error proves no load ran


def one_error(capfd: pytest.CaptureFixture[str]) -> str:
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenreduce: error: "), captured.err
    assert captured.out == ""
    return lines[0]


# ============================================================================================ .pt2 archives
class OpensAFile:
    """Unpickling this creates a file: the stand-in for any code a crafted archive runs."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuine torch.export.save archive of a small ViT with a dynamic batch."""
    from tiny_models import vit

    model, (x,) = vit(depth=1)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    path = tmp_path_factory.mktemp("pt2") / "vit.pt2"
    torch.export.save(ep, path)
    return path


def rewrite(src: Path, dst: Path, edit: Callable[[str, bytes], bytes]) -> Path:
    """Copy a .pt2 archive entry by entry through `edit(name without the archive folder, data)`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            zout.writestr(name, edit(name.split("/", 1)[1], zin.read(name)))
    return dst


def with_pickled_weight(src: Path, dst: Path, side_effect: Path) -> Path:
    """The first weight marked `use_pickle` (as torch.export.save marks tensor subclasses) and replaced by
    a torch.save'd object whose unpickling creates `side_effect`."""
    payload = io.BytesIO()
    torch.save(OpensAFile(side_effect), payload)
    config = json.loads(zipfile.ZipFile(src).read(f"{src.stem}/data/weights/model_weights_config.json"))
    fqn, meta = next(iter(config["config"].items()))
    meta["use_pickle"] = True
    target = meta["path_name"]

    def edit(name: str, data: bytes) -> bytes:
        if name == "data/weights/model_weights_config.json":
            return json.dumps(config).encode()
        if name == f"data/weights/{target}":
            return payload.getvalue()
        return data

    return rewrite(src, dst, edit)


def test_genuine_archive_has_no_code_and_loads(program: Path) -> None:
    assert pt2_code_risks(program) == []
    src = load_model(str(program), batch=3)
    assert list(src.example_args[0].shape) == [3, 3, 32, 32]
    assert src.model(*src.example_args).shape == (3, 5)


def test_pickled_weight_is_refused_before_anything_runs(program: Path, tmp_path: Path,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    side_effect = tmp_path / "code-ran"
    evil = with_pickled_weight(program, tmp_path / "evil.pt2", side_effect)
    assert main(["inspect", str(evil)]) == 1
    line = one_error(capfd)
    assert "would run code while loading: a pickled weight" in line and "nothing was loaded" in line
    assert "(to fix: --trust-pickle)" in line
    assert not side_effect.exists()
    with pytest.raises(TokenReduceError, match="pickled weight") as info:
        load_model(str(evil))
    assert info.value.hint == "trust_pickle=True"
    assert not side_effect.exists()
    # the payload is live: torch's loader runs it once the user vouches for the file
    with pytest.raises(Exception):  # noqa: B017 - the weight is no tensor, so loading fails after the code ran
        load_model(str(evil), trust_pickle=True)
    assert side_effect.exists()


def test_symbolic_shape_code_is_refused(program: Path, tmp_path: Path) -> None:
    side_effect = tmp_path / "sympy-ran"
    payload = f"Max(\\\"__import__('builtins').open('{side_effect}', 'w')\\\", 1)"

    def edit(name: str, data: bytes) -> bytes:
        if name == "models/model.json":
            text = data.decode()
            symbol = text[text.index("Symbol('s"):].split(")", 1)[0] + ")"
            return text.replace(symbol, payload).encode()
        return data

    evil = rewrite(program, tmp_path / "sympy.pt2", edit)
    risks = pt2_code_risks(evil)
    assert risks and "symbolic shape that sympy would evaluate as code" in risks[0]
    with pytest.raises(TokenReduceError, match="would run code"):
        load_model(str(evil))
    assert not side_effect.exists()
    with pytest.raises(Exception):  # noqa: B017 - the shape is then no integer, after the code ran
        load_model(str(evil), trust_pickle=True)
    assert side_effect.exists()


def test_guard_code_is_refused(program: Path, tmp_path: Path) -> None:
    side_effect = tmp_path / "guard-ran"

    def edit(name: str, data: bytes) -> bytes:
        if name == "models/model.json":
            doc = json.loads(data)
            doc["guards_code"] = [f"open('{side_effect}', 'w') is not None"]
            return json.dumps(doc).encode()
        return data

    evil = rewrite(program, tmp_path / "guard.pt2", edit)
    assert any("guard code" in r for r in pt2_code_risks(evil))
    with pytest.raises(TokenReduceError, match="would run code"):
        load_model(str(evil))
    assert not side_effect.exists()


def test_other_code_carriers_are_named(program: Path, tmp_path: Path) -> None:
    carriers = rewrite(program, tmp_path / "carriers.pt2", lambda name, data: data)
    with zipfile.ZipFile(carriers, "a") as z:  # entries live under the archive's folder, named after the file
        z.writestr(f"{program.stem}/data/weights/model.pt", b"a legacy pickled state dict")
        z.writestr(f"{program.stem}/data/aotinductor/model/model.so", b"\x7fELF")
    risks = pt2_code_risks(carriers)
    assert any("compiled native code" in r for r in risks)
    assert any("pickled legacy file data/weights/model.pt" in r for r in risks)
    old = tmp_path / "old.pt2"
    with zipfile.ZipFile(old, "w") as z:
        z.writestr("old/version", b"8.0")
    assert "older torch.export format" in pt2_code_risks(old)[0]
    not_zip = tmp_path / "garbage.pt2"
    not_zip.write_bytes(b"garbage")
    with pytest.raises(TokenReduceError, match="not a torch.export archive"):
        pt2_code_risks(not_zip)


def test_help_says_which_sources_run_code(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "--help"]) == 0
    out = " ".join(capfd.readouterr().out.split())
    assert "--trust-pickle" in out
    assert "Code runs from: module:function" in out and "a .pt2 file loaded with --trust-pickle" in out


# ============================================================================================ output paths
def test_output_that_is_the_input_is_refused(program: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model.pt2"
    model.write_bytes(program.read_bytes())
    before = model.read_bytes()
    for output in (model, tmp_path / "sub" / ".." / "model.pt2"):
        assert main(["convert", str(model), "--r", "2", "-o", str(output)]) == 1
        assert "is the input file" in one_error(capfd)
    link = tmp_path / "latest.onnx"
    link.symlink_to(model)
    assert main(["convert", str(model), "--r", "2", "-o", str(link)]) == 1
    assert "is the input file" in one_error(capfd)
    assert model.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.onnx", "model.pt2"]


@pytest.mark.parametrize(("to", "output", "expected"), [
    ("onnx", "model.pt2", "does not end in .onnx, the suffix of --to onnx files; give e.g. -o {dir}/model.onnx"),
    ("tensorrt", "model.onnx", "does not end in .engine, the suffix of --to tensorrt files"),
])
def test_output_suffix_must_match_the_target(tmp_path: Path, capfd: pytest.CaptureFixture[str], to: str, output: str,
                                             expected: str) -> None:
    assert main(["convert", NOT_LOADED, "--r", "2", "--to", to, "-o", str(tmp_path / output)]) == 1
    assert expected.format(dir=tmp_path) in one_error(capfd)
    assert list(tmp_path.iterdir()) == []


def test_output_under_a_file_is_refused_before_loading(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    out = blocker / "vit.onnx"
    assert main(["convert", NOT_LOADED, "--r", "2", "-o", str(out)]) == 1
    line = one_error(capfd)
    assert f"cannot write {out}: {blocker} is a file, not a folder" in line


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (read-only even for root)")
def test_read_only_location_is_refused_before_loading(capfd: pytest.CaptureFixture[str]) -> None:
    out = Path("/proc/tokenreduce-test/vit.onnx")
    assert main(["convert", NOT_LOADED, "--r", "2", "-o", str(out)]) == 1
    line = one_error(capfd)
    assert f"cannot write {out}: /proc is not writable" in line
    assert ".tokenreduce-" not in line  # named by the output, not by a scratch folder


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_folder_without_write_permission_is_refused_before_loading(tmp_path: Path,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["convert", NOT_LOADED, "--r", "2", "-o", str(locked / "out" / "vit.onnx")]) == 1
        assert f"cannot write {locked / 'out' / 'vit.onnx'}: {locked} is not writable" in one_error(capfd)
    finally:
        locked.chmod(0o755)


# ============================================================================================ interrupts
def _start_convert(out_dir: Path) -> subprocess.Popen[str]:
    script = Path(sys.executable).with_name("tokenreduce")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "tokenreduce"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CLI_DIR), str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([*cmd, "convert", "tiny_models:vit", "--model-arg", "depth=1", "--method", "tome", "--r",
                             "2", "--no-progress", "-o", str(out_dir / "vit.onnx")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=CLI_DIR,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if we ignore it


@pytest.mark.parametrize(("sig", "code", "said"), [(signal.SIGTERM, 143, "terminated"),
                                                   (signal.SIGINT, 130, "interrupted")], ids=["SIGTERM", "SIGINT"])
def test_interrupted_convert_leaves_nothing(tmp_path: Path, sig: signal.Signals, code: int, said: str) -> None:
    for _ in range(3):  # the signal must land mid-export; a run that finished first lost the race: go again
        proc, err = _interrupt_convert(tmp_path, sig)
        if proc.returncode != 0:
            break
        for p in tmp_path.iterdir():
            p.unlink()
    assert proc.returncode == code, err
    assert f"tokenreduce: {said}" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no output, no partial file, no scratch folder


def _interrupt_convert(tmp_path: Path, sig: signal.Signals) -> tuple[subprocess.Popen[str], str]:
    proc = _start_convert(tmp_path)
    deadline = time.monotonic() + 300
    try:
        while not any(p.name.startswith(".tokenreduce-") for p in tmp_path.iterdir()):  # the export has begun
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the conversion never reached the export"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, err


# ============================================================================================ ONNX files
def _onnx_model(*, outputs: bool = True, opset: bool = True) -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y] if outputs else [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)] if opset else [])
    if not opset:
        del model.opset_import[:]
    return bytes(model.SerializeToString())


@pytest.mark.parametrize(("content", "why"), [
    (b"", "the model has no graph"),
    (_onnx_model(outputs=False), "the graph has no outputs"),
    (_onnx_model(opset=False), "the model imports no opset"),
], ids=["empty", "no-outputs", "no-opset"])
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "default"])
def test_invalid_onnx_file_is_an_error(tmp_path: Path, capfd: pytest.CaptureFixture[str], content: bytes, why: str,
                                       strict: bool) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    assert main(["inspect", str(path), *(["--strict"] if strict else [])]) == 1
    line = one_error(capfd)
    assert line.startswith(f"tokenreduce: error: {path} is not a valid ONNX model: ") and why in line


def test_valid_small_onnx_file_passes(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "relu.onnx"
    path.write_bytes(_onnx_model())
    assert main(["inspect", str(path), "--strict"]) == 0
    assert "static check: OK" in capfd.readouterr().out
