"""The plan arithmetic every method builds on: pure tensor functions `score -> plan`.

These are the CPU implementations of the plan ops (`ops.py`: `tome_plan`, `topk_plan`, `keep_plan`) and
the references the GPU kernels are tested against. They know nothing of graphs or models; shapes are in
the docstrings. Each is written export-safe: top-k with a constant k, no scatter for slot assignment, no
data-dependent shapes, so the ONNX lowering inlines them as standard ops.

* `bipartite_plan` -- ToMe's bipartite soft matching (Bolya et al., "Token Merging: Your ViT But Faster",
  ICLR 2023; arithmetic of the official timm patch, facebookresearch/ToMe `tome/merge.py`, read, not
  copied). Used by ToMe and every method that merges by bipartite matching.
* `topk_plan` -- EViT's keep-top-k-and-fuse (Liang et al., "Not All Patches are What You Need", ICLR
  2022). Deviation, on purpose: the fused token is the attention-weighted *average*.
* `keep_plan`, `pool_scores` -- the decoder prefill selection (FastV / PyramidDrop / GemFilter): keep the
  best span tokens in original order; optional SnapKV-style score pooling.

Refuses: ToMe `r` above `(N - P) // 2`, EViT keep counts outside `1 .. N - P`, rows over `MAX_TOKENS`.
"""

from __future__ import annotations

import torch

from tokenreduce.errors import TokenReduceError

MAX_TOKENS = 1 << 16  # keep_plan's tie-break is exact up to this many tokens per row


def max_r(num_tokens: int, num_protected: int) -> int:
    """Largest merge count one ToMe step can take from `num_tokens` with `num_protected` kept."""
    return max((num_tokens - num_protected) // 2, 0)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` scaled to unit length along the last axis. A zero row (DeBERTa zeroes padding embeddings; with a
    bias-free key projection its key is 0) stays 0, so its cosine with every token is 0 instead of NaN, whose
    ordering differs between torch and ONNX TopK."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def merge_metric(metric: torch.Tensor, r: int, num_protected: int, method: str,
                 setting: str | None = None) -> torch.Tensor:
    """The `[B, N, d]` matching metric of a merge step (keys `[B, H, N, d]` are averaged over heads), after
    checking `0 <= r <= max_r(N, num_protected)`; the error names `method` and the largest valid r."""
    if metric.dim() == 4:
        metric = metric.mean(dim=1)
    n = metric.shape[1]
    if r < 0 or r > max_r(n, num_protected):
        raise TokenReduceError(f"{method} r={r} is too large for {n} tokens with {num_protected} protected; "
                               f"the largest valid r is {max_r(n, num_protected)}", setting=setting)
    return metric


def mask_protected(scores: torch.Tensor, num_protected: int) -> torch.Tensor:
    """Bipartite scores `[B, nA, nB]` (A = even tokens, B = odd) with every edge from or to a protected token
    set to -inf: the leading `num_protected` tokens are (P + 1) // 2 A tokens and P // 2 B tokens."""
    p_a, p_b = (num_protected + 1) // 2, num_protected // 2
    n_a, n_b = scores.shape[-2], scores.shape[-1]
    if p_a:
        scores = scores.masked_fill((torch.arange(n_a, device=scores.device) < p_a)[None, :, None], -torch.inf)
    if p_b:
        scores = scores.masked_fill((torch.arange(n_b, device=scores.device) < p_b)[None, None, :], -torch.inf)
    return scores


