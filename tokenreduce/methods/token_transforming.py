"""Token Transforming: reduce tokens with a dense many-to-many token matrix instead of one-to-one merges.

Source: Zeng, Yu, Kong, Tang, "Token Transforming: A Unified and Training-Free Token Compression Framework for
Vision Transformer Acceleration", arXiv:2506.05709, 2025 (workshop version: Zeng, Yu, "M2M-TAG: Training-Free
Many-to-Many Token Aggregation for Vision Transformer Acceleration", NeurIPS 2024 WMLC). The paper writes every
token reduction as `Y = W X` with a token matrix `W [N', N]`: pruning is a 0/1 selection, merging a many-to-one
average, and its own method a many-to-many `W` where a removed token's information is shared among several
kept tokens instead of going to exactly one. The official repository (AuroraZengfh/TokenTransforming, read at
commit dedcac5) holds only a README, no code; so the framework is the paper's, and the choices below that the
framework leaves open are ours, each named (docs/methods.md should carry the same list):

1. Which tokens go (sources) and which stay (targets): ToMe's bipartite matching on the head-averaged keys
   (`kernels.plans.bipartite_plan`), the `r` A tokens with the most similar B partner are the sources; every
   other token is a target and keeps its own slot (protected tokens first, unmerged A, then B: ToMe's order).
2. Where a source goes: its `topk` most similar targets (cosine of the L2-normalised head-averaged keys) among
   all non-protected targets -- not only the B side -- weighted by `softmax(cos / tau)` over those `topk`.
   Protected tokens (CLS, registers) never receive mass, and a source only goes to targets of its own padding
   state (real into real, padding into padding; a source with no such target is dropped, as ToMe's weight-0
   cross-padding merge).
3. Apply: `x' = (M * size) @ x / (M @ size)`, `size' = M @ size` with `M [B, N', N]` (a target's column is its
   own slot with share 1, a source's column its `topk` shares): the size-weighted average of ToMe generalised to
   fractional shares, so the total size is kept and proportional attention (`+ log(size')`) stays meaningful.
   `topk=1` is hard merging into the single most similar kept token.

The plan is a plain torch function (`transform_plan`) emitted as one graph node, and the apply is
`kernels.reference.apply_matrix` (one batched matmul); both trace into standard ops (top-k with constant k,
comparisons with an arange instead of scatter, matmul), so eager, inductor and ONNX run the same graph. The
source map of a reduced graph (`unmerge`, token maps) takes each token's dominant slot (largest share).

Refuses: `r` above `(N - P) // 2` at a block (ToMe's bound, so there are at least as many targets as sources;
`clamp_r=True` merges as many as possible and the report says so); `topk` below 1; `tau` not positive;
`unmerge=True` with `topk > 1` (a token spread over several slots has no one slot to copy back; `topk=1`
unmerges exactly as ToMe).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels.plans import bipartite_plan, merge_metric, unit_rows
from tokenreduce.methods.base import (
    BlockPlan,
    Options,
    PlanNodes,
    Site,
    check_int,
    fail,
    option,
)
from tokenreduce.methods.tome import Tome, TomeOptions

NOT_A_TARGET = -4.0  # similarity given to a slot a source may not go to (below every cosine)


def transform_plan(
    metric: torch.Tensor,
    r: int,
    num_protected: int,
    topk: int,
    tau: float,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan one Token Transforming step: the many-to-many matrix, each token's dominant slot, the slots' tokens.

    Args:
        metric: `[B, H, N, d]` attention keys (averaged over heads here) or `[B, N, d]` head-averaged keys.
        r: tokens removed (output has `N - r` slots); `0 <= r <= (N - P) // 2`.
        num_protected: leading tokens kept in place that never receive a share (CLS, registers).
        topk: targets each removed token is shared among (fewer when fewer targets exist).
        tau: softmax temperature over a source's `topk` cosine similarities.
        valid: optional `[B, N]` bool, False for padding; shares never cross real/padding.

    Returns:
        matrix: `[B, N - r, N]` (metric dtype): `matrix[b, s, i]` is the share of token i that slot s receives;
            every column sums to 1 (0 for a dropped source).
        slot: `[B, N]` int64, each token's dominant slot (its own for a kept token), `N - r` when dropped.
        rep: `[B, N - r]` int64, the input token each slot keeps (ToMe's representative).
    """
    metric = merge_metric(metric, r, num_protected, "Token Transforming", setting="r")
    bsz, n, _ = metric.shape
    p = num_protected
    device = metric.device
    tokens = torch.arange(n, device=device)
    if r == 0:
        ident = tokens.expand(bsz, n)
        return (tokens[:, None] == tokens).to(metric.dtype).expand(bsz, n, n), ident, ident
    slot_hard, rep, _ = bipartite_plan(metric, r, p, valid)
    n_out = n - r
    slots = torch.arange(n_out, device=device)
    is_source = rep.gather(1, slot_hard) != tokens  # a token that is not its slot's representative
    hard = (slot_hard[:, :, None] == slots).to(metric.dtype)  # [B, N, N']
    unit = unit_rows(metric)
    targets = unit.gather(1, rep[:, :, None].expand(-1, -1, unit.shape[-1]))  # [B, N', d]
    sim = unit @ targets.transpose(-1, -2)  # [B, N, N']
    allowed = (slots >= p)[None, None, :].expand(bsz, n, n_out)
    if valid is not None:
        allowed = allowed & (valid[:, :, None] == valid.gather(1, rep)[:, None, :])
    sim = torch.where(allowed, sim, torch.full_like(sim, NOT_A_TARGET))
    k = min(topk, n_out - p)
    top, idx = sim.topk(k, dim=-1, largest=True, sorted=True)  # [B, N, k], most similar first
    ok = top > NOT_A_TARGET / 2
    e = torch.where(ok, torch.exp((top - top[:, :, :1]) / tau), torch.zeros_like(top))
    total = e.sum(dim=-1, keepdim=True)
    share = torch.where(total > 0, e / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(e))
    soft = ((idx[:, :, :, None] == slots).to(metric.dtype) * share[:, :, :, None]).sum(dim=2)  # [B, N, N']
    matrix = torch.where(is_source[:, :, None], soft, hard).transpose(1, 2)
    dominant = torch.where(ok[:, :, 0], idx[:, :, 0], torch.full_like(idx[:, :, 0], n_out))
    return matrix, torch.where(is_source, dominant, slot_hard), rep


