"""ToMe: merge the most similar tokens in every block (bipartite soft matching).

Source: Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman, "Token Merging: Your ViT But Faster", ICLR 2023,
and the arithmetic of its official timm patch (facebookresearch/ToMe, `tome/merge.py`,
`bipartite_soft_matching`; read, not copied): alternate A/B split over all tokens, cosine similarity of
head-averaged keys, each A token's best B match, the r best edges merged, size-weighted averages, and
proportional attention (`+ log(size)`). The matching itself is the `tome_plan` op (`kernels/plans.py`);
this file is the method: its options, its per-block schedule, and what it emits.

Refuses: `r` larger than `(N - P) // 2` at any block (the official code silently clamps; we raise and name
the largest valid constant r), unless `clamp_r=True`, and then the report names every clamped block.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tokenreduce.analysis.encoder import ModelAnalysis
from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels import ops as _ops  # noqa: F401  (registers torch.ops.tokenreduce)
from tokenreduce.kernels import reference as ref
from tokenreduce.kernels.plans import max_r
from tokenreduce.methods.base import (
    BlockPlan,
    EncoderMethod,
    Options,
    PlanNodes,
    Site,
    check_bool,
    check_choice,
    check_int,
    check_int_list,
    check_layers,
    fail,
    option,
    walk_blocks,
)

R_SCHEDULES = ("constant", "decreasing")


def largest_constant_r(num_tokens: int, num_protected: int, active: list[bool]) -> int:
    """Largest one-int r that every active block (in order) can merge, starting from `num_tokens`."""
    best = 0
    for r in range(1, max(num_tokens, 1)):
        n = num_tokens
        for on in active:
            if not on:
                continue
            if r > max_r(n, num_protected):
                return best
            n -= r
        best = r
    return best


def r_schedule(r: int | tuple[int, ...], num_blocks: int, schedule: str = "constant") -> list[int]:
    """Per-block merge counts.

    A list is padded with zeros (longer than the model is an error); an int is constant, or with
    `schedule="decreasing"` ToMe's (r, -0.5) inflection schedule: r*1.5 merges in the first block falling
    linearly to r*0.5 in the last (same total).
    """
    if isinstance(r, tuple | list):
        if len(r) > num_blocks:
            raise TokenReduceError(
                f"r lists {len(r)} blocks but the model has {num_blocks}; give at most {num_blocks} values",
                setting="r")
        return list(r) + [0] * (num_blocks - len(r))
    if schedule == "constant" or num_blocks == 1:
        return [int(r)] * num_blocks
    lo = int(r * 1.5)
    hi = 2 * r - lo
    step = (hi - lo) / (num_blocks - 1)
    return [int(lo + step * i) for i in range(num_blocks)]


@dataclass(frozen=True)
class TomeOptions(Options):
    r: Any = option(0, "tokens merged per block: one int for every block, or a per-block list (padded with 0)")
    r_schedule: str = option("constant", "'constant' or 'decreasing' (ToMe's (r, -0.5) schedule: more merging "
                                         "early, same total)", choices=R_SCHEDULES)
    layers: tuple[int, ...] | None = option(None, "blocks (0-based) that merge; default: every block")
    prop_attn: bool = option(True, "add log(size) to the attention logits after a merge (proportional attention)")
    clamp_r: bool = option(False, "merge as many as a block can when r is too large (the report lists each "
                                  "clamped block) instead of raising")

    def validate(self) -> None:
        if isinstance(self.r, int | bool):
            check_int("r", self.r, lo=0)
        else:
            self.set("r", check_int_list("r", self.r, lo=0))
        check_choice("r_schedule", self.r_schedule, R_SCHEDULES)
        if self.r_schedule == "decreasing" and not isinstance(self.r, int):
            raise fail("r_schedule", "r_schedule='decreasing' needs one int r, not a per-block list")
        if self.layers is not None:
            self.set("layers", check_int_list("layers", self.layers, lo=None))
        check_bool("prop_attn", self.prop_attn)
        check_bool("clamp_r", self.clamp_r)


class Tome(EncoderMethod):
    name = "tome"
    summary = "merge the r most similar token pairs in every block (Bolya et al., ICLR 2023)"
    options_type = TomeOptions
    merges = True

    def plan_blocks(self, options: Options, analysis: ModelAnalysis) -> list[BlockPlan]:
        assert isinstance(options, TomeOptions)
        blocks, p = analysis.blocks, analysis.num_protected
        if options.layers is not None:
            check_layers(options.layers, len(blocks))
        rs = r_schedule(options.r, len(blocks), options.r_schedule)
        if options.layers is not None:
            rs = [r if i in options.layers else 0 for i, r in enumerate(rs)]
        n0 = next((b.num_tokens for b in blocks if b.reducible), 0)

        def reduce(b: Any, bp: BlockPlan) -> None:
            r, n = rs[b.index], bp.tokens_in
            limit = max_r(n, p)
            if r > limit and not options.clamp_r:
                active = [blk.reducible and (options.layers is None or blk.index in options.layers) for blk in blocks]
                best = largest_constant_r(n0, p, active)
                hint = f"; the largest constant r for this model is {best}" if isinstance(options.r, int) else ""
                raise TokenReduceError(
                    f"{self.display_name} r={r} at block {b.index} ({b.name}) is too large: it has {n} tokens with {p} "
                    f"protected, so the largest valid r there is {limit}{hint} (or pass clamp_r=True to "
                    "merge as many as possible and have the report say so)", setting="r", hint="clamp_r=True")
            applied = min(r, limit)
            if applied < r:
                bp.reason = f"clamped: asked r={r}, merged {applied} (block has {n} tokens)"
            if applied > 0:
                bp.action, bp.r, bp.tokens_out = self.name, applied, n - applied

        return walk_blocks(analysis, lambda b: rs[b.index] > 0, reduce)

    def emit(self, options: Options, site: Site) -> PlanNodes:
        b = site.builder
        plan = b.add(torch.ops.tokenreduce.tome_plan.default, (site.k, site.plan.r, site.num_protected, site.valid))
        slot, rep = b.item(plan, 0), b.item(plan, 1)
        weight = None  # sizes; with padding, sizes times the plan's keep (cross-padding sources drop)
        if site.valid is not None:
            weight = b.add(ref.merge_weight, (site.size, b.item(plan, 2)))
        return PlanNodes(slot, weight, rep)

    def action(self, bp: BlockPlan, analysis: ModelAnalysis) -> str:
        return f"tome r={bp.r}"

    sweep_option = "r"
    display_name = "ToMe"
    INSPECT_R = 13  # the ToMe paper's ViT-B/16 setting

    def label(self, values: Mapping[str, Any]) -> str:
        r = values.get("r", 0)
        text = f"{self.display_name} r={','.join(map(str, r)) if isinstance(r, list | tuple) else r}"
        return text + (" (decreasing)" if values.get("r_schedule") == "decreasing" else "")

    def identity_reason(self, values: Mapping[str, Any]) -> str | None:
        r = values.get("r", 0)
        if r == 0 or (isinstance(r, list | tuple) and not any(r)):
            return f"r=0 merges nothing: {self.name} needs r (merges per block), e.g. r=13"
        return None

    def inspect_values(self, analysis: ModelAnalysis, given: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        n0 = next((b.num_tokens for b in analysis.blocks if b.reducible), 0)
        layers = given.get("layers")
        largest = largest_constant_r(n0, analysis.num_protected,
                                     [b.reducible and (layers is None or b.index in layers) for b in analysis.blocks])
        if largest >= self.INSPECT_R:
            return {"r": self.INSPECT_R}, f"default r={self.INSPECT_R}"
        return {"r": largest}, f"default r={self.INSPECT_R} capped at the largest valid constant r"


METHOD = Tome()