def bipartite_plan(
    metric: torch.Tensor, r: int, num_protected: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan one ToMe merge step.

    Args:
        metric: `[B, N, d]` head-averaged keys, or `[B, H, N, d]` keys (averaged over heads here).
        r: tokens to merge away (output has `N - r` tokens).
        num_protected: leading tokens that are never merged (CLS, distillation, registers).
        valid: optional `[B, N]` bool, False for padding. Merges never cross valid/padding.

    Returns:
        slot: `[B, N]` int64, output slot of each input token.
        rep: `[B, N - r]` int64, representative input token of each output slot.
        keep: `[B, N]` merge-weight multiplier (metric dtype): 1, or 0 for a source merged across padding.
    """
    metric = merge_metric(metric, r, num_protected, "ToMe")
    n = metric.shape[1]
    metric = unit_rows(metric)
    a, b = metric[:, 0::2, :], metric[:, 1::2, :]
    scores = a @ b.transpose(-1, -2)  # [B, nA, nB]
    if valid is not None:  # cross-padding edges rank below every cosine: padding->real, then real->padding
        va, vb = valid[:, 0::2], valid[:, 1::2]
        pad_to_real = ~va[:, :, None] & vb[:, None, :]
        real_to_pad = va[:, :, None] & ~vb[:, None, :]
        scores = scores.masked_fill(pad_to_real, -2.0).masked_fill(real_to_pad, -3.0)
    node_max, node_idx = mask_protected(scores, num_protected).max(dim=-1)
    return plan_from_matches(node_max, node_idx, r, num_protected, valid, n, metric.dtype)


def plan_from_matches(
    node_max: torch.Tensor,
    node_idx: torch.Tensor,
    r: int,
    num_protected: int,
    valid: torch.Tensor | None,
    num_tokens: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plan from each A token's best B match (`node_max`, `node_idx`: `[B, nA]`): sort the edges,
    assign output slots. Shared by `bipartite_plan` and the GPU path (Triton matching kernel + this).

    Returns `slot [B, N]`, `rep [B, N - r]` (int64) and `keep [B, N]` (`dtype`), as `bipartite_plan`.
    """
    n = num_tokens
    if r < 0 or r > max_r(n, num_protected):
        raise TokenReduceError(
            f"ToMe r={r} is too large for {n} tokens with {num_protected} protected; "
            f"the largest valid r is {max_r(n, num_protected)}"
        )
    bsz, n_a = node_max.shape
    n_b = n // 2
    device = node_max.device
    p_a, p_b = (num_protected + 1) // 2, num_protected // 2
    # Ties: among cross-padding sentinels, and among padding tokens whose hidden states are identical (DeBERTa
    # zeroes padding embeddings, so their keys and cosines are equal). Break them by index (lower first) so
    # every runtime (torch, ONNX TopK) orders them the same; rows of real A tokens are untouched.
    a_idx = torch.arange(n_a, device=device, dtype=node_max.dtype)
    tie = node_max < -1.5
    if valid is not None:
        tie = tie | ~valid[:, 0::2]
    node_max = torch.where(tie, node_max - 1e-6 * a_idx, node_max)
    # Sorts are top-k with a constant k (exports as TopK with a constant k; no data-dependent shapes).
    edge_idx = node_max.topk(n_a, dim=-1, largest=True, sorted=True).indices  # most similar first
    n_unm = n_a - r
    # Every output slot follows from each A token's rank (inverse permutation of edge_idx) without any
    # scatter, so the plan exports to ONNX as TopK/Gather/Where/CumSum only.
    rank = edge_idx.topk(n_a, dim=-1, largest=False, sorted=True).indices
    merged = rank < r
    if num_protected > 0:  # unmerged A tokens are sorted by index (official), so position = running count
        pos = (~merged).long().cumsum(dim=-1) - 1
        unm_idx = edge_idx[:, r:].topk(n_unm, dim=-1, largest=False, sorted=True).values
    else:
        pos = rank - r
        unm_idx = edge_idx[:, r:]
    j = torch.arange(n_b, device=device)
    b_slot = torch.where(j < p_b, 2 * j + 1, num_protected + (n_unm - p_a) + j - p_b).expand(bsz, n_b)
    unm_slot = torch.where(pos < p_a, 2 * pos, num_protected + pos - p_a)
    slot_a = torch.where(merged, b_slot.gather(1, node_idx), unm_slot)
    # interleave A (even positions) and B (odd positions) back into token order
    slot = _interleave(slot_a, b_slot)
    # merge weight multiplier: 0 for a source merged across padding (only when r leaves no other choice)
    keep_a = torch.ones(bsz, n_a, dtype=dtype, device=device)
    if valid is not None:
        va, vb = valid[:, 0::2], valid[:, 1::2]
        cross = merged & (va != vb.gather(1, node_idx))
        keep_a = keep_a.masked_fill(cross, 0.0)
    keep = _interleave(keep_a, torch.ones_like(keep_a[:, :n_b]))

    # representative input token per slot: protected tokens keep their index, then unmerged A, then B
    rep = torch.cat(
        [
            torch.arange(num_protected, device=device).expand(bsz, num_protected),
            2 * unm_idx[:, p_a:],
            (2 * j[p_b:] + 1).expand(bsz, n_b - p_b),
        ],
        dim=1,
    )
    return slot, rep, keep


def _interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Tokens back in sequence order from the A (even positions) and B (odd positions) halves."""
    out = torch.stack([a[:, : b.shape[1]], b], dim=-1).reshape(a.shape[0], 2 * b.shape[1])
    return torch.cat([out, a[:, b.shape[1]:]], dim=1) if a.shape[1] > b.shape[1] else out


def topk_plan(
    scores: torch.Tensor, keep: int, num_protected: int, fuse: bool = True, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan one EViT step.

    Args:
        scores: `[B, N]` attention of the CLS query over the keys (probabilities, head-averaged).
        keep: candidates kept (a constant, so the plan has a static shape).
        num_protected: leading tokens always kept, in order.
        fuse: fuse the pruned tokens into one extra slot (else they go to the dump slot `N'`).
        valid: optional `[B, N]` bool; padding never outranks a real token.

    Returns:
        slot `[B, N]` int64 (dropped tokens get `N'`), weight `[B, N]` (1 for kept tokens, the attention
        for fused ones), rep `[B, N']` int64 representative input token per output slot.
    """
    bsz, n = scores.shape
    cand = n - num_protected
    if keep < 1 or keep > cand:
        raise TokenReduceError(f"EViT keeps {keep} of {cand} candidate tokens; keep must be in 1..{cand}")
    device = scores.device
    cand_scores = scores[:, num_protected:]
    ranked = cand_scores
    if valid is not None:
        # padding ranks below every probability, ordered by index (lower first) so torch.topk and ONNX
        # TopK (which breaks ties by index) keep the same padding tokens in the same order
        sentinel = -1.0 - 1e-6 * torch.arange(cand, device=device, dtype=cand_scores.dtype)
        ranked = torch.where(valid[:, num_protected:], cand_scores, sentinel)
    _, idx = ranked.topk(keep, dim=-1, largest=True, sorted=True)  # [B, keep]

    n_out = num_protected + keep + (1 if fuse else 0)
    pruned_slot = num_protected + keep  # the fused slot, or the dump slot when not fusing
    # slot of each candidate = its position in the top-k list (one-hot compare, no scatter: exports to
    # Equal/ReduceMax/ReduceSum only)
    hit = idx[:, :, None] == torch.arange(cand, device=device)[None, None, :]  # [B, keep, cand]
    kept = hit.any(dim=1)
    pos = (hit.long() * torch.arange(keep, device=device)[None, :, None]).sum(dim=1)
    cand_slot = torch.where(kept, num_protected + pos, torch.full_like(pos, pruned_slot))
    prot_slot = torch.arange(num_protected, device=device).expand(bsz, num_protected)
    slot = torch.cat([prot_slot, cand_slot], dim=1)

    weight = torch.cat(
        [torch.ones_like(scores[:, :num_protected]), torch.where(kept, torch.ones_like(cand_scores), cand_scores)],
        dim=1,
    )
    reps = [prot_slot, num_protected + idx]
    if fuse:
        best_pruned = cand_scores.masked_fill(kept, -torch.inf).argmax(dim=-1, keepdim=True)
        reps.append(num_protected + best_pruned)
    rep = torch.cat(reps, dim=1)
    assert rep.shape[1] == n_out
    return slot, weight, rep


def pool_scores(scores: torch.Tensor, window: int) -> torch.Tensor:
    """Max of each token's score and its neighbours' within `window` (odd) -> `[B, N]`.

    An opt-in extension, not part of the three papers: SnapKV (Li et al., "SnapKV: LLM Knows What You are
    Looking for Before Generation", 2024) pools attention scores so a selected token brings its
    neighbours along, which keeps multi-token facts (a number split into digit tokens) whole.
    """
    if window <= 1:
        return scores
    pad = window // 2
    return torch.nn.functional.max_pool1d(scores[:, None, :], window, stride=1, padding=pad)[:, 0, :]


def keep_plan(scores: torch.Tensor, droppable: torch.Tensor, keep: int, num_droppable: int) -> torch.Tensor:
    """Which tokens survive one step, in original order.

    Args:
        scores: `[B, N]` last-query attention over the current tokens (any real values).
        droppable: `[B, N]` bool, the span tokens still present (exactly `num_droppable` per row).
        keep: span tokens to keep (constant, so the output shape is static).
        num_droppable: span tokens per row before this step (the caller checked it per row).

    Returns:
        `[B, N - num_droppable + keep]` int64 indices into the current tokens, ascending: every
        non-span token, plus the `keep` highest-scoring span tokens (ties go to the earlier token).
        Scores must be >= 0 (attention probabilities, possibly pooled).
    """
    n = scores.shape[-1]
    if n > MAX_TOKENS:
        raise TokenReduceError(f"keep_plan ranks at most {MAX_TOKENS} tokens per row, got {n}")
    n_out = n - num_droppable + keep
    # Non-span tokens rank above everything; span tokens by score, earlier first among equal scores.
    # Export-safe (two ONNX TopKs with constant k, no stable sort). The float64 key scales a positive
    # score by (1 - position * 2^-42): at most 2^-26 relative for N <= 2^16, below half an fp32 ulp, so
    # two different fp32 scores never swap, while equal scores (e.g. after score_pool) are ordered by
    # position. Zero scores get -(position + 1): below every positive score, again earlier first.
    pos = torch.arange(n, device=scores.device, dtype=torch.float64)
    s64 = scores.to(torch.float64)
    key = torch.where(s64 > 0, s64 * (1.0 - pos * 2.0**-42), -(pos + 1.0))
    key = torch.where(droppable, key, torch.full_like(key, float("inf")))
    idx = key.topk(n_out, dim=-1).indices
    return idx.topk(n_out, dim=-1, largest=False).values  # ascending: original order
