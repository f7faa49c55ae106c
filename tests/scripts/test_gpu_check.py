"""scripts/gpu_check.py's dry run, so the GPU check cannot rot while no GPU is lent.

The dry run is the same script on the CPU: the kernels under `TRITON_INTERPRET=1`, a tiny timm ViT and a
tiny Llama eagerly (about 30 s of CPU on two cores; its sections run in parallel). One run feeds every
test below; each reads the JSON (and the markdown) it wrote: every section present and passed, no error,
the environment recorded, every kernel covered on each dtype with finite errors within tolerance, the
model rows complete with finite, consistent numbers. The interpreter test's case tables are read by the
script with `ast`; a test checks that reading against the imported tables.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("timm")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.py"
SECTIONS = ("kernels", "vit", "decoder")
DTYPES = ("float32", "float16", "bfloat16")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENREDUCE_KERNELS", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(REPO)
    return env


def _load(name: str, path: Path):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--dry-run"], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert (out / "gpu_check.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    return {"proc": proc, "out": out, "report": report, "md": (out / "gpu_check.md").read_text()}


def _section(dry, name: str) -> dict:  # type: ignore[no-untyped-def]
    """The section's record, after checking it passed with no error (each test names its own section, so
    one broken section does not hide the state of the others)."""
    sec = dry["report"]["sections"][name]
    errors = [f"{e['where']}: {e['error']}\n{e['traceback'][-1500:]}" for e in sec["errors"]]
    assert not errors, "\n".join(errors)
    assert sec["status"] == "passed", (name, sec["status"], sec["skipped"])
    return sec


def _finite(x) -> bool:  # type: ignore[no-untyped-def]
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _numbers(obj):  # type: ignore[no-untyped-def]
    """Every number in a JSON tree, and every string the script writes for a non-finite float."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj
    elif obj in ("NaN", "Infinity", "-Infinity"):
        yield float(obj)


def test_every_section_passed_without_errors(dry):
    sections = dry["report"]["sections"]
    assert list(sections) == list(SECTIONS)
    for name in SECTIONS:
        sec = _section(dry, name)
        assert sec["skipped"] == [] and sec["dry_run"] is True and sec["results"], name
        assert (dry["out"] / f"{name}.json").exists() and (dry["out"] / f"{name}.log").exists()
        assert all(math.isfinite(x) for x in _numbers(sec)), name
    assert dry["proc"].returncode == 0 and "done in" in dry["proc"].stdout


def test_environment_recorded_per_section(dry):
    for sec in dry["report"]["sections"].values():
        env = sec["env"]
        assert set(env["versions"]) >= {"torch", "triton", "transformers", "timm", "onnxruntime"}
        assert env["versions"]["torch"] and env["versions"]["triton"] and env["versions"]["transformers"]
        assert env["date"][:2] == "20" and env["device"] == "cpu"
        assert env["gpu"] is None and env["capability"] is None


def test_kernels_ran_interpreted_and_within_tolerance(dry):
    sec = _section(dry, "kernels")
    assert set(sec["plan"]["interpreted"]) == {"attention._attn_fwd_kernel", "attention._attn_colsum_kernel",
                                               "attention._row_scores_kernel", "matching._match_kernel",
                                               "merge._merge_kernel"}
    assert all(sec["plan"]["interpreted"].values())
    results = sec["results"]
    assert all(r["pass"] for r in results)
    kernels = {r["kernel"] for r in results}
    assert kernels >= {"attention_with_scores", "bipartite_match + tome_plan", "apply_plan"}
    for kernel in ("attention_with_scores", "bipartite_match + tome_plan", "apply_plan"):
        for origin in ("interpreter", "realistic"):
            assert any(r["kernel"] == kernel and r["id"].startswith(origin) for r in results), (kernel, origin)
        for dt in DTYPES:  # every dtype on every kernel (args[5] / args[3]: the dtype field)
            assert any(r["kernel"] == kernel and dt in r["args"] for r in results), (kernel, dt)
    for r in results:
        for name, c in r["checks"].items():
            assert _finite(c["abs"]) and _finite(c["rel"]), (r["id"], name)
            assert c["abs"] <= c["atol"] or c["rel"] <= c["rtol"], (r["id"], name)
        if r["id"].startswith("realistic/"):
            assert _finite(r["kernel_ms"]) and _finite(r["reference_ms"]), r["id"]
        if "hatch_equal" in r:
            assert r["hatch_equal"] is True, r["id"]
    attn = [r for r in results if r["kernel"] == "attention_with_scores"]
    assert all({"out", "rows", "cols"} <= set(r["checks"]) for r in attn)
    assert any("query_row_scores" in r["checks"] for r in attn) and any("op out" in r["checks"] for r in attn)


