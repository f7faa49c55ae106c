"""TensorRT target: a static compatibility check that runs anywhere, and an engine builder that runs where
TensorRT and CUDA are installed.

`check_tensorrt(model)` reads an ONNX model and reports every reason TensorRT's ONNX parser would refuse
it or build a data-dependent engine: ops outside the parser's supported set, `TopK` whose `k` is not a
constant or exceeds TensorRT's limit (3840), data-dependent output shapes (`NonZero`, `Unique`, ...).
The op list follows onnx-tensorrt's operator support table (TensorRT 10); it is deliberately
conservative: an op missing here is reported, not assumed to work.

`build_engine(onnx_path, engine_path, ...)` uses the TensorRT Python API (explicit batch, one optimisation
profile over the batch dimension, fp32 or fp16) and writes a serialized engine. Without TensorRT or CUDA
it raises a `TokenReduceError` saying what to install; it never pretends to have built anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenreduce.errors import TokenReduceError

TOPK_MAX_K = 3840

# ONNX ops the TensorRT 10 ONNX parser supports (onnx-tensorrt docs/operators.md), restricted to the ones
# that matter for transformer graphs plus common tensor ops.
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
GlobalMaxPool Greater GreaterOrEqual GroupNormalization HardSigmoid HardSwish Identity If InstanceNormalization
IsInf IsNaN LRN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop MatMul Max MaxPool Mean Min Mish
Mod Mul Neg NonZero Not OneHot Or PRelu Pad Pow QuantizeLinear RandomNormal RandomUniform Range Reciprocal
ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare
Relu Reshape Resize ReverseSequence Round ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size
Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Where Xor
""".split())

# Supported by the parser but producing shapes that depend on data: refused on the static path.
DATA_DEPENDENT = frozenset({"NonZero", "Unique", "Compress", "NonMaxSuppression", "Loop", "If", "Scan"})


@dataclass
class CompatIssue:
    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.reason}"


def _constants(model: Any) -> dict[str, Any]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def check_tensorrt(model: Any) -> list[CompatIssue]:
    """Static TensorRT compatibility check of an ONNX model (a ModelProto or a path)."""
    import onnx

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model), load_external_data=False)
    issues: list[CompatIssue] = []
    consts = _constants(model)
    local_functions = {f.name for f in model.functions}
    for node in model.graph.node:
        name = node.name or (node.output[0] if node.output else "?")
        if node.domain not in ("", "ai.onnx") and node.op_type not in local_functions:
            issues.append(CompatIssue(name, node.op_type, f"custom domain {node.domain!r} needs a TensorRT plugin"))
            continue
        if node.op_type not in SUPPORTED_OPS and node.op_type not in local_functions:
            issues.append(CompatIssue(name, node.op_type, "not supported by the TensorRT ONNX parser"))
        if node.op_type in DATA_DEPENDENT:
            issues.append(CompatIssue(name, node.op_type, "output shape depends on data (not static)"))
        if node.op_type == "TopK":
            k = consts.get(node.input[1]) if len(node.input) > 1 else None
            if k is None:
                issues.append(CompatIssue(name, "TopK", "k is not a constant (TensorRT needs a build-time k)"))
            elif int(k.reshape(-1)[0]) > TOPK_MAX_K:
                issues.append(CompatIssue(name, "TopK", f"k={int(k.reshape(-1)[0])} exceeds TensorRT's limit {TOPK_MAX_K}"))
    return issues


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) when TensorRT and a CUDA device are usable here, else (False, what is missing)."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError:
        return False, ("TensorRT is not installed: install the `tensorrt` Python package from NVIDIA's index "
                       "on a machine with an NVIDIA GPU and CUDA")
    import torch

    if not torch.cuda.is_available():
        return False, f"TensorRT {trt.__version__} is installed but no CUDA device is available"
    return True, str(trt.__version__)


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    fp16: bool = False,
    batch: tuple[int, int, int] = (1, 8, 32),
    workspace_gb: float = 4.0,
) -> Path:
    """Build a serialized TensorRT engine from an ONNX file with a batch profile (min, opt, max)."""
    ok, why = tensorrt_available()
    if not ok:
        raise TokenReduceError(why)
    issues = check_tensorrt(onnx_path)
    if issues:
        raise TokenReduceError(f"ONNX model is not TensorRT-compatible: {issues[0]}"
                               + (f" (+{len(issues) - 1} more)" if len(issues) > 1 else ""))
    import tensorrt as trt  # type: ignore[import-not-found]

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TokenReduceError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        dims = list(inp.shape)
        shapes = []
        for b in batch:
            shapes.append([b if (d == -1 and j == 0) else d for j, d in enumerate(dims)])
        if any(d == -1 for s in shapes for d in s):
            raise TokenReduceError(f"input {inp.name} has a dynamic dimension other than batch: {dims}")
        profile.set_shape(inp.name, *shapes)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TokenReduceError("TensorRT failed to build the engine (see the TensorRT log above)")
    out = Path(engine_path)
    tmp = out.with_suffix(out.suffix + ".partial")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, out)
    return out
