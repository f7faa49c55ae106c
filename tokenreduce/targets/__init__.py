"""Lowering targets: run a rewritten graph eagerly or compile it with inductor (ONNX and TensorRT next)."""

from tokenreduce.targets.eager import lower_eager
from tokenreduce.targets.inductor import lower_inductor, lower_inductor_static

__all__ = ["lower_eager", "lower_inductor", "lower_inductor_static"]
