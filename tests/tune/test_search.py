"""`tokenreduce.tune`: the search finds the exact optimum where it can be enumerated, respects the budget, uses
the user's metric, resumes from its cache, and chooses by measured latency for a latency budget.

The references are computed here independently: every constant-r ToMe setting compiled through the public
`tokenreduce.compile` and scored with the metric written out in the test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_timm_vit

import tokenreduce
from tokenreduce.errors import TokenReduceError
from tokenreduce.tuning import measure, pareto, parse_budget, tune
from tokenreduce.tuning.search import MARGIN, pareto_front
from tokenreduce.tuning.space import ModelShape, decreasing_schedule, sigmoid_schedule


@pytest.fixture(scope="module")
def vit():
    return make_timm_vit(img_size=48)  # 36 patches + CLS, 4 blocks


@pytest.fixture(scope="module")
def calib():
    return torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def every_constant_r(vit, calib):
    """(r, full output, reduced output, FLOPs ratio) of every valid constant-r ToMe setting, via the public API."""
    with torch.inference_mode():
        full = vit(calib)
    out = []
    for r in range(1, 40):
        try:
            red = tokenreduce.compile(vit, (calib,), method="tome", r=r, inner="eager")
        except TokenReduceError:
            break  # r too large for a block: so is every larger r
        with torch.inference_mode():
            out.append((r, full, red(calib), red.report.flops_ratio))
    assert len(out) == 7
    return out


def _best(rows, budget, score):
    return max((row for row in rows if row[3] <= budget), key=lambda row: score(row[1], row[2]))


def test_finds_the_exact_optimum_of_an_enumerable_space(vit, calib, every_constant_r):
    def cosine(full, red):
        return float(F.cosine_similarity(full.flatten(1), red.flatten(1), dim=-1).mean())

    best_r, full, red, _ = _best(every_constant_r, 0.7, cosine)
    plan = tune(vit, calib, {"flops": 0.7}, methods=["tome"], families=["constant"], calib_batch=4)
    assert plan.settings == {"method": "tome", "r": best_r}
    assert plan.measured["fidelity"] == pytest.approx(cosine(full, red), abs=1e-5)
    # every candidate that could fit was evaluated (the estimate only skips those far over the budget)
    assert {r["settings"]["r"] for r in plan.candidates} >= {row[0] for row in every_constant_r if row[3] <= 0.7}
    reduced = tokenreduce.compile(vit, (calib,), plan=plan, inner="eager")
    assert reduced.report.flops_ratio <= 0.7
    assert reduced.report.flops_ratio == pytest.approx(plan.measured["flops_ratio"])


def test_user_metric_decides(vit, calib, every_constant_r):
    def neg_max_err(full, red):  # higher is better
        return -float((full - red).abs().max())

    best_r = _best(every_constant_r, 0.8, neg_max_err)[0]
    plan = tune(vit, calib, "flops=0.8", methods=["tome"], families=["constant"], metric=neg_max_err)
    assert plan.settings["r"] == best_r
    assert plan.measured["metric"] == "neg_max_err"


def test_full_search_respects_the_budget_and_tries_every_family(vit, calib, tmp_path):
    # ToMe's three schedule families and EViT's keep-ratio family: four (method, family) groups, so the four
    # candidate slots, taken in turn from each group, cover all of them
    plan = tune(vit, calib, {"flops": 0.6}, methods=["tome", "evit"], max_candidates=4, greedy_groups=2,
                calib_batch=2)
    families = {r["family"] for r in plan.candidates}
    assert {"greedy"} <= families and len(families) >= 3
    assert {r["method"] for r in plan.candidates} >= {"tome", "evit"}
    chosen = [r for r in plan.candidates if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["flops_ratio"] <= 0.6
    assert max(r["fidelity"] for r in plan.candidates if r["flops_ratio"] <= 0.6) == chosen[0]["fidelity"]
    reduced = tokenreduce.compile(vit, (calib[:2],), plan=plan, inner="eager")
    assert reduced.report.flops_ratio <= 0.6
    # plot and table are drawn from the plan's rows
    png = pareto.plot(plan, tmp_path / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = pareto.table(plan)
    assert "**chosen**" in text and chosen[0]["label"] in text


def test_cache_resumes_without_recompiling(vit, calib, tmp_path, monkeypatch):
    cache = tmp_path / "cache.json"
    first = tune(vit, calib, {"flops": 0.75}, methods=["tome"], families=["constant"], cache=cache)
    calls = []
    original = measure.Evaluator.rewrite
    monkeypatch.setattr(measure.Evaluator, "rewrite", lambda self, c: calls.append(c) or original(self, c))
    second = tune(vit, calib, {"flops": 0.75}, methods=["tome"], families=["constant"], cache=cache)
    assert calls == []
    assert second.settings == first.settings and all(r["cached"] for r in second.candidates)
    # candidates the cache holds cost nothing, so max_candidates does not cut them: the same rows and plan
    third = tune(vit, calib, {"flops": 0.75}, methods=["tome"], families=["constant"], cache=cache, max_candidates=1)
    assert calls == []
    assert len(first.candidates) > 1 and {r["label"] for r in third.candidates} == {r["label"] for r in first.candidates}
    assert third.settings == first.settings
    # other calibration inputs are other measurements
    tune(vit, calib[:3], {"flops": 0.75}, methods=["tome"], families=["constant"], cache=cache)
    assert calls


def test_latency_budget_chooses_by_measured_latency(vit, calib, monkeypatch):
    measured = []

    def fake_measure(self, c):  # a stand-in target: latency = FLOPs ratio + 0.1 (overheads), deterministic
        red = tokenreduce.compile(vit, (calib[:1],), **c.settings, inner="eager")
        measured.append(c.key)
        ratio = red.report.flops_ratio + 0.1
        return {"latency_ratio": ratio, "unreduced_ms": 10.0, "reduced_ms": 10 * ratio, "iqr_reduced_ms": 0.0}

    monkeypatch.setattr(measure.LatencyMeter, "measure", fake_measure)
    plan = tune(vit, calib, {"latency": 0.75}, "eager", methods=["tome"], families=["constant"], max_measured=8)
    assert plan.measured["latency_ratio"] <= 0.75
    rows = plan.candidates
    timed = [r for r in rows if r.get("latency_ratio") is not None]
    assert len(timed) == len(measured) <= 8 + 2  # two anchors plus at most max_measured
    fits = [r for r in timed if r["latency_ratio"] <= 0.75]
    assert plan.measured["fidelity"] == max(r["fidelity"] for r in fits)
    # every candidate with a better fidelity than the chosen one was measured over budget or predicted far over
    for r in rows:
        if r["fidelity"] > plan.measured["fidelity"]:
            assert r.get("latency_ratio") is None or r["latency_ratio"] > 0.75


def test_cached_latencies_do_not_count_against_max_measured(vit, calib, monkeypatch):
    """A measurement the cache already holds costs nothing, so max_measured bounds only new ones: where an
    unbounded search needs several measurements after its anchors, max_measured=1 reaches the same plan when
    every latency is cached, and does not when they are new."""
    calls = []

    def fake(cached):
        def measure_(self, c):  # FLOPs ratio + 0.1, and a per-block schedule is 0.1 slower than the line predicts
            red = tokenreduce.compile(vit, (calib[:1],), **c.settings, inner="eager")
            ratio = red.report.flops_ratio + 0.1 + (0.1 if isinstance(c.settings["r"], list) else 0.0)
            calls.append(c.key)
            return {"latency_ratio": ratio, "unreduced_ms": 10.0, "reduced_ms": 10 * ratio, "iqr_reduced_ms": 0.0,
                    "cached": cached}
        return measure_

    space = {"methods": ["tome"], "families": ["constant", "decreasing"]}
    monkeypatch.setattr(measure.LatencyMeter, "measure", fake(False))
    unbounded = tune(vit, calib, {"latency": 0.8}, "eager", **space, max_measured=100)
    assert len(calls) > 2 + 1  # the two anchors, then more than one measurement to find the plan
    try:
        new = tune(vit, calib, {"latency": 0.8}, "eager", **space, max_measured=1).settings
    except TokenReduceError:
        new = None
    assert new != unbounded.settings
    monkeypatch.setattr(measure.LatencyMeter, "measure", fake(True))
    assert tune(vit, calib, {"latency": 0.8}, "eager", **space, max_measured=1).settings == unbounded.settings


def test_a_cached_latency_beats_the_line_prediction(vit, calib, monkeypatch):
    """The FLOPs-to-latency line only decides which candidates are worth a new measurement: one whose latency
    is already cached is read, even where the line predicts it over budget. Here per-block schedules run far
    faster than the constant-r anchors' line predicts, so the best plan is a schedule above the FLOPs ratio the
    line allows."""
    def measure_(self, c):
        red = tokenreduce.compile(vit, (calib[:1],), **c.settings, inner="eager")
        ratio = red.report.flops_ratio + (-0.4 if isinstance(c.settings["r"], list) else 0.1)
        return {"latency_ratio": ratio, "unreduced_ms": 10.0, "reduced_ms": 10 * ratio, "iqr_reduced_ms": 0.0,
                "cached": True}

    monkeypatch.setattr(measure.LatencyMeter, "measure", measure_)
    monkeypatch.setattr(measure.LatencyMeter, "cached", lambda self, c: True)
    plan = tune(vit, calib, {"latency": 0.75}, "eager", methods=["tome"], families=["constant", "decreasing"],
                max_measured=3)
    assert isinstance(plan.settings["r"], list) and plan.measured["latency_ratio"] <= 0.75
    assert plan.measured["flops_ratio"] + 0.1 > 0.75 + MARGIN  # what the anchors' line predicts: over budget


def test_each_method_is_predicted_by_its_own_latency_line(vit, calib, monkeypatch):
    """What MiniLM at 12 tokens showed on onnxruntime: ToMe's merging costs more than it saves (slower than the
    full model at every r), EViT's pruning does save. The ToMe anchors' line says no FLOPs ratio meets the
    budget; EViT, not measured yet, is predicted by its own (latency proportional to FLOPs) and measured, and
    wins. The refusal names how many candidates the lines skipped."""
    def measure_(self, c):
        red = tokenreduce.compile(vit, (calib[:1],), **c.settings, inner="eager")
        ratio = 1.13 if c.settings["method"] == "tome" else red.report.flops_ratio
        return {"latency_ratio": ratio, "unreduced_ms": 10.0, "reduced_ms": 10 * ratio, "iqr_reduced_ms": 0.0}

    monkeypatch.setattr(measure.LatencyMeter, "measure", measure_)
    plan = tune(vit, calib, {"latency": 0.8}, "eager", methods=["tome", "evit"], families=["constant", "keep-ratio"],
                max_measured=4)
    assert plan.settings["method"] == "evit" and plan.measured["latency_ratio"] <= 0.8
    with pytest.raises(TokenReduceError, match=r"\(0 new measurement\(s\) of at most 4; \d+ candidate\(s\) were not "
                                               r"measured because their method's latency line"):
        tune(vit, calib, {"latency": 0.8}, "eager", methods=["tome"], families=["constant"], max_measured=4)


def test_an_anchor_within_the_budget_is_chosen_when_no_measurement_is_left(vit, calib, monkeypatch):
    """The DINOv2-S run at 0.8: the anchor ToMe r=9 measured 0.794, six higher-fidelity candidates used up
    `max_measured` over the budget, and the search refused while holding a plan within it. With
    max_measured=0 only the two anchors are measured; the one within the budget is the plan."""
    calls = []

    def measure_(self, c):
        red = tokenreduce.compile(vit, (calib[:1],), **c.settings, inner="eager")
        calls.append(c.key)
        ratio = red.report.flops_ratio + 0.1
        return {"latency_ratio": ratio, "unreduced_ms": 10.0, "reduced_ms": 10 * ratio, "iqr_reduced_ms": 0.0}

    monkeypatch.setattr(measure.LatencyMeter, "measure", measure_)
    plan = tune(vit, calib, {"latency": 0.75}, "eager", methods=["tome"], families=["constant", "decreasing"],
                max_measured=0)
    assert len(calls) == 2 and plan.measured["latency_ratio"] <= 0.75
    timed = [r for r in plan.candidates if r.get("latency_ratio") is not None]
    assert plan.measured["fidelity"] == max(r["fidelity"] for r in timed if r["latency_ratio"] <= 0.75)


def test_refusals(vit, calib):
    with pytest.raises(TokenReduceError, match="latency budget is measured on a target"):
        tune(vit, calib, {"latency": 0.5})
    with pytest.raises(TokenReduceError, match="f in \\(0, 1\\)"):
        parse_budget({"flops": 1.5})
    with pytest.raises(TokenReduceError, match="one of them"):
        parse_budget({"flops": 0.5, "latency": 0.5})
    with pytest.raises(TokenReduceError, match="no schedule candidate is estimated to reach FLOPs ratio 0.050"):
        tune(vit, calib, {"flops": 0.05}, methods=["tome"], families=["constant"])
    with pytest.raises(TokenReduceError, match="fastv prunes the prefill"):
        tune(vit, calib, {"flops": 0.5}, methods=["fastv"])


def test_pareto_front():
    rows = [{"flops_ratio": 0.5, "fidelity": 0.9}, {"flops_ratio": 0.6, "fidelity": 0.95},
            {"flops_ratio": 0.6, "fidelity": 0.8}, {"flops_ratio": 0.7, "fidelity": 0.94}]
    assert pareto_front(rows) == [rows[0], rows[1]]


def test_schedules_stay_within_each_blocks_limit(vit):
    from tokenreduce.analysis.encoder import analyse
    from tokenreduce.compiler.capture import export_graph
    from tokenreduce.methods.tome import r_schedule

    gm = export_graph(vit, (torch.randn(2, 3, 48, 48),), {}, dynamic_batch=True).gm
    shape = ModelShape.of(analyse(gm))
    assert (shape.num_blocks, shape.num_tokens, shape.num_protected) == (4, 37, 1)
    assert shape.largest_constant_r() == 7  # 37 -> 30 -> 23 -> 16 -> 9; r=8 fails at the 4th block (13 tokens)
    assert decreasing_schedule(shape, 8) == r_schedule(8, 4, "decreasing")
    for keep in (0.1, 0.5, 0.9):
        r = sigmoid_schedule(shape, keep, 2.0, 1.5)
        n = 37
        for ri in r:
            assert 0 <= ri <= (n - 1) // 2
            n -= ri
        assert abs((n - 1) - round(36 * keep)) <= 1 or keep < 0.2  # ends near `keep` of the candidates