@dataclass(frozen=True)
class TokenTransformingOptions(TomeOptions):
    topk: int = option(4, "kept tokens each removed token is shared among (its most similar ones; 1 = hard "
                          "merging into the single most similar kept token)")
    tau: float = option(0.1, "softmax temperature over a removed token's top-k cosine similarities (lower: more "
                             "weight on the most similar kept token)")

    def validate(self) -> None:
        super().validate()
        check_int("topk", self.topk, lo=1)
        if isinstance(self.tau, bool) or not isinstance(self.tau, int | float) or not math.isfinite(self.tau):
            raise fail("tau", f"tau must be a finite number > 0, got {self.tau!r}")
        if self.tau <= 0:
            raise fail("tau", f"tau must be > 0, got {self.tau}")
        self.set("tau", float(self.tau))


class TokenTransforming(Tome):
    name = "token_transforming"
    summary = ("remove r tokens per block, sharing each among its top-k most similar kept tokens "
               "(many-to-many token matrix; Zeng et al., 2025)")
    options_type = TokenTransformingOptions
    display_name = "Token Transforming"
    merges = True

    def check_common(self, options: Options, unmerge: bool) -> None:
        assert isinstance(options, TokenTransformingOptions)
        if unmerge and options.topk > 1:
            raise TokenReduceError(
                f"unmerge copies one slot back to each original token, but token_transforming with topk="
                f"{options.topk} shares a removed token among {options.topk} slots; use topk=1 (hard merging, "
                "unmerged exactly as ToMe) or unmerge=False", setting="unmerge", hint="topk=1 or unmerge=False")

    def emit(self, options: Options, site: Site) -> PlanNodes:
        assert isinstance(options, TokenTransformingOptions)
        b = site.builder
        plan = b.add(transform_plan, (site.k, site.plan.r, site.num_protected, options.topk, options.tau,
                                      site.valid))
        return PlanNodes(slot=b.item(plan, 1), weight=None, rep=b.item(plan, 2), matrix=b.item(plan, 0))

    def action(self, bp: BlockPlan, analysis: Any) -> str:
        return f"token_transforming r={bp.r}"

    def label(self, values: Mapping[str, Any]) -> str:
        text = super().label(values)
        return text + f" top{values['topk']}" if "topk" in values else text


METHOD = TokenTransforming()
