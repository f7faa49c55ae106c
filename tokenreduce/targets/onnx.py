"""ONNX target: export a reduced model, prove it is static and export-safe, and verify it numerically.

`export_onnx` takes a `ReducedModule`, inlines the pure-torch references of the tokenreduce ops (so the
exporter sees standard ops; see `passes/inline_reference_ops.py`), exports with
`torch.onnx.export(..., dynamo=True)` and a dynamic batch dimension, then:

1. **static check** (`check_static`): ONNX shape inference must give every intermediate value static
   dimensions except the batch; no data-dependent-shape ops (`NonZero`, `Unique`, ...); no `ScatterND`;
   `ScatterElements` only as a sum (`reduction="add"`, never an overwrite standing in for a mean); every
   `TopK` has a constant `k`.
2. **verification**: the ONNX model runs in onnxruntime on the example inputs and is compared with the
   eager reduced graph; past `atol` it is an error (skip only with `verify=False`).

The file is written to a temporary name and moved into place only after both checks pass, so a failed
export never leaves a file that looks good. Weights go into one file below 2 GB, external data above.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from tokenreduce.compiler.capture import batch_of, repeat_batch
from tokenreduce.errors import TokenReduceError
from tokenreduce.passes.inline_reference_ops import inline_reference_ops

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


def _const_names(model: Any) -> set[str]:
    names = {init.name for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            names.update(node.output)
    return names


def check_static(model: Any, probe_batch: int = 3) -> list[str]:
    """Problems that make an ONNX model unfit for fixed-shape runtimes (empty list: fine).

    The symbolic batch dimension of the inputs is pinned to `probe_batch`; shape inference must then give
    every value fully static dimensions (so batch is the only dynamic dimension anywhere). Also rejects
    data-dependent-shape ops, ScatterND, non-sum ScatterElements and TopK with a non-constant k."""
    import onnx

    problems: list[str] = []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
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


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def export_onnx(
    reduced: Any,
    path: str | os.PathLike[str],
    *,
    verify: bool = True,
    atol: float = 1e-4,
    dynamic_batch: bool | None = None,
    opset: int | None = None,
) -> OnnxExport:
    """Export a `ReducedModule` to ONNX, check it, verify it in onnxruntime, then write it to `path`."""
    import onnx

    path = Path(path)
    args, kwargs = reduced.example_args, reduced.example_kwargs
    gm = copy.deepcopy(reduced.graph_module).eval()
    inline_reference_ops(gm)
    dynamic = reduced.dynamic_batch if dynamic_batch is None else dynamic_batch
    dynamic_shapes = None
    trace_args, trace_kwargs = args, kwargs
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        leaves = pytree.tree_map(lambda t: {0: batch} if isinstance(t, torch.Tensor) and t.dim() > 0 else None,
                                 (args, kwargs))
        dynamic_shapes = _by_name(gm, leaves)
        if batch_of(args, kwargs) == 1:  # export specialises size-1 dims: trace at batch 2
            trace_args, trace_kwargs = repeat_batch(args, 1), repeat_batch(kwargs, 1)
    try:
        program = torch.onnx.export(gm, trace_args, kwargs=trace_kwargs or None, dynamo=True,
                                    dynamic_shapes=dynamic_shapes,
                                    optimize=True, opset_version=opset, verbose=False)
    except Exception as exc:  # noqa: BLE001
        raise TokenReduceError(f"ONNX export failed: {str(exc).splitlines()[0]}") from exc
    model = program.model_proto
    problems = check_static(model)
    weights = sum(t.numel() * t.element_size() for t in reduced.graph_module.state_dict().values())
    external = weights >= TWO_GB
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=".tokenreduce-", dir=path.parent))
    tmp = tmpdir / path.name
    try:
        program.save(str(tmp), external_data=external)
        result = OnnxExport(path=path, max_abs_diff=None, verified=False, problems=problems,
                            op_counts=dict(Counter(n.op_type for n in model.graph.node)), external_data=external,
                            input_names=[i.name for i in model.graph.input],
                            output_names=[o.name for o in model.graph.output])
        if problems:
            raise TokenReduceError(f"exported ONNX is not static/export-safe: {problems[0]}"
                                   + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
        if verify:
            result.max_abs_diff = verify_onnx(tmp, reduced, args, kwargs, atol=atol)
            if trace_args is not args or trace_kwargs is not kwargs:  # also at the traced batch
                result.max_abs_diff = max(result.max_abs_diff,
                                          verify_onnx(tmp, reduced, trace_args, trace_kwargs, atol=atol))
            result.verified = True
        for f in tmpdir.iterdir():
            os.replace(f, path.parent / f.name)
        onnx.checker.check_model(str(path))
        return result
    finally:
        for f in tmpdir.glob("*"):
            f.unlink()
        tmpdir.rmdir()


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

    Raises TokenReduceError past `atol`."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
    got = sess.run(None, feeds)
    with torch.no_grad():
        expected = _flat_tensors(reduced.graph_module(*args, **kwargs))
    if len(got) != len(expected):
        raise TokenReduceError(f"ONNX model has {len(got)} outputs, the reduced model {len(expected)}")
    diff = 0.0
    for g, e in zip(got, expected):
        if tuple(g.shape) != tuple(e.shape):
            raise TokenReduceError(f"ONNX output shape {tuple(g.shape)} differs from the model's {tuple(e.shape)}")
        if e.dtype.is_floating_point:
            diff = max(diff, float((torch.from_numpy(g) - e).abs().max()))
        elif not torch.equal(torch.from_numpy(g), e):
            diff = float("inf")
    if diff > atol:
        raise TokenReduceError(
            f"ONNX verification failed: onnxruntime differs from the eager reduced model by {diff:.3g} "
            f"(tolerance {atol:g}); the exported file was not written"
        )
    return diff
