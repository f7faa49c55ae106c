"""Custom ops of the decoder prefill methods (`torch.ops.tokenreduce.keep_plan`, `capped_row_scores`).

One named node in the graph for the plan step of FastV / PyramidDrop / GemFilter; its CPU implementation
is `kernels.plans.keep_plan`, and the fake implementation states the static output shape. The score step
reuses `tokenreduce::query_row_scores` (row -1: the last query) when the model's logits are plain
`q k^T * scale + mask`. A model whose attention soft-caps its logits (Gemma 2: `tanh(x / c) * c` between
the scale and the mask) is ranked by `capped_row_scores`, which applies the same cap, so the ranking sees
the probabilities the model's attention computes. `capped_row_scores_reference` is its pure-torch
implementation (also what ONNX export inlines, through the decoder methods' `references()`).
"""

from __future__ import annotations

import torch

from tokenreduce.kernels import plans

NAMESPACE = "tokenreduce"


@torch.library.custom_op(f"{NAMESPACE}::keep_plan", mutates_args=())
def keep_plan(scores: torch.Tensor, droppable: torch.Tensor, keep: int, num_droppable: int) -> torch.Tensor:
    """`[B, N]` scores and droppable mask -> `[B, N - num_droppable + keep]` ascending kept indices."""
    return plans.keep_plan(scores, droppable, keep, num_droppable).contiguous()


@keep_plan.register_fake
def _(scores, droppable, keep, num_droppable):
    return scores.new_empty((scores.shape[0], scores.shape[-1] - num_droppable + keep), dtype=torch.long)


def capped_row_scores_reference(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float,
                                softcap: float, row: int) -> torch.Tensor:
    """Head-averaged attention probabilities of one query row with soft-capped logits.

    Args:
        q: `[B, H, Nq, d]` queries; k: `[B, H|H_kv, N, d]` keys (grouped keys are repeated over the heads).
        bias: optional mask broadcastable to `[B, H, Nq, N]`: bool (True = attend) or additive float.
        scale: the logit scale; softcap: c in `tanh(logits / c) * c` (> 0); row: the query row (-1: last).

    Returns:
        `[B, N]` = `softmax(tanh(q[row] k^T * scale / c) * c + bias[row]).mean(heads)`, in float32 arithmetic,
        cast to q's dtype (the order of Gemma 2's eager attention: scale, cap, then the mask).
    """
    if softcap <= 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    end = row + 1 if row != -1 else None
    qr = q[:, :, row:end, :].float()
    kf = k.float()
    if kf.shape[1] != qr.shape[1]:
        kf = kf.repeat_interleave(qr.shape[1] // kf.shape[1], dim=1)
    logits = torch.tanh((qr @ kf.transpose(-1, -2)) * scale / softcap) * softcap  # [B, H, 1, N]
    if bias is not None:
        if bias.shape[-2] != 1:
            bias = bias[..., row:end, :]
        if bias.dtype == torch.bool:
            logits = logits.masked_fill(~bias, torch.finfo(torch.float32).min)
        else:
            logits = logits + bias.float()
    return logits.softmax(dim=-1).mean(dim=1)[:, 0, :].to(q.dtype)


@torch.library.custom_op(f"{NAMESPACE}::capped_row_scores", mutates_args=())
def capped_row_scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float, softcap: float,
                      row: int) -> torch.Tensor:
    """`capped_row_scores_reference` as one graph node -> `[B, N]`."""
    return capped_row_scores_reference(q, k, bias, scale, softcap, row).contiguous()


@capped_row_scores.register_fake
def _(q, k, bias, scale, softcap, row):
    return q.new_empty((q.shape[0], k.shape[-2]))


REFERENCES = {torch.ops.tokenreduce.capped_row_scores.default: capped_row_scores_reference}
