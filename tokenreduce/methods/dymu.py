"""DyMU / DToMe: merge every bipartite pair above a per-block similarity threshold, so the count follows the input.

Source: Wang et al., "DyMU: Dynamic Merging and Virtual Unmerging for Efficient VLMs", 2025 (arXiv 2504.17040),
Dynamic Token Merging (DToMe): ToMe's bipartite matching (alternate A/B split, cosine of head-averaged keys, each
A token's best B match), but instead of the r best edges, every edge whose similarity exceeds the block's
threshold is merged; thresholds are calibrated on data so the *average* merge count per block hits a target r
(`tuning/dymu_calibration.py`). The official code (github.com/MikeWangWZHL/dymu) was not in this machine's
search index; the arithmetic follows the paper, and the matching/slot assignment is the one ToMe uses here
(`kernels.plans.plan_from_matches`), so with the threshold set just below the r-th best edge DToMe equals ToMe r.

How a data-dependent count goes through the graph machinery: the plan is emitted as a dense one-hot plan
`[B, N', N]` (`PlanNodes.matrix`), whose N' is the matrix's own size, so the apply step, the masks, `rep`
gathers and the `-1` reshapes of `fix_token_shapes` all follow the count of each call. The graph is built
(and its shapes propagated on fake tensors) with a *nominal* count per block: the calibrated mean count from
the thresholds file (or one merge when only thresholds are given); the report shows it and says so. The counts
of real calls are recorded by `recording()`. The dense plan costs `N' * N * C` multiply-adds per reducing block
(counted in the report's FLOPs): on ViT-B/16 about 2% of a block.

Refuses:
* batches of more than one input at run time (each input has its own count; padded masks for ragged counts
  are not implemented): call the module once per input, or use `method="tome"`;
* export (ONNX, TensorRT need a fixed count; `torch.compiler.is_exporting()`): the error names the fixed-count
  alternative, `method="tome"` with `r` = the calibrated mean merges. Inductor is served with dynamic shapes at
  batch 1: the count (`int(...)` of a tensor) is a Dynamo graph break, so the plan runs eagerly and the graph
  pieces between plans are compiled with a symbolic token count (recompiled once when a count first changes);
* thresholds that are not finite numbers, and a thresholds file that is missing or malformed.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor

from tokenreduce.analysis.encoder import ModelAnalysis
from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels.plans import mask_protected, max_r, plan_from_matches, unit_rows
from tokenreduce.methods.base import (
    BlockPlan,
    EncoderMethod,
    Options,
    PlanNodes,
    Site,
    check_bool,
    fail,
    option,
    walk_blocks,
)

THRESHOLDS_FORMAT = "tokenreduce-dymu-thresholds"
NO_MERGE = math.inf  # a block's threshold that merges nothing


# ------------------------------------------------------------------------------------------------ run-time state
@dataclass
class Recording:
    """What `recording()` collects: `counts[i]` is `{block: tokens after that block}` for the i-th forward pass
    (one input), and, while calibrating, `scores[block]` the edge similarities of every pass."""

    counts: list[dict[int, int]] = field(default_factory=list)
    scores: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    overrides: dict[int, float] = field(default_factory=dict)  # block -> threshold used instead of the graph's


_RECORDING: contextvars.ContextVar[Recording | None] = contextvars.ContextVar("tokenreduce_dymu", default=None)


@contextlib.contextmanager
def recording(overrides: Mapping[int, float] | None = None) -> Iterator[Recording]:
    """Record the per-input token counts of DyMU modules called inside (`rec.counts`, one dict per call,
    `{block index: tokens out}`); `overrides` replaces blocks' thresholds (calibration)."""
    rec = Recording(overrides=dict(overrides or {}))
    token = _RECORDING.set(rec)
    try:
        yield rec
    finally:
        _RECORDING.reset(token)


def _refuse_static(nominal_r: int) -> TokenReduceError:
    return TokenReduceError(
        f"use method='tome' with r={nominal_r} (dymu's calibrated mean merges at this block; the thresholds file "
        "lists every block's as mean_r, and tome takes r as a per-block list) to export: dymu merges a "
        "data-dependent number of tokens, which an exported graph (ONNX, TensorRT) cannot hold; dymu itself runs "
        "with inner='eager' or inner='inductor'", setting="method", hint=f"method='tome', r={nominal_r}")