def test_interpreter_tables_read_without_import_match_the_test_module():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        kernels = _load("gpu_check_kernels_under_test", REPO / "scripts" / "gpu_check_kernels.py")
    finally:
        sys.path.remove(str(REPO / "scripts"))
    tables = kernels.interpreter_tables()
    interp = _load("interpreter_tables_under_test", REPO / "tests" / "kernels" / "test_triton_interpreter.py")
    assert tables == {"ATTN": interp.ATTN, "MATCH": interp.MATCH, "MERGE": interp.MERGE}


def test_vit_rows_complete_and_consistent(dry):
    sec = _section(dry, "vit")
    plan = sec["plan"]
    rows = sec["results"]
    expected = {(m, s, i, b, f) for m in plan["models"] for s in plan["settings"] for i in plan["inners"]
                for b in plan["batches"] for f in ("on", "off")}
    assert {(r["model"], r["setting"], r["target"], r["batch"], r["fused"]) for r in rows} == expected
    for r in rows:
        for key in ("latency_unreduced_ms", "latency_reduced_ms", "speedup", "flops_ratio", "efficiency",
                    "iqr_unreduced_ms", "iqr_reduced_ms"):
            assert _finite(r[key]), (key, r)
        assert 0 < r["flops_ratio"] < 1
        assert r["latency_ratio"] == pytest.approx(1 / r["speedup"])
        assert r["efficiency"] == pytest.approx(r["speedup"] * r["flops_ratio"])
        assert r["output_finite"] and r["problems"] == [] and r["reduced_blocks"] > 0
        assert r["fusion_rewrites"] == 0  # CPU graphs never fuse (and "off" never may)
        if r["fused"] == "off":
            assert _finite(r["max_abs_diff_vs_fused_on"])


def test_decoder_rows_complete_and_consistent(dry):
    sec = _section(dry, "decoder")
    rows = sec["results"]
    plan = sec["plan"]
    assert {(r["method"], r["tokens"], r["fused"]) for r in rows} == {
        (m, n, f) for m in plan["methods"] for n in plan["tokens"] for f in ("on", "off")}
    for r in rows:
        for key in ("latency_unreduced_ms", "latency_reduced_ms", "speedup", "flops_ratio", "efficiency"):
            assert _finite(r[key]), (key, r)
        assert 0 < r["flops_ratio"] < 1 and r["efficiency"] == pytest.approx(r["speedup"] * r["flops_ratio"])
        assert min(r["tokens_per_block"]) < r["tokens"] and r["span_tokens"] > 0
        assert r["output_finite"] and r["problems"] == []


def test_markdown_has_every_section_and_case(dry):
    for name in SECTIONS:
        _section(dry, name)
    md = dry["md"]
    assert md.startswith("# tokenreduce GPU check (dry run, CPU)")
    for name in SECTIONS:
        assert f"## {name}: passed" in md
    for r in _section(dry, "kernels")["results"]:
        assert f"| {r['id']} |" in md
    assert "ERROR" not in md and "FAIL" not in md


def test_budget_cuts_are_listed_not_hidden(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--dry-run", "--sections", "vit",
                           "--budget", "vit=0"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sec = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["vit"]
    assert sec["status"] == "incomplete" and sec["results"] == [] and sec["errors"] == []
    assert len(sec["skipped"]) == len(sec["plan"]["settings"])
    assert all("time budget" in s["why"] for s in sec["skipped"])
    assert "skipped tiny eager tome_r13: time budget" in (tmp_path / "gpu_check.md").read_text()


def test_without_gpu_it_refuses_and_points_to_the_dry_run(tmp_path):
    env = dict(_env(), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


def test_gpu_budgets_fit_the_total():
    gpu_check = _load("gpu_check_under_test", SCRIPT)
    args = gpu_check.parse_args(["out"])
    budgets = gpu_check.parse_budgets([], dry_run=False)
    assert args.total == gpu_check.GPU_TOTAL_S and sum(budgets.values()) <= args.total
    assert gpu_check.GPU_TOTAL_S + gpu_check.GRACE_S["gpu"] < 8 * 60 - 20  # start-ups and the report
    assert [gpu_check.section_budget(n, args, budgets, 0.0) for n in gpu_check.SECTIONS] == [
        budgets[n] for n in gpu_check.SECTIONS]
    # an earlier section that ran long shortens the later ones, never below zero
    assert gpu_check.section_budget("vit", args, budgets, budgets["kernels"] + 50) == budgets["vit"] - 50
    assert gpu_check.section_budget("decoder", args, budgets, args.total - 10) == 10
    assert gpu_check.section_budget("decoder", args, budgets, args.total + 60) == 0
    with pytest.raises(SystemExit, match="SECTION=SECONDS"):
        gpu_check.parse_budgets(["vits=10"], dry_run=False)
