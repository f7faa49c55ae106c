"""The tokenreduce custom ops (`torch.ops.tokenreduce.*`).

Each op is one named node in FX, torch.export and inductor graphs, with a pure-torch CPU implementation
(the references in `reference.py` and `plans.py`) and a fake implementation that states the output shapes
(always static given the inputs' shapes and the constant int arguments). GPU kernels plug in with
`<op>.register_kernel("cuda")` next to the reference without touching the passes.

The ops are the score and plan steps that a fused kernel would replace (matching, one-row attention) and
the apply step; cheap bookkeeping (masks, index maps) stays as plain torch functions in the graph.
`attention_with_scores` is attention and EViT/FastV's one-row score in one node; the
`fuse_attention_scores` pass puts it in place of an SDPA + `query_row_scores` pair on GPU graphs.

On CUDA tensors `tome_plan`, `query_row_scores`, `apply_plan` and `attention_with_scores` run the Triton
kernels of `kernels/triton/` (docs/kernels.md); everywhere else, and on CUDA when triton is missing or the
kernel does not cover the inputs (`KernelLimitError`: e.g. float64, head dim > 256), the reference, with a
one-time warning naming the reason; invalid inputs raise on every path. Either way torch.compile and
torch.export see one node per op.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.flop_counter import register_flop_formula, sdpa_flop_count

from tokenreduce.kernels import dispatch, plans, reference
from tokenreduce.kernels import triton as _triton
from tokenreduce.kernels.triton import KernelLimitError
from tokenreduce.kernels.triton import reference as kernel_reference

NAMESPACE = "tokenreduce"


@torch.library.custom_op(f"{NAMESPACE}::tome_plan", mutates_args=())
def tome_plan(
    k: torch.Tensor, r: int, num_protected: int, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe bipartite matching on keys `k [B, H, N, d]` -> (slot [B, N], rep [B, N - r], keep [B, N])."""
    return tuple(t.contiguous() for t in plans.bipartite_plan(k, r, num_protected, valid))  # type: ignore[return-value]


@tome_plan.register_fake
def _(k, r, num_protected, valid):
    bsz, n = k.shape[0], k.shape[-2]
    return (k.new_empty((bsz, n), dtype=torch.long), k.new_empty((bsz, n - r), dtype=torch.long),
            k.new_empty((bsz, n)))


@torch.library.custom_op(f"{NAMESPACE}::topk_plan", mutates_args=())
def topk_plan(
    scores: torch.Tensor, keep: int, num_protected: int, fuse: bool, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EViT/FastV-style top-k plan on `scores [B, N]` -> (slot [B, N], weight [B, N], rep [B, N'])."""
    return tuple(t.contiguous() for t in plans.topk_plan(scores, keep, num_protected, fuse, valid))  # type: ignore[return-value]


@topk_plan.register_fake
def _(scores, keep, num_protected, fuse, valid):
    bsz, n = scores.shape
    n_out = num_protected + keep + (1 if fuse else 0)
    return (
        scores.new_empty((bsz, n), dtype=torch.long),
        scores.new_empty((bsz, n)),
        scores.new_empty((bsz, n_out), dtype=torch.long),
    )


@torch.library.custom_op(f"{NAMESPACE}::query_row_scores", mutates_args=())
def query_row_scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float, row: int) -> torch.Tensor:
    """Head-averaged attention of one query row over the keys -> [B, N]."""
    return reference.query_row_scores(q, k, bias, scale, row).contiguous()


@query_row_scores.register_fake
def _(q, k, bias, scale, row):
    return q.new_empty((q.shape[0], k.shape[-2]))


@torch.library.custom_op(f"{NAMESPACE}::apply_plan", mutates_args=())
def apply_plan(
    x: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor | None, size: torch.Tensor | None, n_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted merge/gather of tokens `x [B, N, C]` into `n_out` slots -> (x', size')."""
    x_out, size_out = reference.apply_plan(x, slot, weight, size, n_out)
    return x_out.contiguous(), size_out.contiguous()


@apply_plan.register_fake
def _(x, slot, weight, size, n_out):
    sdtype = size.dtype if size is not None else x.dtype
    return x.new_empty((x.shape[0], n_out, x.shape[2])), x.new_empty((x.shape[0], n_out), dtype=sdtype)


# FLOP formulas, so reports count the reduction's own cost (multiply-add = 2 FLOPs).
# torch.utils.flop_counter has formulas for the CUDA SDPA kernels only: on CPU, SDPA dispatches to
# `_scaled_dot_product_flash_attention_for_cpu`, which it counted as 0 FLOPs, so every report made on a CPU
# left out the attention products (q k^T and p v; ~7% of ViT-B/16's FLOPs at 197 tokens, more for long
# inputs), whose cost falls quadratically with the token count. Same formula as the CUDA kernels'.
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return int(sdpa_flop_count(q_shape, k_shape, v_shape))


@register_flop_formula(torch.ops.tokenreduce.tome_plan)
def _tome_flops(k_shape, r, num_protected, valid_shape, *args, **kwargs) -> int:
    bsz, _, n, d = k_shape
    return 2 * bsz * ((n + 1) // 2) * (n // 2) * d


@register_flop_formula(torch.ops.tokenreduce.query_row_scores)
def _row_flops(q_shape, k_shape, *args, **kwargs) -> int:
    bsz, heads, n, d = k_shape
    return 2 * bsz * heads * n * d


@register_flop_formula(torch.ops.tokenreduce.apply_plan)
def _apply_flops(x_shape, *args, **kwargs) -> int:
    bsz, n, c = x_shape
    return 2 * bsz * n * c


@torch.library.custom_op(f"{NAMESPACE}::attention_with_scores", mutates_args=())
def attention_with_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float, is_causal: bool,
    row: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA `out [B, H, M, d]` and the head-averaged attention of query `row` over the keys `[B, N]`.

    Equal to `(F.scaled_dot_product_attention(q, k, v, bias, is_causal=is_causal, scale=scale),
    query_row_scores(q, k, bias, scale, row))` when not causal; with `is_causal` the score row is the
    causal row (keys after `row` get 0)."""
    out, rows = kernel_reference.attention_with_row_scores(q, k, v, bias, scale, is_causal, row)
    return out.contiguous(), rows.contiguous()


@attention_with_scores.register_fake
def _(q, k, v, bias, scale, is_causal, row):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], k.shape[-2]))


