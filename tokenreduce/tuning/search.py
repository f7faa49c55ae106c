"""`tokenreduce.tune`: choose the method and per-block schedule that keeps a model closest to itself within a
FLOPs or measured-latency budget on the deployment target.

The search, in order (each step only spends what the time budget leaves):

1. Capture the model once; list the schedule candidates of every registered encoder method (`tuning/space.py`)
   with their estimated FLOPs ratio; drop those that cannot fit (estimate above the budget plus a margin) and
   keep the `max_candidates` closest to it.
2. Evaluate each: fidelity to the full model on the calibration inputs and the compiler's FLOPs count.
3. Greedy per-layer refinement in the style of G-Search for the merging method that did best: starting from no
   reduction, each step adds merges to one group of consecutive blocks, the group whose step costs the least
   fidelity per FLOP removed, until the schedule reaches the budget.
4. Choose. FLOPs budget: the highest fidelity whose counted FLOPs ratio is within it. Latency budget: walk the
   candidates from the highest fidelity down, skip those their method's latency-vs-FLOPs line (fitted to that
   method's measured rows, refitted after every measurement; latency proportional to FLOPs for a method not yet
   measured) predicts to be far over, measure the rest on the
   target (interleaved, medians) until one is within the budget; at most `max_measured` measurements. With a target given, the chosen plan and the Pareto front are measured too.

Refuses a budget no candidate meets (the error names the smallest ratio reached and what to change), and a
model with no reducible block (the analysis's reasons).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx

from tokenreduce.analysis.encoder import analyse
from tokenreduce.errors import TokenReduceError
from tokenreduce.methods import registry
from tokenreduce.methods.plan import Plan
from tokenreduce.tuning.measure import Cache, Evaluator, LatencyMeter, Metric, calibration_batches
from tokenreduce.tuning.space import (
    FAMILIES,
    Candidate,
    ModelShape,
    candidate,
    label_of,
    proxy_of,
    r_label,
    schedule_candidates,
    tunable,
)
from tokenreduce.util.batch import batch_of

BUDGET_KINDS = ("flops", "latency")
MARGIN = 0.05  # estimates above budget + MARGIN are never compiled; measured latency within it is re-checked


def parse_budget(budget: Any) -> tuple[str, float]:
    """`{"flops": 0.5}`, `{"latency": 0.6}` or the strings "flops=0.5" / "latency=0.6"."""
    if isinstance(budget, str):
        kind, _, value = budget.partition("=")
        try:
            budget = {kind.strip(): float(value)}
        except ValueError:
            budget = None
    if not isinstance(budget, Mapping) or len(budget) != 1:
        raise TokenReduceError(f"budget must be {{'flops': f}} or {{'latency': f}} (one of them), got {budget!r}",
                               setting="budget")
    kind, value = next(iter(budget.items()))
    if kind not in BUDGET_KINDS or isinstance(value, bool) or not isinstance(value, int | float) \
            or not 0.0 < value < 1.0:
        raise TokenReduceError(f"budget must be flops=f or latency=f with f in (0, 1) (a ratio of the full model), "
                               f"got {kind}={value!r}", setting="budget")
    return kind, float(value)


def pareto_front(rows: Sequence[dict[str, Any]], x: str = "flops_ratio") -> list[dict[str, Any]]:
    """Rows no other row beats on both `x` (lower is better) and fidelity (higher is better)."""
    front, best = [], -math.inf
    for r in sorted(rows, key=lambda r: (r[x], -r["fidelity"])):
        if r["fidelity"] > best:
            front.append(r)
            best = r["fidelity"]
    return front


class Search:
    """One tuning run's state: the evaluator, the rows measured so far, the clock and the progress bar."""

    def __init__(self, ev: Evaluator, shape: ModelShape, deadline: float | None, progress: Any,
                 log: Callable[[str], None]) -> None:
        self.ev, self.shape, self.deadline, self.bar, self.log = ev, shape, deadline, progress, log
        self.rows: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.out_of_time = False

    def time_left(self) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline:
            if not self.out_of_time:
                self.notes.append(f"time budget reached after {len(self.rows)} candidates; the rest were not tried")
                self.out_of_time = True
            return False
        return True

    def evaluate(self, c: Candidate) -> dict[str, Any] | None:
        if c.key in self.rows:
            return self.rows[c.key]
        if not self.time_left():
            return None
        try:
            value = self.ev.evaluate(c)
        except TokenReduceError as exc:  # e.g. a schedule a block refuses: noted, the search goes on
            self.notes.append(f"{c.label}: refused ({exc})")
            return None
        finally:
            if self.bar is not None:
                self.bar.update(1)
        row = {"label": c.label, "method": c.method, "family": c.family, "settings": c.settings,
               "flops_proxy": proxy_of(self.shape, c), **value, "candidate": c}
        self.rows[c.key] = row
        self.log(f"{c.label}: fidelity {row['fidelity']:.4f}, FLOPs ratio {row['flops_ratio']:.3f}"
                 + (" (cached)" if value.get("cached") else ""))
        return row

    def greedy(self, method: str, flops_target: float, steps: int = 6, groups: int = 4) -> None:
        """G-Search-style refinement of one merging method's per-block r (see the module docstring)."""
        shape, nb = self.shape, self.shape.num_blocks
        on = [i for i in range(nb) if shape.reducible[i]]
        if not on:
            return
        g = max(1, min(groups, len(on)))
        parts = [on[len(on) * k // g:len(on) * (k + 1) // g] for k in range(g)]
        need = next((r for r in range(1, shape.largest_constant_r() + 1)
                     if shape.flops_proxy(shape.clip_schedule([r] * nb)) <= flops_target), shape.largest_constant_r())
        delta = max(1, round(need * g / steps))
        label = label_of(registry.encoder(method))
        r = [0] * nb
        fid, proxy = 1.0, 1.0
        for _ in range(steps * 3):
            if proxy <= flops_target or not self.time_left():
                break
            best: tuple[float, list[int], float, float] | None = None
            for part in parts:
                trial = shape.clip_schedule([r[i] + (delta if i in part else 0) for i in range(nb)])
                if trial == r:
                    continue
                c = candidate(method, "greedy", r_label(label, "greedy", trial), r=trial)
                row = self.evaluate(c)
                if row is None:
                    continue
                p = row["flops_ratio"]  # the compiler's count, not the estimate
                cost = (fid - row["fidelity"]) / max(proxy - p, 1e-9)
                if best is None or cost < best[0]:
                    best = (cost, trial, row["fidelity"], p)
            if best is None:
                break
            _, r, fid, proxy = best
        if proxy <= flops_target:
            self.polish(method, label, r, fid, parts, max(1, delta // 2), flops_target)

    def polish(self, method: str, label: str, r: list[int], fid: float, parts: list[list[int]], step: int,
               flops_target: float) -> None:
        """After the greedy steps overshoot the target: give back `step` merges in the one group where that
        gains the most fidelity while the schedule stays within the target; repeat while it helps."""
        shape = self.shape
        for _ in range(len(parts)):
            best: tuple[float, list[int]] | None = None
            for part in parts:
                trial = shape.clip_schedule([max(0, r[i] - (step if i in part else 0)) for i in range(len(r))])
                if trial == r or not any(trial):
                    continue
                row = self.evaluate(candidate(method, "greedy", r_label(label, "greedy", trial), r=trial))
                if row is not None and row["flops_ratio"] <= flops_target and row["fidelity"] > fid \
                        and (best is None or row["fidelity"] > best[0]):
                    best = (row["fidelity"], trial)
            if best is None:
                return
            fid, r = best


def tune(model: torch.nn.Module, calib_inputs: Any, budget: Any, target: str | None = None, *, batch: int = 1,
         metric: Metric | None = None, methods: Sequence[str] | None = None, families: Sequence[str] | None = None,
         settings: Mapping[str, Any] | None = None, calib_batch: int = 16, cache: Any = None,
         time_budget_s: float | None = None, max_candidates: int = 40, max_measured: int = 6, greedy_groups: int = 4,
         repeats: int = 10,
         warmup: int = 2, threads: int | None = None, progress: Any = False, model_name: str = "",
         log: Callable[[str], None] | None = None) -> Plan:
    """Search settings for `model` within `budget`; returns the chosen `Plan` (its `candidates` hold every row).

    Args:
        model: the unmodified encoder (eval mode).
        calib_inputs: a tensor `[N, ...]` (cut into batches of `calib_batch`) or a list of input batches (tensor,
            tuple of positional inputs, or dict of keyword inputs). Use training / dev data, not test data.
        budget: `{"flops": f}` (the compiler's FLOPs ratio) or `{"latency": f}` (measured latency ratio on
            `target` at `batch`), f in (0, 1).
        target: where latency is measured: a runtime target label (`eager`, `inductor`, `onnxruntime`, ...);
            needed for a latency budget; with a FLOPs budget it measures the chosen plan and its Pareto front.
        metric: `metric(full_output, reduced_output) -> float`, higher = closer; default: cosine of the summary
            vector (pooler output / CLS token / flattened output), averaged over the calibration samples.
        methods: encoder methods to search (default: every registered encoder method that can be tuned).
        families: schedule families (default: all of `tune.space.FAMILIES`).
        settings: settings every candidate gets (e.g. `{"unmerge": True}` or `protected_tokens`).
        cache: path of the JSON measurement cache (resumes an interrupted or repeated run); None: no cache.
        time_budget_s: stop trying new candidates after this many seconds (the plan notes say so).
        max_candidates: schedule candidates evaluated before the greedy search (those nearest the budget).
        max_measured: latency measurements at most (latency budget: to find the plan; flops budget with a
            target: the chosen plan and its Pareto neighbours).
        greedy_groups: groups of consecutive blocks the greedy search moves merges between (more: finer
            schedules, more candidates to evaluate).
        progress: True: a progress bar on stderr; or an object whose `update(n)` is called per candidate.
    """
    kind, limit = parse_budget(budget)
    if kind == "latency" and not target:
        raise TokenReduceError("a latency budget is measured on a target: pass target='eager', 'inductor' or "
                               "'onnxruntime' (or tune for a FLOPs budget)", setting="target")
    say = log or (lambda _m: None)
    start = time.monotonic()
    deadline = start + time_budget_s if time_budget_s else None
    fixed = dict(settings or {})
    for k in ("method", "plan"):
        if k in fixed:
            raise TokenReduceError(f"settings= holds what every candidate shares; {k} is what tune chooses",
                                   setting=k)
    encoder_methods = [m for m in registry.names("encoder") if m != "none"]
    chosen_methods = list(methods) if methods is not None else encoder_methods
    for m in chosen_methods:
        registry.encoder(m)
    fams = list(families) if families is not None else list(FAMILIES)
    store = Cache(cache)
    batches = calibration_batches(calib_inputs, calib_batch)
    say(f"capturing the model and running the full model on {len(batches)} calibration batch(es)")
    ev = Evaluator(model, batches, metric=metric, fixed=fixed, cache=store)
    analysis = analyse(fx.GraphModule(ev.captured.gm, copy.deepcopy(ev.captured.gm.graph)),
                       fixed.get("protected_tokens"))
    if not any(b.reducible for b in analysis.blocks):
        reasons = "; ".join(f"{b.name}: {b.skip_reason}" for b in analysis.blocks[:3])
        raise TokenReduceError(f"no block of this model can be reduced ({reasons}), so there is nothing to tune")
    shape = ModelShape.of(analysis, ev.full_flops, batch_of(*ev.example) or 1)
    cands, notes = schedule_candidates(shape, analysis, chosen_methods, [f for f in fams if f != "greedy"])
    meter = None if not target else LatencyMeter(model, ev.example, target, batch, fixed=fixed, fingerprint=ev.fingerprint, cache=store,
                                                 threads=threads, repeats=repeats, warmup=warmup)

    progress_bar = progress if hasattr(progress, "update") else None
    if progress is True:
        from tqdm.auto import tqdm

        progress_bar = tqdm(total=max_candidates + 24, desc="tune", leave=False, dynamic_ncols=True)
    search = Search(ev, shape, deadline, progress_bar, say)
    search.notes.extend(notes)
    try:
        flops_target = limit
        if kind == "latency":
            assert meter is not None
            flops_target = _anchor(search, meter, cands, limit, say)
        pool = [c for c in cands if proxy_of(shape, c) <= flops_target + 2 * MARGIN]
        pool = _interleave_groups(pool, lambda c: abs(proxy_of(shape, c) - flops_target))
        if not pool and cands:
            low = min(cands, key=lambda c: proxy_of(shape, c))
            search.notes.append(f"no schedule candidate is estimated to reach FLOPs ratio {flops_target:.3f}; the "
                                f"lowest estimate is {low.label} at {proxy_of(shape, low):.3f}")
        cached = [c for c in pool[max_candidates:] if ev.is_cached(c)]  # measured before: free, always taken
        if len(pool) > max_candidates:
            search.notes.append(f"{len(pool)} schedule candidates fit the budget estimate; the {max_candidates} "
                                "nearest to it were evaluated, taken in turn from each method and family "
                                f"(max_candidates), and {len(cached)} more whose measurements the cache held")
        for c in pool[:max_candidates] + cached:
            search.evaluate(c)
        if "greedy" in fams:
            merging = [r for r in search.rows.values() if tunable(registry.encoder(r["method"])) == "r"
                       and r["flops_ratio"] <= flops_target + MARGIN]
            if merging:
                search.greedy(max(merging, key=lambda r: r["fidelity"])["method"], flops_target, groups=greedy_groups)
            elif any(tunable(registry.encoder(m)) == "r" for m in chosen_methods):
                search.greedy(next(m for m in chosen_methods if tunable(registry.encoder(m)) == "r"), flops_target,
                              groups=greedy_groups)
        chosen = _choose(search, kind, limit, meter, max_measured, say)
    finally:
        if progress is True and progress_bar is not None:
            progress_bar.close()
    return _plan(search, chosen, kind, limit, target if meter is not None else None, batch, ev, model, model_name,
                 time.monotonic() - start)


def _interleave_groups(pool: list[Candidate], distance: Callable[[Candidate], float]) -> list[Candidate]:
    """The candidates ordered so that a prefix is spread over methods and families: each (method, family) group
    sorted by `distance`, then taken in turn (nearest of every group first)."""
    groups: dict[tuple[str, str], list[Candidate]] = {}
    for c in sorted(pool, key=lambda c: (distance(c), c.key)):
        groups.setdefault((c.method, c.family), []).append(c)
    out: list[Candidate] = []
    while any(groups.values()):
        for g in groups.values():
            if g:
                out.append(g.pop(0))
    return out


def _anchor(search: Search, meter: LatencyMeter, cands: list[Candidate], limit: float,
            say: Callable[[str], None]) -> float:
    """Latency budget: measure two constant-schedule anchors (the first where latency = FLOPs would meet the
    budget, the second where the line through the first predicts it) and return the FLOPs ratio that the line
    fitted to them predicts for the budget."""
    shape = search.shape
    constant = [c for c in cands if c.family == "constant"] or cands
    if not constant:
        return limit
    guess = limit
    for _ in range(2):
        c = min(constant, key=lambda c: abs(proxy_of(shape, c) - guess))
        row = search.evaluate(c)
        if row is None:
            break
        _measure(search, meter, row, say)
        a, b = _latency_line(search)
        if b <= 0:  # reducing made it no faster here: no FLOPs ratio is predicted to meet the budget
            return limit
        guess = (limit - a) / b
    return guess


def _latency_line(search: Search, method: str | None = None) -> tuple[float, float]:
    """(a, b) of `latency ratio = a + b * FLOPs ratio` fitted to the measured rows (of `method` only, when given:
    methods differ in what their reduction itself costs, so one method's line says little about another's):
    least squares with two or more distinct FLOPs ratios, else the line through (1, 1) and the measured point
    (before any: a=0, b=1, latency proportional to FLOPs)."""
    pts = [(r["flops_ratio"], r["latency_ratio"]) for r in search.rows.values()
           if r.get("latency_ratio") is not None and (method is None or r["method"] == method)]
    fs = [f for f, _ in pts]
    if len(pts) >= 2 and max(fs) - min(fs) > 0.02:
        mf, ml = sum(fs) / len(pts), sum(lat for _, lat in pts) / len(pts)
        b = sum((f - mf) * (lat - ml) for f, lat in pts) / sum((f - mf) ** 2 for f in fs)
        return ml - b * mf, b
    den = sum((1 - f) ** 2 for f, _ in pts)
    b = sum((1 - f) * (1 - lat) for f, lat in pts) / den if den > 0 else 1.0
    return 1.0 - b, b


def _measure(search: Search, meter: LatencyMeter, row: dict[str, Any], say: Callable[[str], None]) -> bool:
    """Measure a row's latency on the target (unless it has one); True when that took a new measurement (not
    one from the cache)."""
    if row.get("latency_ratio") is not None:
        return False
    value = meter.measure(row["candidate"])
    row.update(latency_ratio=value["latency_ratio"], unreduced_ms=value["unreduced_ms"],
               reduced_ms=value["reduced_ms"])
    say(f"{row['label']}: latency {value['unreduced_ms']:.2f} -> {value['reduced_ms']:.2f} ms on {meter.target} "
        f"batch {meter.batch} (ratio {value['latency_ratio']:.3f})" + (" (cached)" if value.get("cached") else ""))
    return not value.get("cached")


def _choose(search: Search, kind: str, limit: float, meter: LatencyMeter | None, max_measured: int,
            say: Callable[[str], None]) -> dict[str, Any]:
    rows = list(search.rows.values())
    if not rows:
        raise TokenReduceError("no candidate could be evaluated" + (f": {search.notes[-1]}" if search.notes else "")
                               + "; raise the budget or allow more methods/families", setting="budget")
    if kind == "flops":
        fit = [r for r in rows if r["flops_ratio"] <= limit]
        if not fit:
            low = min(rows, key=lambda r: r["flops_ratio"])
            raise TokenReduceError(f"no candidate reached FLOPs ratio <= {limit}: the lowest was {low['label']} at "
                                   f"{low['flops_ratio']:.3f}; raise the budget or allow more methods/families",
                                   setting="budget")
        chosen = max(fit, key=lambda r: (r["fidelity"], -r["flops_ratio"]))
        if meter is not None:
            todo = [chosen] + [r for r in pareto_front(rows) if r is not chosen]
            for r in todo[:max_measured]:
                _measure(search, meter, r, say)
        return chosen
    assert meter is not None
    measured = skipped = 0
    for r in sorted(rows, key=lambda r: (-r["fidelity"], r["flops_ratio"])):
        if r.get("latency_ratio") is None:
            cached = meter.cached(r["candidate"])  # a cached value costs nothing and beats the line
            if measured >= max_measured and not cached:
                continue  # no new measurements left; a row measured already (an anchor, the cache) is still a choice
            a, b = _latency_line(search, r["method"])
            if a + b * r["flops_ratio"] > limit + MARGIN and not cached:
                skipped += 1
                continue
            measured += _measure(search, meter, r, say)  # a cached measurement is not counted
        if r["latency_ratio"] <= limit:
            return r
    done = [r for r in rows if r.get("latency_ratio") is not None]
    best = min(done, key=lambda r: r["latency_ratio"]) if done else None
    where = f"; the lowest measured was {best['label']} at {best['latency_ratio']:.3f}" if best else ""
    stopped = (f"; the time budget stopped the search after {len(rows)} candidate(s), raise time_budget_s"
               if search.out_of_time else "")
    lines = (f"; {skipped} candidate(s) were not measured because their method's latency line (fitted to its "
             f"measured rows) put them more than {MARGIN} over" if skipped else "")
    raise TokenReduceError(f"no measured candidate reached latency ratio <= {limit} on {meter.target} at batch "
                           f"{meter.batch} ({measured} new measurement(s) of at most {max_measured}{lines})"
                           f"{where}{stopped}; raise the budget, raise max_measured, or tune for FLOPs",
                           setting="budget")


def _plan(search: Search, chosen: dict[str, Any], kind: str, limit: float, target: str | None, batch: int,
          ev: Evaluator, model: torch.nn.Module, model_name: str, seconds: float) -> Plan:
    table = []
    for r in search.rows.values():
        table.append({k: v for k, v in r.items() if k != "candidate"} | {"chosen": r is chosen})
    measured = {"flops_ratio": chosen["flops_ratio"], "latency_ratio": chosen.get("latency_ratio"),
                "fidelity": chosen["fidelity"], "metric": ev.metric_name, "calib_samples": ev.samples,
                "unreduced_ms": chosen.get("unreduced_ms"), "reduced_ms": chosen.get("reduced_ms"),
                "tuning_seconds": round(seconds, 1), "candidates": len(table)}
    return Plan(settings={**chosen["settings"], **ev.fixed}, label=chosen["label"], budget={kind: limit},
                target=target, batch=batch if target else None, measured=measured,
                model=model_name or type(model).__name__, notes=search.notes, candidates=table)
