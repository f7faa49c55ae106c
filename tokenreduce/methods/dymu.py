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
of real calls are recorded by `recording()`, one dict per input row. The dense plan costs `N' * N * C`
multiply-adds per reducing block (counted in the report's FLOPs): on ViT-B/16 about 2% of a block.

Which form runs when (docs/methods.md, "DyMU"):
* batch 1, `pad="batch"` (default): dynamic shapes, the row has exactly its own count, nothing is padded;
* batch B > 1: padded masks. Each row is planned on its own tokens exactly as it would be alone (same A/B
  split, same slots, in the same order), then rows are padded with empty slots (size 0) to the batch's largest
  count (`pad="batch"`) or to the block's input count (`pad="static"`, fixed shapes at every batch size, no
  FLOPs saved). Proportional attention's `+ log(size)` is `-inf` on an empty slot, so it is never a key of any
  later attention; a later DyMU block drops empty slots before matching. Text padding (`valid`) never merges and
  is kept after the row's own tokens. `pads_slots` tells `passes/insert_reductions.py` to mask the empty slots
  for attention no `log(size)` bias reaches and to pool over each row's own slots. So a row's tokens, its CLS,
  its pooled and its unmerged outputs equal its batch-1 run.

Refuses:
* padded slots without proportional attention (`prop_attn=False` with a batch, or with `pad="static"`): nothing
  would mask them; the error names `prop_attn=True` and batch-1 calls;
* export (ONNX, TensorRT need a fixed count; `torch.compiler.is_exporting()`): the error names the fixed-count
  alternative, `method="tome"` with `r` = the calibrated mean merges. Inductor is served with dynamic shapes:
  the per-row plans run eagerly (`torch.compiler.disable`: data-dependent counts) and the graph pieces between
  plans are compiled with a symbolic token count (recompiled when a count first changes);
* thresholds that are not finite numbers, and a thresholds file that is missing or malformed.

A padded batch costs what its largest row costs (plus the masked slots' share of later blocks), so the
saving of a batch is that of its least-merged input; `benchmarks/dymu_batches.py` measures both forms.
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
    check_choice,
    fail,
    option,
    walk_blocks,
)

THRESHOLDS_FORMAT = "tokenreduce-dymu-thresholds"
NO_MERGE = math.inf  # a block's threshold that merges nothing
PADS = ("batch", "static")  # the padded width of a batch: its largest row, or the block's input count


# ------------------------------------------------------------------------------------------------ run-time state
@dataclass
class Recording:
    """What `recording()` collects: `counts[i]` is `{block: tokens after that block}` of the i-th input row (the
    row's own tokens: text padding and padded slots are not counted; a call with a batch of B adds B rows, in
    batch order), `widths[j]` `{block: slots after that block}` of the j-th
    call (the batch's largest count, or N with `pad="static"`: the padded width the batch ran at), and, while
    calibrating, `scores[block]` the edge similarities of every row."""

    counts: list[dict[int, int]] = field(default_factory=list)
    widths: list[dict[int, int]] = field(default_factory=list)
    scores: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    overrides: dict[int, float] = field(default_factory=dict)  # block -> threshold used instead of the graph's
    rows: list[dict[int, int]] = field(default_factory=list, repr=False)  # the current call's rows

    def add(self, block: int, counts: list[int], width: int) -> None:
        """Record one block of one call: a block seen already in the current call starts the next call."""
        if not self.rows or block in self.rows[0] or len(self.rows) != len(counts):
            self.rows = [{} for _ in counts]
            self.counts.extend(self.rows)
            self.widths.append({})
        for row, c in zip(self.rows, counts):
            row[block] = c
        self.widths[-1][block] = width


_RECORDING: contextvars.ContextVar[Recording | None] = contextvars.ContextVar("tokenreduce_dymu", default=None)


