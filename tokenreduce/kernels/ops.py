"""The tokenreduce custom ops (`torch.ops.tokenreduce.*`).

Each op is one named node in FX, torch.export and inductor graphs, with a pure-torch CPU implementation
(the references in `reference.py` and `methods/`) and a fake implementation that states the output shapes
(always static given the inputs' shapes and the constant int arguments). GPU kernels plug in with
`<op>.register_kernel("cuda")` next to the reference without touching the passes.

The ops are the score and plan steps that a fused kernel would replace (matching, one-row attention) and
the apply step; cheap bookkeeping (masks, index maps) stays as plain torch functions in the graph.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from tokenreduce.kernels import reference
from tokenreduce.methods import evit, tome

NAMESPACE = "tokenreduce"


@torch.library.custom_op(f"{NAMESPACE}::tome_plan", mutates_args=())
def tome_plan(
    k: torch.Tensor, r: int, num_protected: int, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe bipartite matching on keys `k [B, H, N, d]` -> (slot [B, N], rep [B, N - r], keep [B, N])."""
    return tuple(t.contiguous() for t in tome.bipartite_plan(k, r, num_protected, valid))  # type: ignore[return-value]


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
    return tuple(t.contiguous() for t in evit.topk_plan(scores, keep, num_protected, fuse, valid))  # type: ignore[return-value]


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
