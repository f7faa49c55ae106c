"""ONNX target: export a reduced model, prove it is static and export-safe, verify it numerically, and run it
in onnxruntime.

`OnnxTarget.lower(gm, args, kwargs, options)` is the target-interface entry (`tokenreduce.targets.get("onnx")`);
`export_graph` does the work for a graph and its example inputs, `export_onnx` for a `ReducedModule`. Both
inline the pure-torch references of the tokenreduce ops (so the
exporter sees standard ops; see `passes/inline_reference_ops.py`), give a VLM's placeholder scatter and
count check their static forms (`passes/export_static.py`), exports with
`torch.onnx.export(..., dynamo=True)` and a dynamic batch dimension, then:

1. **static check** (`check_static`): ONNX shape inference must give every intermediate value static
   dimensions except the batch; no data-dependent-shape ops (`NonZero`, `Unique`, ...); no `ScatterND`;
   `ScatterElements` only as a sum (`reduction="add"`, never an overwrite standing in for a mean); every
   `TopK` has a constant `k`.
2. **verification**: the ONNX model runs in onnxruntime on the example inputs and is compared with the
   eager reduced graph; past `atol` it is an error (skip only with `verify=False`).

The file is written through `tokenreduce.util.files.atomic_path` (a scratch folder beside it) and moved into
place only after both checks pass, so a failed or interrupted export never leaves a file that looks good.
Weights go into one file below 2 GB, external data above. The target's runner is an onnxruntime CPU session
(other devices are refused: the file runs on GPUs through TensorRT or onnxruntime-gpu outside this target).

A model with no graph, no opset import or no graph outputs (an empty or truncated file) is invalid:
`check_static` reports it instead of passing it.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils import _pytree as pytree

from tokenreduce.errors import TokenReduceError
from tokenreduce.passes.common import PassResult
from tokenreduce.passes.export_static import checks_as_nan, static_masked_scatter
from tokenreduce.passes.inline_reference_ops import inline_reference_ops
from tokenreduce.passes.ort_attention import ort_fused_attention
from tokenreduce.targets.base import (
    ArtefactTarget,
    Lowered,
    TargetOptions,
    Verification,
    default_threads,
    fill_tensor_leaves,
    graph_batch_is_dynamic,
)
from tokenreduce.util.batch import batch_of, repeat_batch, tensor_leaves
from tokenreduce.util.files import atomic_path, scratch_folder

TWO_GB = 2 * 1024**3
DATA_DEPENDENT_OPS = {"NonZero", "Unique", "Compress", "NonMaxSuppression", "Loop", "If", "Scan"}


@dataclass
class OnnxExport:
    path: Path
    max_abs_diff: float | None
    verified: bool
    problems: list[str]
    op_counts: dict[str, int] = field(default_factory=dict)
    external_data: bool = False
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    precision: str = "fp32"
    quantization: str = ""  # how the fp16/int8 file was made ("int8 dynamic (...)")
    fp32_max_abs_diff: float | None = None  # fp16/int8: the fp32 export's difference, checked before converting
    tolerance: Any = None  # fp16/int8: the `quantize.Tolerance` the file was held to
    fused_attention: int = 0  # attention nodes exported as onnxruntime's MultiHeadAttention (`fused_attention=True`)
    unfused_attention: list[str] = field(default_factory=list)  # the others, each with why (fused_attention=True)


def _const_names(model: Any) -> set[str]:
    names = {init.name for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            names.update(node.output)
    return names


def load_model(model: Any) -> Any:
    """A ModelProto from a ModelProto or a path (external weights not loaded: the checks read no weights).
    Raises TokenReduceError when the file cannot be read or parsed."""
    import onnx

    if not isinstance(model, (str, os.PathLike)):
        return model
    try:
        return onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise TokenReduceError(f"{model} is not a readable ONNX model: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def model_problems(model: Any) -> list[str]:
    """Why a ModelProto is not a model at all: no graph, no opset import, no graph outputs (what an empty or
    truncated file parses to). Empty list: structurally a model."""
    problems = []
    if not model.HasField("graph"):
        problems.append("the model has no graph (an empty or truncated ONNX file?)")
    elif not model.graph.output:
        problems.append("the graph has no outputs (an empty or truncated ONNX file?)")
    if not model.opset_import:
        problems.append("the model imports no opset (an empty or truncated ONNX file?)")
    return problems


def check_static(model: Any, probe_batch: int = 3) -> list[str]:
    """Problems that make an ONNX model (a ModelProto or a path) unfit for fixed-shape runtimes ([]: fine).

    An unreadable file, or a model with no graph, opset import or outputs, is reported as such. Otherwise the
    symbolic batch dimension of the inputs is pinned to `probe_batch`; shape inference must then give
    every value fully static dimensions (so batch is the only dynamic dimension anywhere). Also rejects
    data-dependent-shape ops, ScatterND, non-sum ScatterElements and TopK with a non-constant k."""
    import onnx

    try:
        model = load_model(model)
    except TokenReduceError as exc:
        return [str(exc)]
    problems = model_problems(model)
    if problems:
        return problems
    probe = _shape_probe(model)
    for inp in probe.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_value = probe_batch
    try:
        # with the batch pinned, shape arithmetic the model does on its inputs (e.g. Range over the batch
        # in HF mask code) folds to constants; then plain ONNX shape inference must find every dim.
        import onnxscript.optimizer

        probe = onnxscript.optimizer.optimize(probe)
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=True, data_prop=True)
    except Exception as exc:  # noqa: BLE001
        return [f"ONNX shape inference failed: {str(exc).splitlines()[0]}"]
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            problems.append(f"{vi.name}: no shape after inference")
            continue
        for i, d in enumerate(tt.shape.dim):
            if not d.HasField("dim_value"):
                problems.append(f"{vi.name}: dimension {i} is not static ({d.dim_param or 'unknown'})")
    return problems + check_ops(model)


PROBE_WEIGHT_ELEMENTS = 4096  # initializers above this many elements enter the shape probe as typed inputs


def _shape_probe(model: Any) -> Any:
    """The copy of `model` that `check_static` runs shape inference on: its nodes, inputs, outputs and small
    initializers (shape constants), with every larger initializer (a weight) turned into a graph input of the same
    type and shape, so no weight bytes are copied or serialized (a model above 2 GB cannot be serialized in one
    protobuf, which shape inference does), and no value_info (inference must find every shape itself)."""
    import onnx
    from onnx import helper

    probe = onnx.ModelProto()
    probe.ir_version = model.ir_version
    probe.opset_import.extend(model.opset_import)
    probe.functions.extend(model.functions)
    graph = probe.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    declared = {i.name for i in model.graph.input}  # IR < 4 lists initializers among the inputs too
    for init in model.graph.initializer:
        if math.prod(init.dims) <= PROBE_WEIGHT_ELEMENTS:
            graph.initializer.append(init)
        elif init.name not in declared:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    _shape_stand_ins(probe)
    return probe


def _shape_stand_ins(probe: Any) -> None:
    """Replace, in the shape-checking copy `probe`, each onnxruntime contrib op that ONNX shape inference does not
    know by a standard op with the same output shape: `com.microsoft.MultiHeadAttention` as written by
    `fused_attention` (3-D query, key and value of one hidden size, so its output has the query's shape) by
    `Identity(query)`. Other contrib ops stay and fail inference, naming themselves."""
    for node in probe.graph.node:
        if node.domain == "com.microsoft" and node.op_type == "MultiHeadAttention" and len(node.output) == 1:
            query = node.input[0]
            node.ClearField("input")
            node.ClearField("attribute")
            node.input.append(query)
            node.op_type, node.domain = "Identity", ""


def check_ops(model: Any) -> list[str]:
    """The op part of `check_static` (data-dependent shapes, ScatterND, non-sum ScatterElements, TopK with a
    non-constant k). fp16/int8 files get only this check: their conversion adds Cast and (de)quantize nodes,
    which keep their inputs' shapes, to an fp32 export that passed the full check."""
    problems = []
    consts = _const_names(model)
    for node in model.graph.node:
        if node.op_type in DATA_DEPENDENT_OPS:
            problems.append(f"{node.name}: {node.op_type} has a data-dependent output shape")
        if node.op_type == "ScatterND":
            problems.append(f"{node.name}: ScatterND (an overwrite) is not allowed in a reduced graph")
        if node.op_type == "ScatterElements":
            red = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
            if red != "add":
                problems.append(f"{node.name}: ScatterElements with reduction={red!r} (only sums are export-safe)")
        if node.op_type == "TopK" and len(node.input) > 1 and node.input[1] not in consts:
            problems.append(f"{node.name}: TopK k is not a constant")
    return problems


def export_onnx(
    reduced: Any,
    path: str | os.PathLike[str],
    *,
    verify: bool = True,
    atol: float = 1e-4,
    dynamic_batch: bool | None = None,
    opset: int | None = None,
    precision: str = "fp32",
    calibration: str | os.PathLike[str] | None = None,
    unreduced: Any = None,
    fused_attention: bool = False,
) -> OnnxExport:
    """Export a `ReducedModule` to ONNX, check it, verify it in onnxruntime, then write it to `path`.
    `unreduced`: a `ReducedModule` of `method="none"` on the same inputs (fp16/int8 tolerance, see `export_graph`);
    `fused_attention`: see `export_graph`."""
    dynamic = reduced.dynamic_batch if dynamic_batch is None else dynamic_batch
    base = getattr(unreduced, "graph_module", unreduced)
    return export_graph(reduced.graph_module, reduced.example_args, reduced.example_kwargs, path, verify=verify,
                        atol=atol, dynamic_batch=dynamic, opset=opset, precision=precision, calibration=calibration,
                        unreduced=base, fused_attention=fused_attention)


def export_graph(
    gm: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    verify: bool = True,
    atol: float = 1e-4,
    dynamic_batch: bool = True,
    opset: int | None = None,
    precision: str = "fp32",
    calibration: str | os.PathLike[str] | None = None,
    unreduced: torch.nn.Module | None = None,
    plan_form: str = "exported",
    fused_attention: bool = False,
) -> OnnxExport:
    """Export the rewritten graph `gm` for these example inputs to ONNX (tokenreduce ops inlined), run the
    static check, verify in onnxruntime against `gm` itself (unless `verify=False`), then write `path`
    atomically. Raises TokenReduceError on any failure, leaving nothing at `path`.

    `precision` "fp16"/"int8" (`targets/quantize.py`): the fp32 export is checked and verified first, then
    converted (plan subgraph kept fp32), checked again and verified against `gm` with the precision's
    tolerance; `unreduced` (the unreduced graph on the same inputs) widens it to what the precision does to
    the unreduced model. `calibration`: int8 calibration folder (static quantization). `plan_form`:
    "exported" (the cheaper `apply_plan` forms, `passes/inline_reference_ops.py`) or "reference".
    `fused_attention`: export each attention the contrib op computes exactly as onnxruntime's
    `com.microsoft.MultiHeadAttention` (`passes/ort_attention.py`: fused, no `[B, H, N, N]` score tensor; the
    file then needs onnxruntime); fp32 only, and an error when no attention node qualifies."""
    import onnx

    from tokenreduce.targets import quantize

    quantize.check_precision(precision)
    if plan_form not in ("exported", "reference"):
        raise TokenReduceError(f"plan_form must be 'exported' or 'reference', got {plan_form!r}")
    path = Path(path)
    kwargs = dict(kwargs)
    if precision == "int8" and calibration is None and any(t.dtype.is_floating_point
                                                           for t in tensor_leaves((args, kwargs))):
        raise TokenReduceError(
            "int8 for a model with float inputs (vision) is static quantization: it needs calibration inputs "
            "(a folder of images or .npy arrays: TargetOptions(calibration=DIR), `convert --calib DIR`); "
            "or use precision 'fp16'", setting="calibration", hint="calibration=DIR or precision='fp16'")
    if fused_attention and precision != "fp32":
        raise TokenReduceError(f"fused_attention exports fp32 attention (onnxruntime's MultiHeadAttention); precision "
                               f"{precision!r} is not supported with it", setting="precision",
                               hint="precision='fp32' or fused_attention=False")
    program, trace_args, trace_kwargs, fused = _export_program(gm, args, kwargs, dynamic_batch, opset, plan_form,
                                                               fused_attention)
    model = program.model_proto
    problems = check_static(model)
    weights = sum(t.numel() * t.element_size() for t in gm.state_dict().values())
    external = weights >= TWO_GB
    if external and precision != "fp32":
        raise TokenReduceError(f"precision {precision!r} is not supported for models above 2 GB of weights "
                               f"(external data); export fp32", setting="precision", hint="precision='fp32'")
    with atomic_path(path) as tmp, scratch_folder(prefix="tokenreduce-precision-") as scratch:
        fp32_path = tmp if precision == "fp32" else Path(scratch) / "fp32.onnx"
        program.save(str(fp32_path), external_data=external)
        result = OnnxExport(path=path, max_abs_diff=None, verified=False, problems=problems,
                            op_counts=dict(Counter(n.op_type for n in model.graph.node)), external_data=external,
                            input_names=[i.name for i in model.graph.input],
                            output_names=[o.name for o in model.graph.output], precision=precision,
                            fused_attention=fused.rewrites if fused else 0,
                            unfused_attention=list(fused.notes) if fused else [])
        if problems:
            raise TokenReduceError(f"exported ONNX is not static/export-safe: {problems[0]}"
                                   + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
        if verify:
            result.max_abs_diff = verify_onnx(fp32_path, gm, args, kwargs, atol=atol)
            if trace_args is not args or trace_kwargs is not kwargs:  # also at the traced batch
                result.max_abs_diff = max(result.max_abs_diff,
                                          verify_onnx(fp32_path, gm, trace_args, trace_kwargs, atol=atol))
            result.verified = True
        if precision != "fp32":
            feeds = _calibration(calibration, model) if calibration is not None else None
            result.fp32_max_abs_diff, result.max_abs_diff, result.verified = result.max_abs_diff, None, False
            result.quantization = _convert(fp32_path, tmp, precision, feeds)
            converted = onnx.load(str(tmp), load_external_data=False)
            result.problems = model_problems(converted) or check_ops(converted)
            result.op_counts = dict(Counter(n.op_type for n in converted.graph.node))
            if result.problems:
                raise TokenReduceError(f"the {precision} ONNX is not static/export-safe: {result.problems[0]}")
            if verify:
                result.tolerance = _judge(tmp, gm, args, kwargs, precision, unreduced, dynamic_batch, opset, feeds,
                                          Path(scratch))
                result.max_abs_diff = result.tolerance.measured
                if not result.tolerance.ok:
                    raise TokenReduceError(f"{precision} ONNX verification failed: {result.tolerance.describe()}; "
                                           f"the exported file was not written")
                result.verified = True
        onnx.checker.check_model(str(tmp))
    return result


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEP = re.compile(r"\s*This is step (\d)/(\d) of exporting the model to ONNX\.?( Next steps:)?")


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def export_failure(exc: BaseException) -> str:
    """One line for a failed `torch.onnx.export`: the exporter's own summary (which step failed) and the
    innermost cause it wraps, which names the op or construct (`No ONNX function found for aten._is_all_true`),
    where the summary alone says only which of its three steps failed."""
    summary = _first_line(exc)
    step = _STEP.search(summary)
    if step:
        summary = _STEP.sub("", summary).rstrip(" .") + f" (step {step.group(1)}/{step.group(2)})"
    root: BaseException = exc
    seen = {id(exc)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        root = nxt
    if root is exc:
        return summary
    cause = _first_line(root)
    if len(cause) > 300:
        cause = cause[:297] + "..."
    return f"{summary}; cause: {type(root).__name__}: {cause}"


def drop_noop_squeezes(gm: torch.fx.GraphModule) -> int:
    """Remove `squeeze(dim)` nodes whose dims all have a static size other than 1 (a no-op in torch), and
    return how many. torch.onnx writes them as ONNX `Squeeze`, which the ONNX spec refuses on such a dim, so
    shape inference fails ("Dimension of input 1 must be 1 instead of 16": PixArt's `squeeze(1)` on
    `[B, N, C]` before its unpatchify, even unreduced)."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims):
            continue
        val = getattr(node.args[0], "meta", {}).get("val")
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        if isinstance(val, torch.Tensor) and all(isinstance(val.shape[d], int) and val.shape[d] != 1 for d in dims):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropped += 1
    if dropped:
        gm.recompile()
    return dropped


def _export_program(gm: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_batch: bool,
                    opset: int | None, plan_form: str, fused_attention: bool = False,
                    ) -> tuple[Any, tuple[Any, ...], dict[str, Any], PassResult | None]:
    """torch.onnx (dynamo) export of `gm` with the tokenreduce ops inlined; returns the program, the inputs it
    was traced with (batch 2 when the example batch is 1 and the batch is dynamic) and, with `fused_attention`,
    what `passes/ort_attention.py` fused and left (an error when it could fuse nothing)."""
    gm_inlined = copy.deepcopy(gm).eval()
    if isinstance(gm_inlined, torch.fx.GraphModule):
        inline_reference_ops(gm_inlined, exported_apply=plan_form == "exported")
        drop_noop_squeezes(gm_inlined)
        static_masked_scatter(gm_inlined)  # a VLM's placeholder scatter, then its count check (passes/export_static.py)
        checks_as_nan(gm_inlined)
    fused: PassResult | None = None
    if fused_attention:
        if not isinstance(gm_inlined, torch.fx.GraphModule):
            raise TokenReduceError("fused_attention rewrites a captured graph (torch.fx.GraphModule); got "
                                   f"{type(gm).__name__}", setting="fused_attention")
        fused = ort_fused_attention(gm_inlined)
        if not fused.rewrites:
            why = "; ".join(fused.notes[:3]) + (f" (+{len(fused.notes) - 3} more)" if len(fused.notes) > 3 else "")
            raise TokenReduceError("fused_attention: no attention in the graph can be exported as onnxruntime's "
                                   "MultiHeadAttention: " + (why or "the graph has no scaled_dot_product_attention"),
                                   setting="fused_attention", hint="fused_attention=False")
    dynamic_shapes = None
    trace_args, trace_kwargs = args, kwargs
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        b = batch_of(args, kwargs)
        # only inputs whose leading dim is the batch (Flux's img_ids/txt_ids [N, 3] have none), as in capture
        leaves = pytree.tree_map(
            lambda t: {0: batch} if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b else None,
            (args, kwargs))
        dynamic_shapes = _by_name(gm_inlined, leaves)
        if b == 1:  # export specialises size-1 dims: trace at batch 2
            trace_args, trace_kwargs = repeat_batch(args, 1), repeat_batch(kwargs, 1)
    try:
        # under no_grad: with grad enabled, torch.export keeps the fused SDPA's output strides and turns the
        # model's `transpose(1, 2).reshape(B, N, C)` into a view, which breaks once the exporter decomposes SDPA
        # ("Failed to decompose the FX graph ... Cannot view a tensor": BEiT, T5, Data2Vec, even unreduced)
        with torch.no_grad():
            program = torch.onnx.export(gm_inlined, trace_args, kwargs=trace_kwargs or None, dynamo=True,
                                        dynamic_shapes=dynamic_shapes,
                                        optimize=True, opset_version=opset, verbose=False)
    except Exception as exc:  # noqa: BLE001
        raise TokenReduceError(f"ONNX export failed: {export_failure(exc)}") from exc
    if program is None:
        raise TokenReduceError("ONNX export failed: torch.onnx.export returned no program")
    return program, trace_args, trace_kwargs, fused


def _convert(src: Path, dst: Path, precision: str, feeds: list[dict[str, Any]] | None) -> str:
    """Write the `precision` version of the fp32 file `src` to `dst`; returns how ("fp16", "int8 dynamic", ...)."""
    import onnx

    from tokenreduce.targets import quantize

    if precision == "fp16":
        onnx.save(quantize.to_fp16(onnx.load(str(src))), str(dst))
        return "fp16 (plan subgraph fp32, fp32 inputs/outputs)"
    mode = quantize.to_int8(src, dst, calibration=feeds)
    return f"int8 {mode} (per-channel weights; plan subgraph not quantized)"


def _calibration(folder: str | os.PathLike[str], model: Any) -> list[dict[str, Any]]:
    from tokenreduce.targets import quantize

    floats = [i for i in model.graph.input if i.type.tensor_type.elem_type == 1]  # FLOAT
    if len(floats) != 1 or len(floats[0].type.tensor_type.shape.dim) != 4:
        raise TokenReduceError("calibration folders feed one image input [B, C, H, W]; this model takes "
                               f"{', '.join(i.name for i in model.graph.input)}: use dynamic int8 (no calibration)",
                               setting="calibration")
    dims = [d.dim_value for d in floats[0].type.tensor_type.shape.dim]
    return quantize.calibration_inputs(folder, floats[0].name, dims)


def _judge(path: Path, gm: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], precision: str,
           unreduced: torch.nn.Module | None, dynamic_batch: bool, opset: int | None,
           feeds: list[dict[str, Any]] | None, scratch: Path) -> Any:
    """The `quantize.Tolerance` of the `precision` file at `path` (see `targets/quantize.py`)."""
    from tokenreduce.targets import quantize

    got = run_onnx(path, args, kwargs)
    with torch.no_grad():
        expected = tensor_leaves(gm(*args, **kwargs))
    scale = max((float(e.abs().max()) for e in expected if e.dtype.is_floating_point and e.numel()), default=1.0)
    vs_fp32 = _max_diff(got, expected)
    with torch.no_grad():
        full = tensor_leaves(unreduced(*args, **kwargs)) if unreduced is not None else []
    if unreduced is None or [tuple(t.shape) for t in full] != [tuple(t.shape) for t in expected]:
        # no unreduced model, or token outputs shorter than its own (unmerge=True makes them comparable)
        floats = [(g, e) for g, e in zip(got, expected) if e.dtype.is_floating_point and e.numel()]
        sqnr = quantize.sqnr_db([g.float().numpy() for g, _ in floats], [e.float().numpy() for _, e in floats])
        return quantize.tolerance(precision, scale, vs_fp32=vs_fp32, sqnr_db=sqnr)
    program, _, _, _ = _export_program(unreduced, args, kwargs, dynamic_batch, opset, "reference")
    src, dst = scratch / "unreduced.onnx", scratch / f"unreduced.{precision}.onnx"
    program.save(str(src))
    _convert(src, dst, precision, feeds)
    full_p = run_onnx(dst, args, kwargs)
    return quantize.tolerance(precision, scale, vs_fp32=vs_fp32, reduction_error=_max_diff(got, full_p),
                              fp32_reduction_error=_max_diff(expected, full))


def _max_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    if len(a) != len(b) or any(tuple(x.shape) != tuple(y.shape) for x, y in zip(a, b)):
        raise TokenReduceError("the outputs to compare differ in number or shape")
    return max((float((x.float() - y.float()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)


def _by_name(gm: Any, leaves: Any) -> Any:
    """dynamic_shapes keyed like the module's forward signature (positional tuple, then kwargs)."""
    args_spec, kwargs_spec = leaves
    if not kwargs_spec:
        return tuple(args_spec)
    import inspect

    names = list(inspect.signature(gm.forward).parameters)
    spec: dict[str, Any] = dict(zip(names, args_spec))
    spec.update(kwargs_spec)
    return spec


def verify_onnx(onnx_path: str | os.PathLike[str], reduced: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                atol: float = 1e-4) -> float:
    """Run the ONNX file in onnxruntime and compare with the eager reduced graph; return max abs diff.

    `reduced` is a `ReducedModule` (its `graph_module` is the reference) or the graph module itself.
    Raises TokenReduceError past `atol`."""
    reference = getattr(reduced, "graph_module", reduced)
    got = run_onnx(onnx_path, args, kwargs)
    with torch.no_grad():
        expected = tensor_leaves(reference(*args, **kwargs))
    return compare_outputs(got, expected, atol, runtime="onnxruntime", what="ONNX",
                           consequence="the exported file was not written")


def cpu_session(path: str | os.PathLike[str], threads: int, level: str = "all") -> Any:
    """The one way a timed onnxruntime CPU session is opened (the target, `bench`, the benchmarks): `threads`
    intra-op threads, one inter-op thread, graph optimisation `level` "basic" / "extended" / "all"."""
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if level not in levels:
        raise TokenReduceError(f"unknown onnxruntime optimisation level {level!r}; choose one of {', '.join(levels)}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = levels[level]
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(onnx_path: str | os.PathLike[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The flat outputs of an ONNX file in an onnxruntime CPU session on these inputs."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = tensor_leaves((args, kwargs))
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(g) for g in sess.run(None, feeds)]


def compare_outputs(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], atol: float, *, runtime: str,
                    what: str, consequence: str) -> float:
    """Largest absolute difference between a runtime's flat outputs and the eager graph's; raises
    TokenReduceError on a count or shape mismatch, on unequal integer outputs, and past `atol`."""
    if len(got) != len(expected):
        raise TokenReduceError(f"{what} model has {len(got)} outputs, the reduced model {len(expected)}")
    diff = 0.0
    for g, e in zip(got, expected):
        g, e = g.detach().cpu(), e.detach().cpu()
        if tuple(g.shape) != tuple(e.shape):
            raise TokenReduceError(f"{what} output shape {tuple(g.shape)} differs from the model's {tuple(e.shape)}")
        if e.dtype.is_floating_point:
            diff = max(diff, float((g.to(e.dtype) - e).abs().max())) if e.numel() else diff
        elif not torch.equal(g.to(e.dtype), e):
            diff = float("inf")
    if diff > atol:
        raise TokenReduceError(
            f"{what} verification failed: {runtime} differs from the eager reduced model by {diff:.3g} "
            f"(tolerance {atol:g}); {consequence}"
        )
    return diff


class OnnxTarget(ArtefactTarget):
    name: ClassVar[str] = "onnx"
    runtime: ClassVar[str] = "onnxruntime"
    suffix: ClassVar[str] = ".onnx"
    summary: ClassVar[str] = ("ONNX file (static check + onnxruntime verification), run in an onnxruntime CPU "
                              "session")

    def available(self) -> tuple[bool, str]:
        missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if not _importable(m)]
        if missing:
            return False, f"missing Python packages: {', '.join(missing)} (pip install {' '.join(missing)})"
        return True, ""

    def check(self, model: Any) -> list[str]:
        return check_static(model)

    def lower(self, gm: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
              options: TargetOptions) -> Lowered:
        self.require_available()
        device = options.resolved_device(args, kwargs)
        if device.type != "cpu":
            raise TokenReduceError(f"the onnx target runs its model in an onnxruntime CPU session; device "
                                   f"{str(device)!r} is not supported: pass device='cpu' and CPU inputs (the "
                                   f"written file runs on GPUs through the tensorrt target)")
        dynamic = options.dynamic_batch and graph_batch_is_dynamic(gm) is not False

        def export(path: Path) -> OnnxExport:
            return export_graph(gm, args, kwargs, path, verify=options.verify, atol=options.atol, dynamic_batch=dynamic,
                                opset=options.opset, precision=options.precision, calibration=options.calibration,
                                unreduced=options.unreduced, fused_attention=options.fused_attention)

        threads = options.threads or default_threads()
        if options.output is not None:
            result = export(options.output)
            sess = cpu_session(options.output, threads)
        else:
            with scratch_folder(prefix="tokenreduce-onnx-") as tmp:
                result = export(Path(tmp) / "model.onnx")
                # the session holds the weights in memory: the scratch file can go
                sess = cpu_session(result.path, threads)
        with torch.no_grad():
            template = gm(*args, **kwargs)  # the output structure the runner gives back
        return self._lowered(sess, result, template, args, kwargs, options)

    def _lowered(self, sess: Any, result: OnnxExport, template: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                options: TargetOptions) -> Lowered:
        names = [i.name for i in sess.get_inputs()]

        def feeds(call_args: tuple[Any, ...], call_kwargs: dict[str, Any]) -> dict[str, Any]:
            tensors = tensor_leaves((call_args, call_kwargs))
            if len(tensors) != len(names):
                raise TokenReduceError(f"the ONNX model takes {len(names)} input tensors ({', '.join(names)}), "
                                       f"got {len(tensors)}")
            return {name: t.detach().cpu().numpy() for name, t in zip(names, tensors)}

        def run(*call_args: Any, **call_kwargs: Any) -> Any:
            outs = sess.run(None, feeds(call_args, call_kwargs))
            return fill_tensor_leaves(template, [torch.from_numpy(o) for o in outs])

        def bind(call_args: tuple[Any, ...], call_kwargs: dict[str, Any]) -> Any:
            bound = feeds(call_args, call_kwargs)
            return lambda: sess.run(None, bound)

        # the file, not the graph, says whether the batch stayed symbolic through the export
        dynamic = all(isinstance(i.shape[0], str) or i.shape[0] is None for i in sess.get_inputs() if i.shape)
        return Lowered(self.name, self.runtime, run, bind, batch_of(args, kwargs), dynamic,
                       path=options.output,
                       verification=Verification(result.problems, result.verified, result.max_abs_diff,
                                                 result.tolerance.atol if result.tolerance else options.atol,
                                                 precision=result.precision,
                                                 tolerance=result.tolerance.describe() if result.tolerance else ""),
                       export=result, threads=options.threads or default_threads())


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
