"""Custom op for the decoder pruning plan (`torch.ops.tokenreduce.keep_plan`).

One named node in the graph for the plan step of FastV / PyramidDrop / GemFilter; its CPU implementation
is `kernels.plans.keep_plan`, and the fake implementation states the static output shape. The score
step reuses `tokenreduce::query_row_scores` (row -1: the last query) and the gather is plain torch.
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