# ------------------------------------------------------------------------------ CUDA: the Triton kernels
_WARNED: set[str] = set()


def _kernels_or_reason() -> str | None:
    """None when the Triton kernels can run, else why not (the user chose the references through
    `$TOKENREDUCE_KERNELS` / `kernels.dispatch`, or triton is missing or broken)."""
    chosen = dispatch.reference_reason()  # raises on an invalid $TOKENREDUCE_KERNELS
    if chosen is not None:
        return chosen
    return None if _triton.HAS_TRITON else f"triton is not importable ({_triton.TRITON_IMPORT_ERROR})"


def _on_reference(op: str, reason: str) -> None:
    if op not in _WARNED:
        _WARNED.add(op)
        warnings.warn(f"tokenreduce::{op} on CUDA runs the pure-torch reference: {reason}", stacklevel=3)


@tome_plan.register_kernel("cuda")
def _tome_plan_cuda(k, r, num_protected, valid):
    reason = _kernels_or_reason()
    if reason is None:
        from tokenreduce.kernels.triton import matching

        try:
            return tuple(t.contiguous() for t in matching.tome_plan(k, r, num_protected, valid))
        except KernelLimitError as exc:
            reason = str(exc)
    _on_reference("tome_plan", reason)
    return tuple(t.contiguous() for t in plans.bipartite_plan(k, r, num_protected, valid))


@query_row_scores.register_kernel("cuda")
def _query_row_scores_cuda(q, k, bias, scale, row):
    reason = _kernels_or_reason()
    if reason is None:
        from tokenreduce.kernels.triton import attention

        try:
            return attention.query_row_scores(q, k, bias, scale, row).to(q.dtype)
        except KernelLimitError as exc:
            reason = str(exc)
    _on_reference("query_row_scores", reason)
    return reference.query_row_scores(q, k, bias, scale, row).contiguous()


@apply_plan.register_kernel("cuda")
def _apply_plan_cuda(x, slot, weight, size, n_out):
    reason = _kernels_or_reason()
    if reason is None:
        from tokenreduce.kernels.triton import merge

        try:
            return merge.apply_plan(x, slot, weight, size, n_out)
        except KernelLimitError as exc:
            reason = str(exc)
    _on_reference("apply_plan", reason)
    x_out, size_out = reference.apply_plan(x, slot, weight, size, n_out)
    return x_out.contiguous(), size_out.contiguous()