def dymu_plan(k: torch.Tensor, threshold: float, num_protected: int, block: int, nominal_r: int,
              valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DToMe step: merge every A->B best edge with cosine similarity above `threshold`.

    Args:
        k: `[1, H, N, d]` or `[1, N, d]` keys; batch 1 only (each input has its own count).
        threshold: cosine threshold of this block (`inf` merges nothing).
        num_protected: leading tokens never merged; block: this block's index (recording, overrides);
        nominal_r: the count used on fake tensors (shape propagation), never on real ones.
        valid: optional `[1, N]` bool, False for padding; edges to or from padding are never merged.

    Returns:
        matrix `[1, N - r, N]` one-hot (slot s receives token i), slot `[1, N]`, rep `[1, N - r]`.
    """
    if torch.compiler.is_exporting():
        raise _refuse_static(nominal_r)
    metric = k.mean(dim=1) if k.dim() == 4 else k
    bsz, n, _ = metric.shape
    rec = _RECORDING.get()
    if bsz != 1 and not isinstance(k, FakeTensor):
        raise TokenReduceError(
            f"dymu runs one input per call (this call has a batch of {bsz}): each input merges its own number of "
            "tokens; call the module once per input, or use method='tome' for batches", setting="method")
    metric = unit_rows(metric)
    a, b = metric[:, 0::2, :], metric[:, 1::2, :]
    scores = a @ b.transpose(-1, -2)  # [B, nA, nB]
    if valid is not None:  # an edge touching padding never merges (below any cosine threshold)
        va, vb = valid[:, 0::2], valid[:, 1::2]
        scores = scores.masked_fill(~(va[:, :, None] & vb[:, None, :]), -torch.inf)
    node_max, node_idx = mask_protected(scores, num_protected).max(dim=-1)
    p_a = (num_protected + 1) // 2  # protected A tokens: their edges are not scores to record
    limit = max_r(n, num_protected)
    if isinstance(k, FakeTensor):
        r = min(nominal_r, limit)
    else:
        if rec is not None and block in rec.overrides:
            threshold = rec.overrides[block]
        if rec is not None:
            rec.scores.setdefault(block, []).append(node_max[0, p_a:].detach().float().cpu())
        r = min(int((node_max > threshold).sum()), limit)
    slot, rep, _ = plan_from_matches(node_max, node_idx, r, num_protected, None, n, metric.dtype)
    n_out = n - r
    matrix = (slot[:, None, :] == torch.arange(n_out, device=k.device)[None, :, None]).to(k.dtype)
    if rec is not None and not isinstance(k, FakeTensor):
        if not rec.counts or block in rec.counts[-1]:
            rec.counts.append({})
        rec.counts[-1][block] = n_out
    return matrix, slot, rep


# ------------------------------------------------------------------------------------------------ options
def load_thresholds(path: str | os.PathLike[str]) -> tuple[tuple[float, ...], tuple[float, ...] | None]:
    """Thresholds (and the calibrated mean merges per block, if recorded) from a `calibrate_dymu` file."""
    p = Path(path)
    if not p.is_file():
        raise TokenReduceError(f"dymu thresholds file {p} not found; write one with "
                               "tokenreduce.tuning.dymu_calibration.calibrate_dymu(model, inputs, r=..., output=path)",
                               setting="thresholds")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenReduceError(f"dymu thresholds file {p} is not valid JSON: {exc}", setting="thresholds") from exc
    if not isinstance(data, Mapping) or data.get("format") != THRESHOLDS_FORMAT or "thresholds" not in data:
        raise TokenReduceError(f"{p} is not a dymu thresholds file (no \"format\": \"{THRESHOLDS_FORMAT}\" with "
                               "\"thresholds\")", setting="thresholds")
    ts = tuple(NO_MERGE if t is None else float(t) for t in data["thresholds"])
    mean_r = data.get("mean_r")
    return ts, (tuple(float(m) for m in mean_r) if mean_r is not None else None)


@dataclass(frozen=True)
class DymuOptions(Options):
    thresholds: Any = option(None, "per-block cosine thresholds (a list; null/inf = no merging in that block; "
                                   "shorter lists are padded with no merging), or a path to a thresholds JSON "
                                   "written by calibrate_dymu")
    mean_r: tuple[float, ...] | None = option(None, "calibrated mean merges per block (read from the thresholds "
                                                    "file; the report's nominal count and the shape propagation's)")
    prop_attn: bool = option(True, "add log(size) to the attention logits after a merge (proportional attention)")

    def validate(self) -> None:
        t = self.thresholds
        if isinstance(t, str | os.PathLike):
            ts, mean_r = load_thresholds(t)
            self.set("thresholds", ts)
            if self.mean_r is None and mean_r is not None:
                self.set("mean_r", mean_r)
        elif t is None:
            raise fail("thresholds", "dymu needs thresholds: a per-block list of cosine thresholds, or the path "
                                     "of a file from calibrate_dymu(model, inputs, r=...)")
        else:
            if isinstance(t, int | float) and not isinstance(t, bool):
                t = (t,)
            if not isinstance(t, Sequence) or isinstance(t, bytes):
                raise fail("thresholds", f"thresholds must be a list of numbers or a path, got {t!r}")
            vals = []
            for i, v in enumerate(t):
                if v is None:
                    vals.append(NO_MERGE)
                    continue
                if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v) or v == -math.inf:
                    raise fail("thresholds", f"thresholds[{i}] must be a number (cosine, usually in -1..1) or "
                                             f"None/inf for no merging, got {v!r}")
                vals.append(float(v))
            self.set("thresholds", tuple(vals))
        if self.mean_r is not None:
            ms = tuple(self.mean_r)
            if any(isinstance(m, bool) or not isinstance(m, int | float) or not m >= 0 for m in ms):
                raise fail("mean_r", f"mean_r must be numbers >= 0, got {self.mean_r!r}")
            self.set("mean_r", tuple(float(m) for m in ms))
        check_bool("prop_attn", self.prop_attn)


# ------------------------------------------------------------------------------------------------ method
class Dymu(EncoderMethod):
    name = "dymu"
    summary = "merge every bipartite pair above a calibrated per-block threshold: input-adaptive counts (DyMU, 2025)"
    options_type = DymuOptions
    merges = True

    def nominal(self, options: DymuOptions, index: int) -> int:
        if options.mean_r is not None and index < len(options.mean_r):
            return max(1, round(options.mean_r[index]))
        return 1

    def plan_blocks(self, options: Options, analysis: ModelAnalysis) -> list[BlockPlan]:
        assert isinstance(options, DymuOptions)
        ts = options.thresholds
        if len(ts) > len(analysis.blocks):
            raise TokenReduceError(f"thresholds lists {len(ts)} blocks but the model has {len(analysis.blocks)}; "
                                   f"give at most {len(analysis.blocks)} values", setting="thresholds")
        p = analysis.num_protected
        source = "the calibrated mean" if options.mean_r is not None else "1 merge (no calibrated mean_r given)"

        def reduce(b: Any, bp: BlockPlan) -> None:
            r = min(self.nominal(options, b.index), max_r(bp.tokens_in, p))
            if r > 0:
                bp.action, bp.r, bp.tokens_out = self.name, r, bp.tokens_in - r
                bp.reason = (f"data-dependent count (threshold {ts[b.index]:.4g}); tokens_out shows {source}; "
                             "per-input counts: tokenreduce.methods.dymu.recording()")

        return walk_blocks(analysis, lambda b: b.index < len(ts) and ts[b.index] != NO_MERGE, reduce)

    def emit(self, options: Options, site: Site) -> PlanNodes:
        assert isinstance(options, DymuOptions)
        b = site.builder
        i = site.plan.index
        plan = b.add(dymu_plan, (site.k, options.thresholds[i], site.num_protected, i, site.plan.r, site.valid))
        return PlanNodes(slot=b.item(plan, 1), weight=None, rep=b.item(plan, 2), matrix=b.item(plan, 0))

    def action(self, bp: BlockPlan, analysis: ModelAnalysis) -> str:
        return f"dymu ~r={bp.r}"

    def identity_reason(self, values: Mapping[str, Any]) -> str | None:
        t = values.get("thresholds")
        if isinstance(t, Sequence) and not isinstance(t, str) and all(v is None or v == NO_MERGE for v in t):
            return "every dymu threshold is None/inf: nothing merges; calibrate with calibrate_dymu(model, inputs, r=...)"
        return None


METHOD = Dymu()
