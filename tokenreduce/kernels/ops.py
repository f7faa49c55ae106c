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

from tokenreduce.kernels import dispatch, reference
from tokenreduce.kernels import triton as _triton
from tokenreduce.kernels.triton import KernelLimitError
from tokenreduce.kernels.triton import reference as kernel_reference
from tokenreduce.kernels import plans

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
