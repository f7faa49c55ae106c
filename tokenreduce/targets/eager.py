"""Eager target: the rewritten GraphModule itself (the reference every other target is checked against).

Nothing is compiled or copied; the runner is the module it is given, so it runs wherever its parameters and
the inputs are. Refuses a `device` other than the inputs' (it moves no tensors).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tokenreduce.targets.base import (
    Lowered,
    Target,
    TargetOptions,
    call_binder,
    graph_batch_is_dynamic,
    require_fp32,
    same_device,
)
from tokenreduce.util.batch import batch_of


def lower_eager(gm: torch.nn.Module) -> Any:
    return gm


class EagerTarget(Target):
    name: ClassVar[str] = "eager"
    runtime: ClassVar[str] = "eager"
    accepts_modules: ClassVar[bool] = True
    summary: ClassVar[str] = "the rewritten graph run by PyTorch as it is (the reference for every other target)"

    def lower(self, gm: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
              options: TargetOptions) -> Lowered:
        require_fp32(options, self.name, "export with the onnx target for fp16/int8")
        same_device(options, args, kwargs, self.name)
        runner = lower_eager(gm)
        # eager runs whatever batch the graph allows: a symbolic-batch capture (or a plain module) serves all
        dynamic = graph_batch_is_dynamic(gm)
        return Lowered(self.name, self.runtime, runner, call_binder(runner), batch_of(args, kwargs),
                       options.dynamic_batch if dynamic is None else dynamic)