@attention_with_scores.register_kernel("cuda")
def _attention_with_scores_cuda(q, k, v, bias, scale, is_causal, row):
    reason = _kernels_or_reason()
    if reason is None:
        from tokenreduce.kernels.triton import attention

        try:
            out, rows, _ = attention.attention_with_scores(q, k, v, bias, scale, is_causal, row)
            assert rows is not None
            return out, rows.to(q.dtype)
        except KernelLimitError as exc:
            reason = str(exc)
    _on_reference("attention_with_scores", reason)
    out, rows = kernel_reference.attention_with_row_scores(q, k, v, bias, scale, is_causal, row)
    return out.contiguous(), rows.contiguous()


@register_flop_formula(torch.ops.tokenreduce.attention_with_scores)
def _attn_scores_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    bsz, heads, n, d = k_shape
    return sdpa_flop_count(q_shape, k_shape, v_shape) + 2 * bsz * heads * n * d


# ------------------------------------------------------------------------------ autograd (fine-tuning)
# What is differentiable, and why (docs/design.md, "Autograd"):
# - apply_plan: `x' = sum(w x) / sum(w)` per slot is linear in x and a ratio in the weights; `size' = sum of
#   the sizes with w > 0` is linear in size and piecewise constant in w (derivative 0 almost everywhere).
# - query_row_scores: a softmax of one query row, differentiable through q, k and an additive float bias.
# - topk_plan: a pruned token's weight is its score (EViT fuses the pruned tokens by their attention), so the
#   weight output is differentiable there; kept and protected tokens weigh a constant 1; slot/rep are indices.
# - tome_plan: the matching is a discrete decision (slot/rep are indices, keep is 0/1): every output is
#   non-differentiable, as in ToMe's own code, where the keys only order the tokens.
# - attention_with_scores: SDPA plus query_row_scores; its backward re-runs the reference under autograd.
# Backward formulas are plain torch, so they run on any device and torch.compile can trace them.


def _pad_slot(t: torch.Tensor) -> torch.Tensor:
    """Append the dump slot (index n_out, never an output) with zeros along dim 1."""
    return torch.cat([t, t.new_zeros((t.shape[0], 1) + tuple(t.shape[2:]))], dim=1)


def _apply_plan_setup(ctx, inputs, output):
    x, slot, weight, size, n_out = inputs
    ctx.n_out = n_out
    ctx.has_weight, ctx.has_size = weight is not None, size is not None
    ctx.save_for_backward(x, slot, weight, size, output[0])


def _apply_plan_backward(ctx, grad_x_out, grad_size_out):
    x, slot, weight, size, x_out = ctx.saved_tensors
    bsz, n, c = x.shape
    w = weight if ctx.has_weight else size if ctx.has_size else torch.ones(bsz, n, dtype=x.dtype, device=x.device)
    w = w.to(x.dtype)
    wsum = torch.zeros(bsz, ctx.n_out + 1, dtype=x.dtype, device=x.device).scatter_add(1, slot, w)[:, :ctx.n_out]
    merged = wsum > 0
    denom = torch.where(merged, wsum, torch.ones_like(wsum))
    grad_x = grad_w = grad_weight = grad_size = None
    if grad_x_out is not None:
        g = _pad_slot(grad_x_out / denom[:, :, None]).gather(1, slot[:, :, None].expand(bsz, n, c))  # [B, N, C]
        grad_x = g * w[:, :, None]
        # d x'_s / d w_i = (x_i - x'_s) / sum(w) where the sum is positive, else x_i (the denominator is 1)
        mean_term = torch.where(merged, (grad_x_out * x_out).sum(-1) / denom, torch.zeros_like(denom))
        grad_w = (g * x).sum(-1) - _pad_slot(mean_term).gather(1, slot)
    if ctx.has_size and grad_size_out is not None:
        grad_size = (_pad_slot(grad_size_out).gather(1, slot) * (w > 0)).to(size.dtype)
    if ctx.has_weight:
        grad_weight = None if grad_w is None else grad_w.to(weight.dtype)
    elif ctx.has_size and grad_w is not None:  # the sizes are the weights
        grad_size = grad_w.to(size.dtype) if grad_size is None else grad_size + grad_w.to(size.dtype)
    return grad_x, None, grad_weight, grad_size, None


torch.library.register_autograd(f"{NAMESPACE}::apply_plan", _apply_plan_backward, setup_context=_apply_plan_setup)


