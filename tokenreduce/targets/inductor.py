"""Inductor target.

Two lowerings, one per entry point:
- `lower_inductor` for `tokenreduce.compile`: `torch.compile` of the rewritten module, so Dynamo guards
  the batch dimension (captured symbolic) and recompiles only when it must.
- `lower_inductor_static` for the Dynamo backend, which is already inside `torch.compile`: inductor's
  `compile_fx` on a flat, statically shaped graph specialised to the call's shapes.

On CPU the tokenreduce custom ops are inlined to their pure-torch references first
(`passes/inline_reference_ops.py`), so inductor fuses the score/plan/apply arithmetic into its own kernels
instead of calling a dozen small eager kernels per op (the profile in docs/benchmarks.md showed the opaque
ops taking ~30% of a reduced ViT-B call). On CUDA the named ops stay, for the GPU kernels.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from tokenreduce.passes.inline_reference_ops import inline_reference_ops


def _for_device(gm: fx.GraphModule, inputs: Sequence[Any]) -> fx.GraphModule:
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs)
    if on_cuda:
        return gm
    gm = copy.deepcopy(gm)
    inline_reference_ops(gm)
    return gm


def lower_inductor(gm: fx.GraphModule, dynamic_batch: bool, example_inputs: Sequence[Any] = ()) -> Any:
    return torch.compile(_for_device(gm, example_inputs), backend="inductor", dynamic=True if dynamic_batch else None)


def lower_inductor_static(flat_gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Any:
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(_for_device(flat_gm, example_inputs), list(example_inputs))
