"""Inductor target.

Two lowerings, one per entry point:
- `lower_inductor` for `tokenreduce.compile`: `torch.compile` of the rewritten module, so Dynamo guards
  the batch dimension (captured symbolic) and recompiles only when it must.
- `lower_inductor_static` for the Dynamo backend, which is already inside `torch.compile`: inductor's
  `compile_fx` on a flat, statically shaped graph specialised to the call's shapes.

The tokenreduce custom ops stay opaque calls (their CPU implementations); inductor fuses around them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx


def lower_inductor(gm: fx.GraphModule, dynamic_batch: bool) -> Any:
    return torch.compile(gm, backend="inductor", dynamic=True if dynamic_batch else None)


def lower_inductor_static(flat_gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Any:
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(flat_gm, list(example_inputs))
