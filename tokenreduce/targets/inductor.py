"""Inductor target.

Two lowerings, one per entry point:
- `lower_inductor` for `tokenreduce.compile`: `torch.compile` of the rewritten module, so Dynamo guards
  the batch dimension (captured symbolic) and recompiles only when it must.
- `lower_inductor_static` for the Dynamo backend, which is already inside `torch.compile`: inductor's
  `compile_fx` on a flat, statically shaped graph specialised to the call's shapes.
`InductorTarget.lower` picks between them with `TargetOptions.inside_torch_compile`.

On CPU the tokenreduce custom ops are inlined to their pure-torch references first
(`passes/inline_reference_ops.py`), so inductor fuses the score/plan/apply arithmetic into its own kernels
instead of calling a dozen small eager kernels per op (the profile in docs/benchmarks.md showed the opaque
ops taking ~30% of a reduced ViT-B call). On CUDA the named ops stay, for the GPU kernels. A plain module
(an unreduced baseline) has no tokenreduce ops and is compiled as it is.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import fx

from tokenreduce.errors import TokenReduceError
from tokenreduce.passes.inline_reference_ops import inline_reference_ops
from tokenreduce.targets.base import (
    Lowered,
    Target,
    TargetOptions,
    call_binder,
    graph_batch_is_dynamic,
    require_fp32,
    same_device,
)
from tokenreduce.util.batch import batch_of, tensor_leaves


def _for_device(gm: Any, inputs: Sequence[Any], device: torch.device | None = None) -> Any:
    on_cuda = device.type == "cuda" if device is not None else any(
        isinstance(t, torch.Tensor) and t.is_cuda for t in inputs)
    if on_cuda or not isinstance(gm, fx.GraphModule):
        return gm
    # A private graph to inline into, sharing the model's weights (not copies), so gradients of a
    # compiled model reach the parameters the user optimises.
    gm = copy.deepcopy(gm, memo={id(t): t for t in [*gm.parameters(), *gm.buffers()]})
    inline_reference_ops(gm)
    return gm


def lower_inductor(gm: torch.nn.Module, dynamic_batch: bool, example_inputs: Sequence[Any] = (),
                   device: torch.device | None = None) -> Any:
    return torch.compile(_for_device(gm, example_inputs, device), backend="inductor",
                         dynamic=True if dynamic_batch else None)


def lower_inductor_static(flat_gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
                          device: torch.device | None = None) -> Any:
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(_for_device(flat_gm, example_inputs, device), list(example_inputs))


class InductorTarget(Target):
    name: ClassVar[str] = "inductor"
    runtime: ClassVar[str] = "inductor"
    accepts_modules: ClassVar[bool] = True
    summary: ClassVar[str] = "torch.compile with inductor (CPU: tokenreduce ops inlined so inductor fuses them)"

    def lower(self, gm: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
              options: TargetOptions) -> Lowered:
        require_fp32(options, self.name, "export with the onnx target for fp16/int8")
        device = same_device(options, args, kwargs, self.name)
        batch = batch_of(args, kwargs)
        if options.inside_torch_compile:
            if not isinstance(gm, fx.GraphModule) or kwargs:
                raise TokenReduceError("inside_torch_compile lowers a flat GraphModule called with positional "
                                       "tensors only (what a torch.compile backend receives)")
            compiled = lower_inductor_static(gm, list(args), device)
            return Lowered(self.name, self.runtime, compiled, call_binder(compiled), batch, False)
        graph_dynamic = graph_batch_is_dynamic(gm)
        dynamic = options.dynamic_batch and graph_dynamic is not False
        compiled = lower_inductor(gm, dynamic, tensor_leaves((args, kwargs)), device)
        return Lowered(self.name, self.runtime, compiled, call_binder(compiled), batch, dynamic)
