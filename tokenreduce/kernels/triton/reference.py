"""Pure-torch references of the three fused kernels, split the way the kernels split the work.

These run on any device without triton; the custom ops use them on CPU (`kernels/ops.py`), and the
kernel tests compare the Triton kernels against them (and against arithmetic written in the tests).

- `attention_with_scores`: `F.scaled_dot_product_attention` plus the scores the methods read, computed
  from the materialised fp32 attention matrix (which the kernel never writes).
- `bipartite_match` / `plan_from_matches`: ToMe's `bipartite_soft_matching` (`kernels/plans.py`) cut at the
  point the matching kernel replaces: the row max/argmax of the masked `A @ B^T` cosine matrix, then the
  rest of the plan in torch. `plan_from_matches(bipartite_match(...))` equals `plans.bipartite_plan`
  exactly (tests/kernels/test_triton_ops.py and the interpreter test check it).
- `apply_plan`: `kernels.reference.apply_plan` (one source per slot is the keep-index gather).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenreduce.kernels import reference
from tokenreduce.kernels.plans import plan_from_matches
from tokenreduce.kernels.reference import apply_plan

__all__ = ["apply_plan", "attention_with_row_scores", "attention_with_scores", "bipartite_match", "plan_from_matches", "tome_plan"]


def _additive(bias: torch.Tensor | None, is_causal: bool, m: int, n: int, device: torch.device) -> torch.Tensor | None:
    """The effective additive fp32 mask (bool False and causal-masked keys at -inf), or None."""
    add = None
    if bias is not None:
        add = torch.zeros(bias.shape, device=device).masked_fill(~bias, -torch.inf) if bias.dtype == torch.bool \
            else bias.float()
    if is_causal:
        tril = torch.ones(m, n, dtype=torch.bool, device=device).tril()
        causal = torch.zeros(m, n, device=device).masked_fill(~tril, -torch.inf)
        add = causal if add is None else add + causal
    return add


def attention_with_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    row: int | None = 0,
    col_mean: bool = False,
    head_mean: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Attention output and score vectors of one attention.

    Args:
        q: `[B, H, M, d]`, k, v: `[B, H, N, d]`.
        bias: None, or a mask broadcastable to `[B, H, M, N]`: bool (True = attend) or additive float
            (e.g. `log(size)` for proportional attention).
        scale: logit scale. is_causal: key `j` visible to query `i` iff `j <= i` (SDPA's top-left causal).
        row: query row whose attention over the keys is returned (0: CLS; -1: last token), or None.
        col_mean: also return the mean over the M queries of the attention each key receives.
        head_mean: average the scores over heads (`[B, N]`) instead of per head (`[B, H, N]`).

    Returns:
        `out [B, H, M, d]` (q's dtype), row scores and column means (q's dtype, or None when not asked).
        With `is_causal=False` and `head_mean=True` the row scores equal
        `kernels.reference.query_row_scores(q, k, bias, scale, row)` (the op the fusion pass replaces).
    """
    m, n = q.shape[-2], k.shape[-2]
    mask = bias
    if is_causal:
        mask = _additive(bias, True, m, n, q.device)
        assert mask is not None  # causal: always a tensor
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    rows = cols = None
    if row is not None:
        if head_mean:
            rows = reference.query_row_scores(q, k, mask, scale, row)
        else:
            idx = row % m
            logits = (q[:, :, idx : idx + 1].float() @ k.float().transpose(-1, -2)) * scale
            add = _additive(bias, is_causal, m, n, q.device)
            if add is not None:
                logits = logits + (add[..., idx : idx + 1, :] if add.shape[-2] != 1 else add)
            rows = logits.softmax(-1)[:, :, 0, :].to(q.dtype)
    if col_mean:
        logits = (q.float() @ k.float().transpose(-1, -2)) * scale
        add = _additive(bias, is_causal, m, n, q.device)
        probs = (logits if add is None else logits + add).softmax(-1)  # [B, H, M, N]
        cols = probs.mean(dim=2)
        cols = (cols.mean(dim=1) if head_mean else cols).to(q.dtype)
    return out, rows, cols


def attention_with_row_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float, is_causal: bool,
    row: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `attention_with_scores` op's reference: `(out, head-averaged row scores)` (CPU implementation,
    and what `inline_reference_ops` puts in its place for ONNX and CPU inductor)."""
    out, rows, _ = attention_with_scores(q, k, v, bias, scale, is_causal, row)
    assert rows is not None
    return out, rows


def bipartite_match(
    metric: torch.Tensor, num_protected: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best B match of every A token (ToMe steps 1-5 of docs/methods.md, before the sort).

    Args:
        metric: `[B, N, d]` head-averaged keys (or `[B, H, N, d]`, averaged here).
        num_protected: leading tokens never merged: their A rows and B columns are `-inf`.
        valid: optional `[B, N]` bool; cross-padding pairs score -2 (padding A) or -3 (real A).

    Returns:
        `node_max [B, ceil(N/2)]` (metric dtype) and `node_idx [B, ceil(N/2)]` int64: the largest masked
        cosine of each A token `2i` and the index `j` of its B token `2j + 1` (first index on ties).
    """
    if metric.dim() == 4:
        metric = metric.mean(dim=1)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, 0::2, :], metric[:, 1::2, :]
    n_a, n_b = a.shape[1], b.shape[1]
    scores = a @ b.transpose(-1, -2)
    p_a, p_b = (num_protected + 1) // 2, num_protected // 2
    if valid is not None:
        va, vb = valid[:, 0::2], valid[:, 1::2]
        scores = scores.masked_fill(~va[:, :, None] & vb[:, None, :], -2.0)
        scores = scores.masked_fill(va[:, :, None] & ~vb[:, None, :], -3.0)
    if p_a:
        scores = scores.masked_fill((torch.arange(n_a, device=metric.device) < p_a)[None, :, None], -torch.inf)
    if p_b:
        scores = scores.masked_fill((torch.arange(n_b, device=metric.device) < p_b)[None, None, :], -torch.inf)
    return scores.max(dim=-1)


def tome_plan(
    k: torch.Tensor, r: int, num_protected: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`bipartite_match` then `plan_from_matches`: the reference split of `plans.bipartite_plan`."""
    metric = k.mean(dim=1) if k.dim() == 4 else k
    node_max, node_idx = bipartite_match(metric, num_protected, valid)
    return plan_from_matches(node_max, node_idx, r, num_protected, valid, metric.shape[1], metric.dtype)
