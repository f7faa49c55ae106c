"""Plan files: round trip, refusals, and every entry point that takes one (compile, Settings, Dynamo backend)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_timm_vit

import tokenreduce
from tokenreduce.errors import TokenReduceError
from tokenreduce.methods.plan import FORMAT, VERSION, Plan, as_plan
from tokenreduce.methods.settings import Settings


@pytest.fixture(scope="module")
def vit():
    return make_timm_vit(img_size=64)


def _plan() -> Plan:
    return Plan(settings={"method": "tome", "r": [8, 6, 4, 0]}, label="ToMe greedy r=8,6,4,0",
                budget={"flops": 0.7}, measured={"flops_ratio": 0.66, "fidelity": 0.99, "metric": "output cosine"},
                model="tiny", notes=["a note"], candidates=[{"label": "x", "fidelity": 1.0, "flops_ratio": 1.0}])


def test_round_trip(tmp_path):
    p = _plan()
    path = p.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["version"] == VERSION
    q = Plan.load(path)
    assert q.to_dict() == p.to_dict()
    assert as_plan(str(path)).settings == {"method": "tome", "r": [8, 6, 4, 0]}
    assert as_plan(data).label == p.label


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.update(format="other"), "not a tokenreduce plan"),
    (lambda d: d.update(version=VERSION + 1), "version"),
    (lambda d: d["settings"].update(r=-1), "r must be >= 0"),
    (lambda d: d["settings"].update(keep_ratio=0.5), "not a tome one"),
    (lambda d: d.update(budget={"flops": 1.5}), "budget"),
])
def test_bad_plans_are_refused(tmp_path, edit, needle):
    data = _plan().to_dict()
    edit(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TokenReduceError, match=needle):
        Plan.load(path)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(TokenReduceError, match="not found"):
        Plan.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TokenReduceError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")


def test_settings_from_plan_and_overrides(tmp_path):
    path = _plan().save(tmp_path / "plan.json")
    s = Settings.from_options(plan=str(path), inner="eager", unmerge=True)
    assert s.method == "tome" and s.opts.r == (8, 6, 4, 0) and s.inner == "eager" and s.unmerge
    with pytest.raises(TokenReduceError, match="r cannot be given beside plan="):
        Settings.from_options(plan=str(path), r=3)
    with pytest.raises(TokenReduceError, match="method cannot be given"):
        Settings.from_options({"plan": _plan(), "method": "evit"})


def test_compile_with_plan_equals_compile_with_its_settings(vit, tmp_path):
    x = torch.randn(2, 3, 64, 64)
    path = _plan().save(tmp_path / "plan.json")
    a = tokenreduce.compile(vit, (x,), plan=path, inner="eager")
    b = tokenreduce.compile(vit, (x,), method="tome", r=[8, 6, 4, 0], inner="eager")
    assert a.report.tokens_per_block == b.report.tokens_per_block
    assert [blk.tokens_out for blk in a.report.blocks] == [57, 51, 47, 47]
    assert a.report.flops_ratio == pytest.approx(b.report.flops_ratio)
    with torch.inference_mode():
        torch.testing.assert_close(a(x), b(x))


def test_dynamo_backend_takes_a_plan(vit, tmp_path):
    x = torch.randn(2, 3, 64, 64)
    path = _plan().save(tmp_path / "plan.json")
    torch._dynamo.reset()
    fast = torch.compile(vit, backend="tokenreduce", options={"plan": str(path), "inner": "eager"})
    with torch.inference_mode():
        out = fast(x)
        ref = tokenreduce.compile(vit, (x,), method="tome", r=[8, 6, 4, 0], inner="eager")(x)
    torch.testing.assert_close(out, ref)
    report = tokenreduce.backend_stats().last_report
    assert report is not None and [b.tokens_out for b in report.blocks] == [57, 51, 47, 47]