@contextlib.contextmanager
def recording(overrides: Mapping[int, float] | None = None) -> Iterator[Recording]:
    """Record the per-input token counts of DyMU modules called inside (`rec.counts`, one dict per input row,
    `{block index: tokens out}`; `rec.widths`, the padded width of each call); `overrides` replaces blocks'
    thresholds (calibration)."""
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
              valid: torch.Tensor | None, size: torch.Tensor | None = None, prop_attn: bool = True,
              pad: str = "batch") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DToMe step: in every row, merge every A->B best edge with cosine similarity above `threshold`.

    Args:
        k: `[B, H, N, d]` or `[B, N, d]` keys.
        threshold: cosine threshold of this block (`inf` merges nothing).
        num_protected: leading tokens never merged; block: this block's index (recording, overrides);
        nominal_r: the count used on fake tensors (shape propagation), never on real ones.
        valid: optional `[B, N]` bool, False for padding (text); padding never merges and follows the row's
            real tokens. size: `[B, N]` tokens per slot (None before the first merge); a slot of size 0 is a
            padded slot of an earlier DyMU block and is dropped here.
        prop_attn: whether later attention adds log(size) (what masks the padded slots of a batch).
        pad: "batch" (rows padded to the batch's largest count) or "static" (every row keeps N slots).

    Returns:
        matrix `[B, N', N]` one-hot (slot s receives token i; a dropped padded slot has a zero column),
        slot `[B, N]`, rep `[B, N']`. Row b's first `n_b` slots are its tokens in the order batch 1 gives them,
        then its text padding tokens, then zero slots (size 0) up to N' = the largest row (or N with "static").
    """
    if torch.compiler.is_exporting():
        raise _refuse_static(nominal_r)
    metric = k.mean(dim=1) if k.dim() == 4 else k
    bsz, n, _ = metric.shape
    if isinstance(k, FakeTensor):  # shape propagation: the nominal count
        r = min(nominal_r, max_r(n, num_protected))
        n_out = n if pad == "static" else n - r
        matrix = metric.new_zeros(bsz, n_out, n)
        return matrix, torch.zeros(bsz, n, dtype=torch.long, device=k.device), \
            torch.zeros(bsz, n_out, dtype=torch.long, device=k.device)
    if (bsz > 1 or pad == "static") and not prop_attn:
        what = f"a batch of {bsz} pads each row to the batch's largest token count" if pad == "batch" else \
            "pad='static' pads every row to the block's input count"
        raise TokenReduceError(
            f"dymu with {what} and masks the padded slots through proportional attention (log(size), size 0 -> "
            "-inf); with prop_attn=False nothing masks them: keep prop_attn=True, or call the module once per input "
            "(batch 1 with pad='batch': dynamic shapes, no padding)", setting="prop_attn", hint="prop_attn=True")
    return _row_plans(metric, threshold, num_protected, block, valid, size, pad)


@torch.compiler.disable  # data-dependent counts: runs eagerly under inductor, which compiles the rest
def _row_plans(metric: torch.Tensor, threshold: float, num_protected: int, block: int,
               valid: torch.Tensor | None, size: torch.Tensor | None,
               pad: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dymu_plan` on real tensors: each row planned on its own tokens, exactly as that row alone at batch 1."""
    bsz, n, _ = metric.shape
    device = metric.device
    rec = _RECORDING.get()
    if rec is not None and block in rec.overrides:
        threshold = rec.overrides[block]
    kept = torch.ones(bsz, n, dtype=torch.bool, device=device) if size is None else size > 0
    real = kept if valid is None else kept & valid
    p_a = (num_protected + 1) // 2  # protected A tokens: their edges are not scores to record
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []  # (kept tokens, slot, rep, real count)
    for b in range(bsz):
        ids = real[b].nonzero()[:, 0]
        m = metric[b:b + 1] if ids.numel() == n else metric[b:b + 1, ids]
        unit = unit_rows(m)
        scores = unit[:, 0::2, :] @ unit[:, 1::2, :].transpose(-1, -2)  # [1, nA, nB]
        node_max, node_idx = mask_protected(scores, num_protected).max(dim=-1)
        if rec is not None:
            rec.scores.setdefault(block, []).append(node_max[0, p_a:].detach().float().cpu())
        n_b = ids.numel()
        r_b = min(int((node_max > threshold).sum()), max_r(n_b, num_protected))
        slot_b, rep_b, _ = plan_from_matches(node_max, node_idx, r_b, num_protected, None, n_b, metric.dtype)
        pads = (kept[b] & ~real[b]).nonzero()[:, 0]  # text padding: kept, after the real tokens
        slot = torch.zeros(n, dtype=torch.long, device=device)  # (a dropped padded slot: 0, never read)
        slot[ids] = slot_b[0]
        slot[pads] = n_b - r_b + torch.arange(pads.numel(), device=device)
        rows.append((torch.cat([ids, pads]), slot, torch.cat([ids[rep_b[0]], pads]), n_b - r_b))
    width = n if pad == "static" else max(int(rep.numel()) for _, _, rep, _ in rows)
    matrix = metric.new_zeros(bsz, width, n)
    reps = torch.zeros(bsz, width, dtype=torch.long, device=device)  # a padded slot stands for token 0 (masked)
    for b, (tokens, slot, rep, _) in enumerate(rows):
        matrix[b, slot[tokens], tokens] = 1.0  # token i -> its slot; a dropped padded slot's column stays 0
        reps[b, :rep.numel()] = rep
    if rec is not None:
        rec.add(block, [c for _, _, _, c in rows], width)
    return matrix, torch.stack([slot for _, slot, _, _ in rows]), reps


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
    pad: str = option("batch", "batches: 'batch' pads each row to the batch's largest token count, 'static' keeps "
                               "every block's input count (fixed shapes, masked slots; no FLOPs saved)",
                      choices=PADS)

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
        check_choice("pad", self.pad, PADS)


# ------------------------------------------------------------------------------------------------ method
class Dymu(EncoderMethod):
    name = "dymu"
    summary = "merge every bipartite pair above a calibrated per-block threshold: input-adaptive counts (DyMU, 2025)"
    options_type = DymuOptions
    merges = True
    pads_slots = True  # batches pad rows with empty slots: passes/insert_reductions pools over each row's own

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
                static = options.pad == "static"
                bp.action, bp.r, bp.tokens_out = self.name, r, bp.tokens_in if static else bp.tokens_in - r
                shown = "the block's input count (pad='static': padded slots are masked, not removed)" if static \
                    else source
                bp.reason = (f"data-dependent count (threshold {ts[b.index]:.4g}); tokens_out shows {shown}; "
                             "per-input counts: tokenreduce.methods.dymu.recording()")

        return walk_blocks(analysis, lambda b: b.index < len(ts) and ts[b.index] != NO_MERGE, reduce)

    def emit(self, options: Options, site: Site) -> PlanNodes:
        assert isinstance(options, DymuOptions)
        b = site.builder
        i = site.plan.index
        plan = b.add(dymu_plan, (site.k, options.thresholds[i], site.num_protected, i, site.plan.r, site.valid,
                                 site.size, options.prop_attn, options.pad))
        return PlanNodes(slot=b.item(plan, 1), weight=None, rep=b.item(plan, 2), matrix=b.item(plan, 0))

    def action(self, bp: BlockPlan, analysis: ModelAnalysis) -> str:
        return f"dymu ~r={bp.r}"

    def identity_reason(self, values: Mapping[str, Any]) -> str | None:
        t = values.get("thresholds")
        if isinstance(t, Sequence) and not isinstance(t, str) and all(v is None or v == NO_MERGE for v in t):
            return "every dymu threshold is None/inf: nothing merges; calibrate with calibrate_dymu(model, inputs, r=...)"
        return None


METHOD = Dymu()
