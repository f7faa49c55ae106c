"""Zero-TPrune: prune the unimportant tokens (PageRank over the attention graph), then the redundant ones.

Source: Wang, Dedhia, Jha, "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph in
Pre-Trained Transformers", CVPR 2024 (arXiv 2305.17328; project page jha-lab.github.io/zerotprune). No
official code was reachable from here: the arithmetic below is written from the paper's description, and a
third-party re-implementation (MahdiarKhodabakhshi/Zero-TPrune, `tokenrank_vit.py`: its S-stage partitions
"Seq-U"/"Alt"/..., cosine of keys) was read, not copied. At a pruning block with `M = N - P` candidate tokens
(the `P` protected leading tokens are always kept) and keep ratio `rho`:

1. I-stage (importance): the block's attention probabilities `P[h] [N, N]` (recomputed from its q, k and
   mask for this block only, `tokenreduce::pagerank_scores`, `kernels/attention_graph.py`) are the weighted
   adjacency of a graph whose edge i -> j says how much query i attends to key j. Weighted PageRank per head:
   `s^0 = 1/N` (over the valid tokens), `s^{t+1} = P[h]^T s^t`, a fixed number of `iterations` (the paper
   iterates until the change is small; a fixed count keeps the graph static). Heads are aggregated by the root
   mean square of their scores (the paper's emphasis on heads that concentrate on an informative region;
   `head_aggregation="mean"` for the plain mean).
2. Counts: `keep = ceil(rho * M)` candidates stay; of the `R = M - keep` removed, `s = floor(similarity_share
   * R)` go in the S-stage and `R - s` in the I-stage.
3. I-stage pruning: the `R - s` candidates with the lowest importance go (padding first, by index).
4. S-stage (similarity): the `keep + s` survivors, ordered by importance, are split sequentially: the more
   important half `B` (`ceil`), the less important half `A` (`floor`). Each A token's similarity is the cosine
   of its head-averaged key with its most similar B token; the `s` A tokens with the highest similarity go
   (they repeat an important token). Needs `s <= |A|`.
5. Apply: the kept candidates stay in their original order after the protected tokens (a pruning mask, as the
   paper's); `N' = P + keep`. Pruned tokens are dropped, not merged.

Deliberate differences from the paper, each documented in docs/methods.md ("Zero-TPrune"): a fixed number of
PageRank iterations; no variance-based head filter (it needs thresholds tuned per model); one partition (the
sequential split above); the counts of the two stages come from one keep ratio and one share; padding (not in
the paper) scores 0 (padding keys receive no attention and padding queries give none) and is pruned first.

Refuses: `unmerge=True` (pruned tokens leave no slot to restore), options outside their ranges (the messages
name them), a block where the S-stage would remove more tokens than its A half holds (the error names the
largest valid `similarity_share` there), layers outside the model.
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
from tokenreduce.kernels.plans import unit_rows
from tokenreduce.methods.base import (
    BlockPlan,
    EncoderMethod,
    Options,
    PlanNodes,
    Site,
    check_choice,
    check_int,
    check_int_list,
    check_layers,
    check_ratio,
    fail,
    option,
    walk_blocks,
)
from tokenreduce.methods.evit import KEEP_RATIO_HELP, LAYERS_HELP, SCORE_MODS_OF_QUERY_ROW, default_layers, keep_count

HEAD_AGGREGATIONS = ("rms", "mean")
MAX_ITERATIONS = 100  # each iteration is one [N, N] matrix-vector product per head in the graph


def stage_counts(num_candidates: int, keep: int, similarity_share: float) -> tuple[int, int]:
    """`(i_stage, s_stage)`: how many of the `num_candidates - keep` removed candidates each stage removes.
    The S-stage takes `floor(similarity_share * removed)` (to 1e-9, so a printed share is safe to pass back)."""
    removed = num_candidates - keep
    similar = math.floor(similarity_share * removed + 1e-9)
    return removed - similar, similar


def largest_similar(keep: int, removed: int) -> int:
    """Largest S-stage count `s <= removed` whose A half (`(keep + s) // 2` tokens) can give `s` tokens."""
    return max((s for s in range(removed + 1) if s <= (keep + s) // 2), default=0)


def zero_tprune_plan(
    scores: torch.Tensor,
    k: torch.Tensor,
    num_protected: int,
    keep: int,
    similar: int,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan one Zero-TPrune step (I-stage, then S-stage) on importance scores.

    Args:
        scores: `[B, N]` importance of every token (the PageRank of `pagerank_scores`; >= 0).
        k: `[B, H, N, d]` attention keys (averaged over heads here) or `[B, N, d]`: the S-stage's similarity.
        num_protected: leading tokens always kept in place (CLS, registers).
        keep: candidates kept (`1 <= keep`), a constant so the output shape is static.
        similar: candidates the S-stage removes (`0 <= similar <= (keep + similar) // 2`); the I-stage removes
            the other `N - P - keep - similar`.
        valid: optional `[B, N]` bool, False for padding: padding ranks below every real token in the I-stage
            and is the first to go in the S-stage (ordered by index, so torch and ONNX TopK agree).

    Returns:
        slot `[B, N]` int64 (pruned tokens get `N' = P + keep`, the dump slot), rep `[B, N']` int64: the
        protected tokens, then the kept candidates in their original order.
    """
    bsz, n = scores.shape
    p, m = num_protected, n - num_protected
    survivors = keep + similar
    n_a = survivors // 2
    n_b = survivors - n_a
    if keep < 1 or similar < 0 or survivors > m or similar > n_a:
        raise TokenReduceError(
            f"Zero-TPrune cannot keep {keep} and remove {similar} by similarity among {m} candidate tokens: "
            f"keep must be in 1..{m}, and the S-stage can remove at most half of the {survivors} tokens the "
            "I-stage leaves")
    device = scores.device
    idx = torch.arange(m, device=device)
    cand = scores[:, p:].float()
    vc = valid[:, p:] if valid is not None else None
    if vc is not None:  # padding below every score (>= 0), ordered by index
        cand = torch.where(vc, cand, -1.0 - 1e-6 * idx.float())
    order = cand.topk(survivors, dim=-1, largest=True, sorted=True).indices  # I-stage: most important first
    b_idx, a_idx = order[:, :n_b], order[:, n_b:]
    kept_a = a_idx
    if similar > 0:
        metric = (k.mean(dim=1) if k.dim() == 4 else k)[:, p:].float()
        metric = unit_rows(metric)
        sim = _rows(metric, a_idx) @ _rows(metric, b_idx).transpose(-1, -2)  # [B, nA, nB]
        best = sim.max(dim=-1).values  # [B, nA]: each A token's cosine to its most similar B token
        if vc is not None:  # padding above every cosine (<= 1), ordered by index: pruned first
            best = torch.where(vc.gather(1, a_idx), best, 3.0 - 1e-6 * a_idx.float())
        ranked = best.topk(n_a, dim=-1, largest=True, sorted=True).indices  # most redundant first
        kept_a = a_idx.gather(1, ranked[:, similar:])
    kept = torch.cat([b_idx, kept_a], dim=1).topk(keep, dim=-1, largest=False, sorted=True).values  # original order
    # slot of each candidate = its position among the kept ones (one-hot compare, no scatter)
    hit = kept[:, :, None] == idx[None, None, :]  # [B, keep, M]
    is_kept = hit.any(dim=1)
    pos = (hit.long() * torch.arange(keep, device=device)[None, :, None]).sum(dim=1)
    cand_slot = torch.where(is_kept, p + pos, torch.full_like(pos, p + keep))
    prot = torch.arange(p, device=device).expand(bsz, p)
    return torch.cat([prot, cand_slot], dim=1), torch.cat([prot, p + kept], dim=1)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x [B, M, d]` rows picked by `index [B, K]` -> `[B, K, d]`."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


@dataclass(frozen=True)
class ZeroTPruneOptions(Options):
    keep_ratio: float = option(0.7, KEEP_RATIO_HELP)
    layers: tuple[int, ...] | None = option(None, LAYERS_HELP)
    similarity_share: float = option(0.5, "share of each pruning block's removed tokens that the S-stage removes "
                                          "(redundant: most similar to a more important token), in [0, 1]; the "
                                          "I-stage removes the rest (least important by PageRank)")
    iterations: int = option(30, f"weighted PageRank power iterations over the attention graph, 1..{MAX_ITERATIONS}")
    head_aggregation: str = option("rms", "how the per-head PageRank scores combine: 'rms' (root mean square, "
                                          "emphasising heads that concentrate on few tokens, as the paper) or "
                                          "'mean'", choices=HEAD_AGGREGATIONS)

    def validate(self) -> None:
        self.set("keep_ratio", check_ratio("keep_ratio", self.keep_ratio))
        if self.layers is not None:
            self.set("layers", check_int_list("layers", self.layers, lo=None))
        share = self.similarity_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not math.isfinite(share) \
                or not 0.0 <= share <= 1.0:
            raise fail("similarity_share", f"similarity_share must be a number in [0, 1], got {share!r}")
        self.set("similarity_share", float(share))
        check_int("iterations", self.iterations, lo=1, hi=MAX_ITERATIONS)
        check_choice("head_aggregation", self.head_aggregation, HEAD_AGGREGATIONS)


@dataclass
class ZeroTPrunePlan(BlockPlan):
    """The block plan plus how many candidates the S-stage removes (`keep` is the candidates kept)."""

    similar: int = 0


class ZeroTPrune(EncoderMethod):
    name = "zero_tprune"
    summary = ("prune by PageRank over the attention graph, then by similarity to more important tokens "
               "(Wang et al., CVPR 2024)")
    options_type = ZeroTPruneOptions

    def check_common(self, options: Options, unmerge: bool) -> None:
        if unmerge:
            raise TokenReduceError(
                "unmerge needs every original token to land in a kept slot; Zero-TPrune drops the tokens it "
                "prunes. Use unmerge=False, or method='evit' (fuses the pruned tokens) / 'tome'.",
                setting="unmerge", hint="unmerge=False")

    def plan_blocks(self, options: Options, analysis: ModelAnalysis) -> list[BlockPlan]:
        assert isinstance(options, ZeroTPruneOptions)
        nb, p = len(analysis.blocks), analysis.num_protected
        if options.layers is not None:
            check_layers(options.layers, nb)
        layers = list(options.layers) if options.layers is not None else default_layers(nb)

        def reduce(b: Any, bp: BlockPlan) -> None:
            n = bp.tokens_in
            m = n - p
            k = keep_count(n, p, options.keep_ratio)  # >= 1: keep_ratio > 0
            if m <= 0:
                bp.reason = f"no candidate tokens: the block has {n} tokens and {p} are protected"
                return
            if k >= m:
                bp.reason = f"keep_ratio={options.keep_ratio} keeps all {m} candidate tokens"
                return
            _, similar = stage_counts(m, k, options.similarity_share)
            if similar > (k + similar) // 2:
                best = largest_similar(k, m - k)
                share = math.ceil(best / (m - k) * 1000) / 1000  # short, and gives exactly `best`
                if stage_counts(m, k, share)[1] != best:
                    share = best / (m - k)
                raise TokenReduceError(
                    f"Zero-TPrune similarity_share={options.similarity_share} at block {b.index} ({b.name}) asks the "
                    f"S-stage to remove {similar} of the {m - k} pruned tokens, but it pairs each pruned token with a "
                    f"more important one among the {k + similar} the I-stage leaves, so it can remove at most "
                    f"{best}: the largest valid similarity_share there is {share} (or raise keep_ratio)",
                    setting="similarity_share", hint=f"similarity_share={share}")
            bp.action, bp.keep, bp.tokens_out = self.name, k, p + k

        return [ZeroTPrunePlan(**vars(bp), similar=stage_counts(bp.tokens_in - p, bp.keep, options.similarity_share)[1]
                               if bp.reduces else 0)
                for bp in walk_blocks(analysis, lambda b: b.index in layers, reduce)]

    def emit(self, options: Options, site: Site) -> PlanNodes:
        assert isinstance(options, ZeroTPruneOptions) and isinstance(site.plan, ZeroTPrunePlan)
        b = site.builder
        att = site.block.attention
        rms = options.head_aggregation == "rms"
        if att.kind == "explicit" and {m.kind for m in att.score_mods} - SCORE_MODS_OF_QUERY_ROW:
            # logits q and k alone do not give (relative-position terms, soft-capping, masked_fill): rank over
            # the block's own probabilities
            scores = b.add(attention_graph.pagerank_of_block, (att.node, site.x, site.valid, options.iterations, rms))
        else:
            scores = b.add(torch.ops.tokenreduce.pagerank_scores.default,
                           (site.q, site.k, site.bias, site.scale, site.valid, options.iterations, rms))
        plan = b.add(zero_tprune_plan, (scores, site.k, site.num_protected, site.plan.keep, site.plan.similar,
                                        site.valid))
        return PlanNodes(slot=b.item(plan, 0), weight=None, rep=b.item(plan, 1))

    def action(self, bp: BlockPlan, analysis: ModelAnalysis) -> str:
        similar = bp.similar if isinstance(bp, ZeroTPrunePlan) else 0
        cand = bp.tokens_in - analysis.num_protected
        return f"zero_tprune keep {bp.keep}/{cand} (I -{cand - bp.keep - similar}, S -{similar})"

    def references(self) -> dict[Any, Callable[..., Any]]:
        return dict(attention_graph.REFERENCES)

    sweep_option = "keep_ratio"

    def label(self, values: Mapping[str, Any]) -> str:
        return f"Zero-TPrune keep {values.get('keep_ratio', ZeroTPruneOptions.keep_ratio):g}"

    def identity_reason(self, values: Mapping[str, Any]) -> str | None:
        if values.get("keep_ratio", ZeroTPruneOptions.keep_ratio) >= 1.0:
            return "keep_ratio=1 keeps every token: Zero-TPrune needs a ratio below 1, e.g. keep_ratio=0.7"
        return None

    def inspect_values(self, analysis: ModelAnalysis, given: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        return {"layers": default_layers(len(analysis.blocks))}, "default layers (depth x 1/4, 2/4, 3/4)"


METHOD = ZeroTPrune()
