"""The batch dimension of a model's inputs, read from a pytree of example inputs (args, kwargs).

The batch is the leading dimension of the first tensor leaf with at least one dimension; scalar tensors and
non-tensor leaves carry no batch. Nothing here guesses a batch for inputs without tensors (returns None).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    """The tensor leaves of a pytree, in pytree order (the order exporters number their inputs in)."""
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def batch_of(args: Any, kwargs: Any = None) -> int | None:
    """Leading dimension of the first non-scalar tensor in (args, kwargs), or None when there is none."""
    for leaf in tensor_leaves((args, kwargs or {})):
        if leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def repeat_batch(tree: Any, batch: int) -> Any:
    """Every tensor whose leading dimension is `batch` concatenated with itself (batch -> 2 * batch); other
    leaves unchanged. Used to trace at batch 2 when the example batch is 1 (export specialises size-1 dims)."""
    def rep(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch:
            return torch.cat([t, t], dim=0)
        return t

    return pytree.tree_map(rep, tree)
