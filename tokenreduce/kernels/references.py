"""Every shared custom op -> its pure-torch implementation, in one table.

Targets that must see only standard ops (ONNX; TensorRT through ONNX) replace each op node by its
implementation and re-trace (`passes/inline_reference_ops.py`, which adds the ops a method registers
itself). The implementations are export-safe (`kernels/plans.py`), so the expansion is static-shaped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tokenreduce.kernels import decoder_ops as _decoder_ops  # noqa: F401  (registers tokenreduce::keep_plan)
from tokenreduce.kernels import ops as _ops  # noqa: F401  (registers the other tokenreduce ops)
from tokenreduce.kernels import plans, reference
from tokenreduce.kernels.triton import reference as kernel_reference

tr = torch.ops.tokenreduce

REFERENCES: dict[Any, Callable[..., Any]] = {
    tr.tome_plan.default: plans.bipartite_plan,
    tr.topk_plan.default: plans.topk_plan,
    tr.query_row_scores.default: reference.query_row_scores,
    tr.apply_plan.default: reference.apply_plan,
    tr.keep_plan.default: plans.keep_plan,
    # SDPA + the one-row score (the fused op exists only on GPU graphs; see passes/fuse_attention_scores.py)
    tr.attention_with_scores.default: kernel_reference.attention_with_row_scores,
}
