"""ToMe bipartite soft matching as a plan.

Source: Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman, "Token Merging: Your ViT But Faster", ICLR 2023,
and the arithmetic of its official timm patch (`bipartite_soft_matching`): alternate A/B split over all
tokens, cosine similarity of head-averaged keys, each A token's best B match, the r best edges merged.
Written from the paper and docs/methods.md; the token order of the output equals the official order so
the same r on the same weights gives the same outputs.

The plan is returned as `slot [B, N]` (the output slot of every input token, in `0 .. N - r - 1`) and
`rep [B, N - r]` (one representative input token per slot: the B token of a merged slot), which is
what `apply_plan` and the token-state bookkeeping (masks, positions) consume.

Refuses: `r` larger than `(N - P) // 2` (the official code silently clamps; we raise).
"""

from __future__ import annotations

import torch

from tokenreduce.errors import TokenReduceError


def max_r(num_tokens: int, num_protected: int) -> int:
    """Largest merge count one ToMe step can take from `num_tokens` with `num_protected` kept."""
    return max((num_tokens - num_protected) // 2, 0)


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
    if metric.dim() == 4:
        metric = metric.mean(dim=1)
    bsz, n, _ = metric.shape
    if r < 0 or r > max_r(n, num_protected):
        raise TokenReduceError(
            f"ToMe r={r} is too large for {n} tokens with {num_protected} protected; "
            f"the largest valid r is {max_r(n, num_protected)}"
        )
    device = metric.device
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, 0::2, :], metric[:, 1::2, :]
    n_a, n_b = a.shape[1], b.shape[1]
    scores = a @ b.transpose(-1, -2)  # [B, nA, nB]
    p_a, p_b = (num_protected + 1) // 2, num_protected // 2
    neg_inf = -torch.inf
    if valid is not None:  # cross-padding edges rank below every cosine: padding->real, then real->padding
        va, vb = valid[:, 0::2], valid[:, 1::2]
        pad_to_real = ~va[:, :, None] & vb[:, None, :]
        real_to_pad = va[:, :, None] & ~vb[:, None, :]
        scores = scores.masked_fill(pad_to_real, -2.0).masked_fill(real_to_pad, -3.0)
    if p_a:
        scores = scores.masked_fill((torch.arange(n_a, device=device) < p_a)[None, :, None], neg_inf)
    if p_b:
        scores = scores.masked_fill((torch.arange(n_b, device=device) < p_b)[None, None, :], neg_inf)

    node_max, node_idx = scores.max(dim=-1)
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
    # Ties exist only among cross-padding sentinels; break them by index (lower first) so every runtime
    # (torch, ONNX TopK) orders them the same. Cosines are in [-1, 1], so real edges are untouched.
    a_idx = torch.arange(n_a, device=device, dtype=node_max.dtype)
    node_max = torch.where(node_max < -1.5, node_max - 1e-6 * a_idx, node_max)
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


def r_schedule(r: int | tuple[int, ...], num_blocks: int, schedule: str = "constant") -> list[int]:
    """Per-block merge counts.

    A list is padded with zeros (longer than the model is an error); an int is constant, or with
    `schedule="decreasing"` ToMe's (r, -0.5) inflection schedule: r*1.5 merges in the first block falling
    linearly to r*0.5 in the last (same total).
    """
    if isinstance(r, tuple | list):
        if len(r) > num_blocks:
            raise TokenReduceError(
                f"r lists {len(r)} blocks but the model has {num_blocks}; give at most {num_blocks} values"
            )
        return list(r) + [0] * (num_blocks - len(r))
    if schedule == "constant" or num_blocks == 1:
        return [int(r)] * num_blocks
    lo = int(r * 1.5)
    hi = 2 * r - lo
    step = (hi - lo) / (num_blocks - 1)
    return [int(lo + step * i) for i in range(num_blocks)]
