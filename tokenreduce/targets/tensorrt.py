"""TensorRT target: a static compatibility check that runs anywhere, and an engine builder that runs where
TensorRT and CUDA are installed.

`check_tensorrt(model)` reads an ONNX model and reports every reason TensorRT's ONNX parser would refuse
it or build a data-dependent engine: ops outside the parser's supported set, `TopK` whose `k` is not a
constant or exceeds TensorRT's limit (3840), data-dependent output shapes (`NonZero`, `Unique`, ...).
The op list follows onnx-tensorrt's operator support table (TensorRT 10); it is deliberately
conservative: an op missing here is reported, not assumed to work.

A file with no graph, no opset import or no outputs (an empty or truncated file) is reported as an issue,
never passed.

`build_engine(onnx_path, engine_path, ...)` uses the TensorRT Python API (explicit batch, one optimisation
profile over the batch dimension, fp32 or fp16) and writes a serialized engine (atomically). Without
TensorRT or CUDA it raises a `TokenReduceError` saying what to install; it never pretends to have built
anything.

`TensorRTTarget.lower` (`tokenreduce.targets.get("tensorrt")`) is the target-interface entry: it exports the
graph to verified ONNX (the onnx target's `export_graph`), runs the compatibility check, builds the engine,
runs it on the example inputs on the GPU (`EngineRunner`, TensorRT 10's name-based I/O) and compares with
the eager graph before writing the engine to `TargetOptions.output`. Without TensorRT or a CUDA device it
raises before exporting anything, naming what is missing. The runner moves inputs to the GPU (untimed, in
`bind`) and synchronises the stream before returning, so a timed call measures the whole inference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from tokenreduce.errors import TokenReduceError
from tokenreduce.targets.base import (
    ArtefactTarget,
    Lowered,
    TargetOptions,
    Verification,
    fill_tensor_leaves,
    graph_batch_is_dynamic,
    require_fp32,
)
from tokenreduce.targets.onnx import compare_outputs, export_graph, load_model, model_problems
from tokenreduce.util.batch import batch_of, tensor_leaves
from tokenreduce.util.files import scratch_folder, write_bytes

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
    where = str(model) if isinstance(model, (str, os.PathLike)) else "model"
    try:
        model = load_model(model)
    except TokenReduceError as exc:
        return [CompatIssue(where, "ModelProto", str(exc))]
    invalid = model_problems(model)
    if invalid:
        return [CompatIssue(where, "ModelProto", reason) for reason in invalid]
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
    return write_bytes(engine_path, bytes(serialized))


# --------------------------------------------------------------------------------------------- runner
def torch_dtype(trt_dtype: Any) -> torch.dtype:
    """The torch dtype of a TensorRT tensor dtype (refuses types a reduced graph never has at its I/O)."""
    import tensorrt as trt  # type: ignore[import-not-found]

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
    for name, dtype in table.items():
        if hasattr(trt.DataType, name) and trt_dtype == getattr(trt.DataType, name):
            return dtype
    raise TokenReduceError(f"TensorRT tensor type {trt_dtype} has no torch equivalent here")


class EngineRunner:
    """Runs a serialized TensorRT engine on CUDA tensors: inputs bound by the ONNX input names (in the order
    of the model's tensor inputs), outputs allocated per call at the shapes the execution context reports."""

    def __init__(self, serialized: bytes, input_names: list[str], output_names: list[str],
                 device: torch.device) -> None:
        import tensorrt as trt  # type: ignore[import-not-found]

        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(serialized)
        if self.engine is None:
            raise TokenReduceError("TensorRT could not deserialize the engine it built (see the TensorRT log above)")
        self.context = self.engine.create_execution_context()
        io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        engine_inputs = {n for n in io if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        engine_outputs = {n for n in io if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT}
        unknown = engine_inputs - set(input_names)
        if unknown:
            raise TokenReduceError(f"the engine has inputs the ONNX model does not name: {sorted(unknown)}")
        missing = [n for n in output_names if n not in engine_outputs]
        if missing:
            raise TokenReduceError(f"the engine lacks the ONNX outputs {missing}")
        self.input_names = input_names
        self.bound_inputs = engine_inputs
        self.output_names = output_names
        self.device = device

    def prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """The model's tensor inputs on the engine's device, in its dtypes, contiguous."""
        tensors = tensor_leaves((args, kwargs))
        if len(tensors) != len(self.input_names):
            raise TokenReduceError(f"the engine takes {len(self.input_names)} input tensors "
                                   f"({', '.join(self.input_names)}), got {len(tensors)}")
        out = []
        for name, t in zip(self.input_names, tensors):
            dtype = torch_dtype(self.engine.get_tensor_dtype(name)) if name in self.bound_inputs else t.dtype
            out.append(t.detach().to(self.device, dtype).contiguous())
        return out

    def execute(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """One inference on prepared inputs; returns the outputs after the stream has finished."""
        for name, t in zip(self.input_names, tensors):
            if name in self.bound_inputs:
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
        outputs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            buf = torch.empty(shape, dtype=torch_dtype(self.engine.get_tensor_dtype(name)), device=self.device)
            self.context.set_tensor_address(name, buf.data_ptr())
            outputs.append(buf)
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TokenReduceError("TensorRT failed to run the engine (see the TensorRT log above)")
        stream.synchronize()
        return outputs


class TensorRTTarget(ArtefactTarget):
    name: ClassVar[str] = "tensorrt"
    runtime: ClassVar[str] = "tensorrt"
    suffix: ClassVar[str] = ".engine"
    summary: ClassVar[str] = ("TensorRT engine built from the verified ONNX export (needs TensorRT and a CUDA "
                              "device; the compatibility check runs anywhere)")

    def available(self) -> tuple[bool, str]:
        return tensorrt_available()

    def check(self, model: Any) -> list[str]:
        return [str(issue) for issue in check_tensorrt(model)]

    def lower(self, gm: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
              options: TargetOptions) -> Lowered:
        require_fp32(options, self.name, "use fp16=True for an fp16 engine")
        if options.fused_attention:
            raise TokenReduceError("fused_attention writes onnxruntime's com.microsoft.MultiHeadAttention, which "
                                   "TensorRT does not read; TensorRT fuses attention itself", setting="fused_attention",
                                   hint="fused_attention=False")
        device = torch.device(options.device or "cuda")
        if device.type != "cuda":
            raise TokenReduceError(f"the tensorrt target runs engines on a CUDA device; device {options.device!r} "
                                   f"is not one: pass device='cuda' (or leave it unset)")
        self.require_available()
        batch = batch_of(args, kwargs)
        dynamic = options.dynamic_batch and graph_batch_is_dynamic(gm) is not False
        if dynamic:
            profile = options.profile_batch
        elif batch is None:
            raise TokenReduceError("the tensorrt target needs a tensor input with a batch dimension")
        else:
            profile = (batch, batch, batch)  # a static-batch graph: an engine for that batch only
        with scratch_folder(prefix="tokenreduce-trt-") as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            export = export_graph(gm, args, kwargs, onnx_path, verify=options.verify, atol=options.atol,
                                  dynamic_batch=dynamic, opset=options.opset)
            # build_engine runs check_tensorrt first and names every issue it finds
            engine = build_engine(onnx_path, Path(tmp) / "model.engine", fp16=options.fp16, batch=profile,
                                  workspace_gb=options.workspace_gb)
            serialized = engine.read_bytes()
        runner = EngineRunner(serialized, export.input_names, export.output_names, device)
        with torch.no_grad():
            template = gm(*args, **kwargs)
        max_diff = None
        if options.verify:
            got = runner.execute(runner.prepare(args, kwargs))
            max_diff = compare_outputs(got, tensor_leaves(template), options.atol, runtime="TensorRT",
                                       what="TensorRT", consequence="the engine was not written")
        if options.output is not None:
            write_bytes(options.output, serialized)

        def run(*call_args: Any, **call_kwargs: Any) -> Any:
            return fill_tensor_leaves(template, runner.execute(runner.prepare(call_args, call_kwargs)))

        def bind(call_args: tuple[Any, ...], call_kwargs: dict[str, Any]) -> Any:
            prepared = runner.prepare(call_args, call_kwargs)
            return lambda: runner.execute(prepared)

        return Lowered(self.name, self.runtime, run, bind, batch, dynamic,
                       batch_range=(profile[0], profile[2]) if dynamic else None, path=options.output,
                       verification=Verification([], options.verify, max_diff, options.atol), export=export)
