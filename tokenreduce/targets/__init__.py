"""Lowering targets behind one interface (`base.Target`): eager, inductor, onnx (+ onnxruntime runner) and
tensorrt, registered here in the order help texts list them.

    from tokenreduce import targets
    lowered = targets.get("onnx").lower(reduced.graph_module, reduced.example_args, reduced.example_kwargs,
                                        targets.TargetOptions(output=Path("model.onnx")))
    lowered(x)                                    # runs in onnxruntime, returns what the eager graph returns
    targets.names(capability="artefact")          # ("onnx", "tensorrt")

The loose functions (`lower_eager`, `lower_inductor`, `lower_inductor_static`, `export_onnx`, `verify_onnx`,
`check_static`, `check_tensorrt`, `build_engine`) are the implementations the target classes call; they stay
importable for existing callers.
"""

from tokenreduce.targets.base import (
    ARTEFACT,
    RUNTIME,
    ArtefactTarget,
    Lowered,
    Target,
    TargetOptions,
    Verification,
    all_targets,
    by_runtime,
    get,
    names,
    register,
)
from tokenreduce.targets.eager import EagerTarget, lower_eager
from tokenreduce.targets.inductor import InductorTarget, lower_inductor, lower_inductor_static
from tokenreduce.targets.onnx import OnnxTarget
from tokenreduce.targets.tensorrt import TensorRTTarget

for _target in (EagerTarget(), InductorTarget(), OnnxTarget(), TensorRTTarget()):
    register(_target)

__all__ = [
    "ARTEFACT",
    "RUNTIME",
    "ArtefactTarget",
    "Lowered",
    "Target",
    "TargetOptions",
    "Verification",
    "all_targets",
    "by_runtime",
    "get",
    "names",
    "register",
    "lower_eager",
    "lower_inductor",
    "lower_inductor_static",
]
