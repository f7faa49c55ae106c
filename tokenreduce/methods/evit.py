"""EViT: keep the tokens the CLS token attends to most (or, without a CLS token, the tokens that receive
the most attention), fuse the rest into one.

Source: Liang, Ge, Tong, Song, Wang, Xie, "Not All Patches are What You Need: Expediting Vision
Transformers via Token Reorganizations", ICLR 2022 (official code youweiliang/evit, read, not copied):
top-k of the head-averaged CLS attention over the non-protected tokens (descending order, as the official
code), the pruned tokens fused into one token by their attention. The CLS row is computed from the block's
own q and k (one query row, so the block's SDPA stays fused) by `query_row_scores`, or, for explicit attention
whose logits carry terms q and k alone do not give (relative biases, soft-capping, talking heads, `masked_fill`),
read from the block's own softmax; the plan is the
`topk_plan` op (`kernels/plans.py`, which also states our one deliberate deviation: the fused token is the
attention-weighted average).

CLS-free scoring (`score="received"`, our extension; the paper needs a CLS token): rank by the attention each
token receives, the column mean of the head-averaged probabilities over the (valid) queries
(`kernels/attention_graph.py`: `received_scores`, recomputed for the scoring block only). The fused token then
averages the pruned tokens weighted by their received attention, the same role the CLS attention plays in the
paper ("inattentive" = receives little attention from anyone). `score="auto"` (default) keeps the paper's CLS
row on models with a protected leading token and uses the received attention on models without one.

Refuses: `score="cls"` on models without a leading protected token (no CLS row to rank by), keep counts
below 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tokenreduce.analysis.encoder import ModelAnalysis
from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels import attention_graph
from tokenreduce.kernels import ops as _ops  # noqa: F401  (registers torch.ops.tokenreduce)
from tokenreduce.methods.base import (
    BlockPlan,
    EncoderMethod,
    Options,
    PlanNodes,
    Site,
    check_bool,
    check_choice,
    check_int_list,
    check_layers,
    check_ratio,
    option,
    walk_blocks,
)

SCORE_MODS_OF_QUERY_ROW = {"scale", "mask"}  # logit terms `query_row_scores(q, k, bias, scale)` reproduces
SCORES = ("auto", "cls", "received")
KEEP_RATIO_HELP = "fraction of the non-protected tokens kept at each chosen layer, in (0, 1]"
LAYERS_HELP = "blocks (0-based) that prune; default: the paper's 4th, 7th and 10th of 12, scaled to the depth"


def cls_row_of_probabilities(probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention of the first (CLS) query, `[B, N]`, from the block's softmax output
    `[B, H, N, N]` or `[B*H, N, N]` (`x [B, N, C]` gives the batch)."""
    return probs.reshape(x.shape[0], -1, probs.shape[-2], probs.shape[-1])[:, :, 0, :].mean(dim=1)


def keep_count(num_tokens: int, num_protected: int, keep_ratio: float) -> int:
    """Number of candidate tokens EViT keeps: ceil(rho * (N - P))."""
    return math.ceil(keep_ratio * (num_tokens - num_protected))


def default_layers(num_blocks: int) -> list[int]:
    """EViT's reduction layers (4th, 7th, 10th of 12, 0-based 3/6/9) scaled to the model depth."""
    layers = sorted({round(num_blocks * k / 4) for k in (1, 2, 3)})
    return [i for i in layers if 0 <= i < num_blocks]


@dataclass(frozen=True)
class EvitOptions(Options):
    keep_ratio: float = option(0.7, KEEP_RATIO_HELP)
    layers: tuple[int, ...] | None = option(None, LAYERS_HELP)
    fuse: bool = option(True, "fuse the pruned tokens into one extra token (else drop them)")
    prop_attn: bool = option(False, "add log(size) to later attention logits (off in the paper)")
    score: str = option("auto", "what ranks the tokens: 'cls' (the CLS token's attention, the paper), 'received' "
                                "(the mean attention each token receives from all queries: models without a CLS "
                                "token) or 'auto' (cls when the model has a protected leading token, else received)",
                        choices=SCORES)

    def validate(self) -> None:
        self.set("keep_ratio", check_ratio("keep_ratio", self.keep_ratio))
        if self.layers is not None:
            self.set("layers", check_int_list("layers", self.layers, lo=None))
        check_bool("fuse", self.fuse)
        check_bool("prop_attn", self.prop_attn)
        check_choice("score", self.score, SCORES)


def resolve_score(score: str, num_protected: int) -> str:
    """The score EViT ranks by on a model with `num_protected` leading protected tokens: `score`, or for
    "auto" the CLS row when there is a protected leading token, else the received attention."""
    if score == "auto":
        return "cls" if num_protected >= 1 else "received"
    return score