def _additive(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool (True = attend) or additive mask as an additive bias in `dtype` (as the reference reads it)."""
    if bias.dtype == torch.bool:
        return torch.zeros(bias.shape, dtype=dtype, device=bias.device).masked_fill(~bias, torch.finfo(dtype).min)
    return bias.to(dtype)


def _row_index(row: int, n: int) -> int:
    return row if row >= 0 else n + row


def _row_bias(bias: torch.Tensor, row: int) -> torch.Tensor:
    return bias if bias.shape[-2] == 1 else bias[..., row : (row + 1) if row != -1 else None, :]


def _query_row_scores_setup(ctx, inputs, output):
    q, k, bias, scale, row = inputs
    ctx.scale, ctx.row = scale, row
    ctx.save_for_backward(q, k, bias)


def _query_row_scores_backward(ctx, grad):
    q, k, bias = ctx.saved_tensors
    scale, r = ctx.scale, _row_index(ctx.row, q.shape[-2])
    acc = torch.promote_types(q.dtype, torch.float32)  # the forward computes in (at least) float32
    qr = q[:, :, r : r + 1, :].to(acc)
    kf = k.to(acc)
    logits = (qr @ kf.transpose(-1, -2)) * scale  # [B, H, 1, N]
    if bias is not None:
        logits = logits + _additive(_row_bias(bias, ctx.row), acc)
    p = logits.softmax(dim=-1)
    g = grad.to(acc)[:, None, None, :] / q.shape[1]  # the mean over heads
    dlogits = p * (g - (p * g).sum(dim=-1, keepdim=True))  # softmax backward
    grad_q = torch.zeros(q.shape, dtype=acc, device=q.device)
    grad_q[:, :, r : r + 1, :] = (dlogits * scale) @ kf
    grad_k = (dlogits * scale).transpose(-1, -2) @ qr
    grad_bias = None
    if bias is not None and bias.dtype.is_floating_point and ctx.needs_input_grad[2]:
        sel = _row_bias(bias, ctx.row)
        gsel = dlogits.sum_to_size(sel.shape)
        if bias.shape[-2] == 1:
            grad_bias = gsel.to(bias.dtype)
        else:
            grad_bias = torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device)
            grad_bias[..., r : r + 1, :] = gsel.to(bias.dtype)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_bias, None, None


torch.library.register_autograd(f"{NAMESPACE}::query_row_scores", _query_row_scores_backward,
                                setup_context=_query_row_scores_setup)


def _topk_plan_setup(ctx, inputs, output):
    _, keep, num_protected, _, _ = inputs
    slot, _, rep = output
    ctx.mark_non_differentiable(slot, rep)
    ctx.pruned_slot = num_protected + keep  # the fused slot (or the dump slot without fusion)
    ctx.save_for_backward(slot)


def _topk_plan_backward(ctx, grad_slot, grad_weight, grad_rep):
    (slot,) = ctx.saved_tensors
    if grad_weight is None:
        return None, None, None, None, None
    # weight = score for a pruned token, the constant 1 for a kept or protected one
    return torch.where(slot == ctx.pruned_slot, grad_weight, torch.zeros_like(grad_weight)), None, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::topk_plan", _topk_plan_backward, setup_context=_topk_plan_setup)


def _tome_plan_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _tome_plan_backward(ctx, grad_slot, grad_rep, grad_keep):
    return None, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::tome_plan", _tome_plan_backward, setup_context=_tome_plan_setup)


def _attention_with_scores_setup(ctx, inputs, output):
    q, k, v, bias, scale, is_causal, row = inputs
    ctx.scale, ctx.is_causal, ctx.row = scale, is_causal, row
    ctx.save_for_backward(q, k, v, bias)


def _attention_with_scores_backward(ctx, grad_out, grad_rows):
    q, k, v, bias = ctx.saved_tensors
    with_bias = bias is not None and bias.dtype.is_floating_point and ctx.needs_input_grad[3]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        b = bias.detach().requires_grad_(True) if with_bias else bias
        out, rows = kernel_reference.attention_with_row_scores(leaves[0], leaves[1], leaves[2], b, ctx.scale,
                                                               ctx.is_causal, ctx.row)
        outputs = [t for t, g in ((out, grad_out), (rows, grad_rows)) if g is not None]
        grads_out = [g for g in (grad_out, grad_rows) if g is not None]
        wrt = leaves + ([b] if with_bias else [])
        grads = torch.autograd.grad(outputs, wrt, grads_out, allow_unused=True)
    grad_bias = grads[3] if with_bias else None
    return grads[0], grads[1], grads[2], grad_bias, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::attention_with_scores", _attention_with_scores_backward,
                                setup_context=_attention_with_scores_setup)
