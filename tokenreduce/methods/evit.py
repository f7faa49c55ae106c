"""EViT: keep the tokens the CLS token attends to most, fuse the rest into one.

Source: Liang, Ge, Tong, Song, Wang, Xie, "Not All Patches are What You Need: Expediting Vision
Transformers via Token Reorganizations", ICLR 2022. Written from the paper and docs/methods.md: top-k of
the head-averaged CLS attention over the non-protected tokens (descending order, as the official code),
the pruned tokens fused into one token by their attention. Deviation, on purpose: the fused token is the
attention-weighted *average* (the official code's unnormalised sum shrinks the token on models that were
not fine-tuned with EViT).

Refuses: keep counts outside `1 .. N - P`.
"""

from __future__ import annotations

import math

import torch

from tokenreduce.errors import TokenReduceError


def keep_count(num_tokens: int, num_protected: int, keep_ratio: float) -> int:
    """Number of candidate tokens EViT keeps: ceil(rho * (N - P))."""
    return math.ceil(keep_ratio * (num_tokens - num_protected))


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


def default_layers(num_blocks: int) -> list[int]:
    """EViT's reduction layers (4th, 7th, 10th of 12, 0-based 3/6/9) scaled to the model depth."""
    layers = sorted({round(num_blocks * k / 4) for k in (1, 2, 3)})
    return [i for i in layers if 0 <= i < num_blocks]
