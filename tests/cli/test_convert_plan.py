"""`tokenreduce convert --plan FILE` (in-process): the plan's settings are what is exported, the method's own
flags beside a plan are refused (never silently dropped), and the written file is the verified ONNX."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import tokenreduce

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models: a module:function source


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    return tokenreduce.Plan(settings={"method": "tome", "r": [3, 0, 2, 0]}, label="hand-written").save(
        tmp_path / "plan.json")


def test_convert_exports_the_plans_settings(plan_file: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    from tokenreduce.cli import main

    out = tmp_path / "vit.onnx"
    assert main(["convert", "tiny_models:vit", "--model-arg", "depth=4", "--plan", str(plan_file),
                 "-o", str(out), "--json"]) == 0
    data = json.loads(capfd.readouterr().out)
    assert data["report"]["tokens_per_block"] == [17, 14, 14, 12]  # r=3 at block 0, r=2 at block 2
    assert out.is_file()


def test_method_flags_beside_a_plan_are_refused(plan_file: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    from tokenreduce.cli import main

    out = tmp_path / "vit.onnx"
    assert main(["convert", "tiny_models:vit", "--model-arg", "depth=4", "--plan", str(plan_file), "--r", "2",
                 "-o", str(out)]) == 1
    assert "--plan fixes the method and its options; drop --r" in capfd.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("dims", "dynamic", "text"), [
    (["batch", 16], True, "dynamic batch"),  # a batch input beside tomesd's fixed-length draws
    (["batch", "batch"], True, "dynamic batch"),
    ([8, 16], False, "static batch 8"),
    ([], False, "static batch ?"),
])
def test_dynamic_batch_reads_the_inputs_that_carry_the_batch(dims: list[int | str], dynamic: bool, text: str) -> None:
    from tokenreduce.cli.convert import WrittenOnnx, batch_text

    written = WrittenOnnx(None, dims)
    assert written.dynamic_batch is dynamic
    assert batch_text(written).startswith(text)