@dataclass
class EvitPlan(BlockPlan):
    """EViT's block plan plus what ranks the tokens there ("cls" or "received")."""

    score: str = "cls"


class Evit(EncoderMethod):
    name = "evit"
    summary = "keep the tokens the CLS token attends to most, fuse the rest (Liang et al., ICLR 2022)"
    options_type = EvitOptions

    def check_common(self, options: Options, unmerge: bool) -> None:
        assert isinstance(options, EvitOptions)
        if unmerge and not options.fuse:
            raise TokenReduceError(
                "unmerge needs every original token to land in a kept slot; EViT with fuse=False drops "
                "tokens. Use fuse=True or unmerge=False.", setting="unmerge", hint="fuse=True or unmerge=False")

    def plan_blocks(self, options: Options, analysis: ModelAnalysis) -> list[BlockPlan]:
        assert isinstance(options, EvitOptions)
        nb, p = len(analysis.blocks), analysis.num_protected
        if options.layers is not None:
            check_layers(options.layers, nb)
        layers = list(options.layers) if options.layers is not None else default_layers(nb)
        score = resolve_score(options.score, p)
        if score == "cls" and p < 1:
            raise TokenReduceError(
                "EViT with score='cls' ranks tokens by the CLS token's attention, and this model has no protected "
                "leading token; use score='received' (the attention each token receives), pass protected_tokens=1 "
                "if its first token is a CLS token, or use method='tome'",
                setting="score", hint="score='received', protected_tokens=1 or method='tome'")

        def reduce(b: Any, bp: BlockPlan) -> None:
            n = bp.tokens_in
            k = keep_count(n, p, options.keep_ratio)
            out = p + k + (1 if options.fuse else 0)
            if n - p <= 0:
                bp.reason = f"no candidate tokens: the block has {n} tokens and {p} are protected"
            elif k >= n - p or out >= n:
                bp.reason = f"keep_ratio={options.keep_ratio} keeps all {n - p} candidate tokens"
            elif k < 1:
                raise TokenReduceError(
                    f"EViT keep_ratio={options.keep_ratio} keeps no token at block {b.index} ({n} tokens)",
                    setting="keep_ratio")
            else:
                bp.action, bp.keep, bp.tokens_out = self.name, k, out

        return [EvitPlan(**vars(bp), score=score) for bp in walk_blocks(analysis, lambda b: b.index in layers, reduce)]

    def emit(self, options: Options, site: Site) -> PlanNodes:
        assert isinstance(options, EvitOptions)
        b = site.builder
        tr = torch.ops.tokenreduce
        att = site.block.attention
        received = isinstance(site.plan, EvitPlan) and site.plan.score == "received"
        # the logits carry terms q and k alone cannot recompute (DeBERTa's relative c2p/p2c terms, soft-capping,
        # talking heads, masked_fill): read the block's own probabilities instead
        own_probs = att.kind == "explicit" and bool({m.kind for m in att.score_mods} - SCORE_MODS_OF_QUERY_ROW)
        if received and own_probs:
            scores = b.add(attention_graph.received_of_block, (att.node, site.x, site.valid))
        elif received:
            scores = b.add(tr.received_scores.default, (site.q, site.k, site.bias, site.scale, site.valid))
        elif own_probs:
            scores = b.add(cls_row_of_probabilities, (att.node, site.x))
        else:
            scores = b.add(tr.query_row_scores.default, (site.q, site.k, site.bias, site.scale, 0))
        plan = b.add(tr.topk_plan.default, (scores, site.plan.keep, site.num_protected, options.fuse, site.valid))
        return PlanNodes(slot=b.item(plan, 0), weight=b.item(plan, 1), rep=b.item(plan, 2))

    def action(self, bp: BlockPlan, analysis: ModelAnalysis) -> str:
        text = f"evit keep {bp.keep}/{bp.tokens_in - analysis.num_protected}"
        return text + (" (received)" if isinstance(bp, EvitPlan) and bp.score == "received" else "")

    def references(self) -> dict[Any, Callable[..., Any]]:
        return dict(attention_graph.REFERENCES)

    sweep_option = "keep_ratio"

    def label(self, values: Mapping[str, Any]) -> str:
        return f"EViT keep {values.get('keep_ratio', EvitOptions.keep_ratio):g}"

    def identity_reason(self, values: Mapping[str, Any]) -> str | None:
        if values.get("keep_ratio", EvitOptions.keep_ratio) >= 1.0:
            return "keep_ratio=1 keeps every token: EViT needs a ratio below 1, e.g. keep_ratio=0.7"
        return None

    def inspect_values(self, analysis: ModelAnalysis, given: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        return {"layers": default_layers(len(analysis.blocks))}, "default layers (depth x 1/4, 2/4, 3/4)"


METHOD = Evit()
