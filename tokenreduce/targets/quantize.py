"""Lower-precision ONNX files of a reduced model: fp16 and int8 that leave the plan's comparisons and index
math alone.

A reduction plan ranks similarities or attention scores and turns the ranking into integer slots. Run in
fp16, its sentinels (-2 / -3 for cross-padding edges, `1e-6 * index` tie-breaks, `finfo.min` masks)
collapse, and near-equal scores swap; quantized to int8, the similarity matmul would rank quantized keys.
So the **plan subgraph** stays in fp32 and unquantized: every node that produces an index (TopK, ArgMax,
ArgMin, CumSum) plus every node whose outputs feed only such nodes (`plan_nodes`: ToMe's key mean, norm,
similarity matmul, masks and max; EViT's candidate ranking). The rest of the model changes precision:

* `fp16`: `onnxruntime.transformers.float16.convert_float_to_float16` with `keep_io_types=True` (inputs and
  outputs stay fp32) and the plan nodes in `node_block_list` (casts are inserted at their boundary).
* `int8`: `onnxruntime.quantization`, the plan nodes in `nodes_to_exclude`, weights per channel. Dynamic
  (`quantize_dynamic`, activations quantized at run time) when no calibration inputs are given (text
  encoders: integer token ids); static QDQ (`quantize_static`, MatMul/Gemm/Conv, activation ranges from
  calibration inputs, `calibration_reader`) when they are. A model with float inputs (vision) and no
  calibration folder is refused, naming `--calib DIR` and fp16 as the alternatives.

Tolerances (`tolerance`). In fp16/int8 the plan is computed from lower-precision keys and scores, so a
near-tie can rank the other way than in fp32 and merge other tokens: the file cannot be held to the fp32
reduced graph's outputs. It is verified against the **unreduced model at the same precision** instead
(when the caller passes the unreduced graph): max |reduced_P - unreduced_P| may exceed the fp32 reduction
error max |reduced - unreduced| by at most `REDUCTION_SLACK` (relative) plus the precision's floor
(`FLOOR` x the largest |output|), i.e. the reduction does not hurt more at this precision than in fp32.
Without the unreduced model, an fp16 file must stay within the floor of the fp32 reduced graph; an int8 file is
judged by its signal-to-quantization-noise ratio against that graph instead (`MIN_SQNR_DB`: 10 log10 of
sum(fp32^2) / sum((int8 - fp32)^2) over every output element), because static int8 of a real ViT moves single
elements by more than any useful floor while the output as a whole stays close (DINOv2-S, unreduced, static
int8 on 50 CIFAR-10 calibration images: largest element error 13% of the largest |output|, SQNR 20.8 dB, CLS
cosine to fp32 >= 0.988 per image, k-NN within 3.5 points; fp16: 0.2%, 58.5 dB). A broken conversion (a
wrong token routed, a quantized index) leaves no such ratio: a random output of the same scale gives about 0 dB.
The numbers and the rule are printed by `tokenreduce convert`.

Refuses: an unknown precision; int8 of a model without a MatMul/Gemm/Conv weight to quantize; static int8
without calibration inputs; a calibration folder with no usable files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenreduce.errors import TokenReduceError

PRECISIONS = ("fp32", "fp16", "int8")
INDEX_OPS = frozenset({"TopK", "ArgMax", "ArgMin", "CumSum"})
QUANTIZABLE = ("MatMul", "Gemm", "Conv")
FP32_OPS = frozenset({"ScatterElements"})
"""Ops kept in fp32 in fp16 files: onnxruntime's CPU ScatterElements has no fp16 sum (the apply's scatter-add)."""
FLOOR = {"fp32": 0.0, "fp16": 1e-2, "int8": 5e-2}
"""Smallest tolerance of each precision, as a fraction of the largest |output| of the fp32 reference."""
REDUCTION_SLACK = {"fp32": 0.0, "fp16": 0.25, "int8": 0.5}
"""How much further (relative) the reduced model may be from the unreduced one at a precision than in fp32."""
MIN_SQNR_DB = {"int8": 15.0}
"""Without an unreduced model, the smallest SQNR (dB) of a file of this precision against the fp32 reduced graph
(precisions not listed use the floor). 15 dB = noise energy at most 3% of the signal's."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise TokenReduceError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}",
                               setting="precision")
    return precision


# --------------------------------------------------------------------------------------------- plan subgraph
def plan_nodes(model: Any) -> set[str]:
    """Names of the nodes of the plan subgraph: index-producing nodes (TopK, ArgMax, ArgMin, CumSum) and
    every node all of whose outputs are consumed only inside that set (never a graph output). Unnamed
    nodes are named first (the converters address nodes by name)."""
    graph = model.graph
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"tokenreduce_node_{i}"
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    inside = {node.name for node in graph.node if node.op_type in INDEX_OPS}
    changed = True
    while changed:
        changed = False
        for node in reversed(graph.node):
            if node.name in inside or not node.output:
                continue
            users = [u for out in node.output for u in consumers.get(out, [])]
            if users and not any(o in outputs for o in node.output) and all(u.name in inside for u in users):
                inside.add(node.name)
                changed = True
    return inside


# --------------------------------------------------------------------------------------------- conversions
def to_fp16(model: Any) -> Any:
    """An fp16 copy of a ModelProto: fp32 inputs/outputs, the plan subgraph in fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    keep = sorted(plan_nodes(copy))
    try:
        return topo_sorted(convert_float_to_float16(copy, keep_io_types=True, node_block_list=keep,
                                                    op_block_list=sorted(FP32_OPS)))
    except Exception as exc:  # noqa: BLE001
        raise TokenReduceError(f"fp16 conversion failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                               ) from exc


def topo_sorted(model: Any) -> Any:
    """The model with its nodes in topological order (the fp16 converter puts input casts after their users;
    onnx.checker refuses that). Raises TokenReduceError on a cycle."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise TokenReduceError(f"fp16 conversion left node {rest[0].name} with inputs nothing produces")
        pending = rest
    nodes = [type(n)() for n in ordered]
    for new, old in zip(nodes, ordered):
        new.CopyFrom(old)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def quantizable_nodes(model: Any, exclude: set[str]) -> list[str]:
    """MatMul/Gemm/Conv nodes outside `exclude` with a constant (initializer) input: what int8 quantizes."""
    inits = {i.name for i in model.graph.initializer}
    consts = inits | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type in QUANTIZABLE and n.name not in exclude and any(i in consts for i in n.input)]


def to_int8(src: Path, dst: Path, *, calibration: Sequence[dict[str, np.ndarray]] | None) -> str:
    """Quantize the fp32 file `src` into `dst`; returns the mode used ("dynamic" or "static").

    `calibration`: input feeds for static quantization (None: dynamic)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    model = onnx.load(str(src))
    exclude = plan_nodes(model)
    targets = quantizable_nodes(model, exclude)
    if not targets:
        raise TokenReduceError("int8 quantization found no MatMul/Gemm/Conv with constant weights outside the plan "
                               "subgraph, so nothing would be quantized; use precision 'fp16' or 'fp32'",
                               setting="precision")
    named = src.with_name(src.stem + ".named.onnx")
    onnx.save(model, str(named))  # node names added by plan_nodes
    extra = {"MatMulConstBOnly": True}
    try:
        if calibration is None:
            quantize_dynamic(str(named), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             nodes_to_quantize=targets, extra_options=extra)
            return "dynamic"
        if not calibration:
            raise TokenReduceError("static int8 quantization got no calibration inputs", setting="calib")

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it: Iterator[dict[str, np.ndarray]] = iter(calibration)  # type: ignore[arg-type]

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.it, None)

        quantize_static(str(named), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZABLE), per_channel=True, nodes_to_quantize=targets,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, extra_options=extra)
        return "static"
    except TokenReduceError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise TokenReduceError(f"int8 quantization failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                               ) from exc
    finally:
        named.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- calibration
def calibration_inputs(folder: str | os.PathLike[str], input_name: str, shape: Sequence[int], *,
                       mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                       limit: int = 64) -> list[dict[str, np.ndarray]]:
    """Feeds `{input_name: [1, C, H, W] float32}` from a folder (searched recursively, sorted): images
    (resized bicubically to H x W, scaled to [0, 1], normalised by `mean`/`std`) or `.npy` arrays of the
    input's shape without the batch. At most `limit` files. Refuses a missing folder or one without usable files."""
    root = Path(folder)
    if not root.is_dir():
        raise TokenReduceError(f"calibration folder {root} does not exist", setting="calib")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (*IMAGE_SUFFIXES, ".npy"))[:limit]
    if not files:
        raise TokenReduceError(f"calibration folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)}) or .npy "
                               f"arrays", setting="calib")
    c, h, w = (int(d) for d in shape[1:])
    feeds = []
    for path in files:
        if path.suffix.lower() == ".npy":
            arr = np.load(path).astype(np.float32)
            if tuple(arr.shape) != (c, h, w):
                raise TokenReduceError(f"calibration array {path} has shape {tuple(arr.shape)}, the model input "
                                       f"{input_name!r} needs {(c, h, w)}", setting="calib")
        else:
            from PIL import Image

            with Image.open(path) as img:
                resized = img.convert("RGB" if c == 3 else "L").resize((w, h), Image.Resampling.BICUBIC)
                arr = np.asarray(resized, dtype=np.float32) / 255.0
            arr = arr.reshape(h, w, c).transpose(2, 0, 1)
            arr = (arr - np.asarray(mean[:c], np.float32)[:, None, None]) / np.asarray(std[:c], np.float32)[:, None, None]
        feeds.append({input_name: arr[None].astype(np.float32)})
    return feeds


# --------------------------------------------------------------------------------------------- tolerance
@dataclass
class Tolerance:
    """How a lower-precision file was judged (`tolerance`)."""

    precision: str
    atol: float  # the limit applied to `measured`
    measured: float  # what was compared with it
    scale: float  # largest |output| of the fp32 reduced graph
    against: str  # "unreduced" or "fp32"
    fp32_reduction_error: float | None = None  # against="unreduced": max |reduced - unreduced| in fp32
    sqnr_db: float | None = None  # against="fp32": SQNR of the file against the fp32 reduced graph
    min_sqnr_db: float | None = None  # against="fp32" for precisions judged by SQNR (`MIN_SQNR_DB`)

    @property
    def ok(self) -> bool:
        if self.min_sqnr_db is not None:
            return self.sqnr_db is not None and self.sqnr_db >= self.min_sqnr_db
        return self.measured <= self.atol

    def describe(self) -> str:
        floor = f"{FLOOR[self.precision]:g} x largest |output| {self.scale:.3g}"
        if self.against == "unreduced":
            return (f"{self.precision}: reduced vs unreduced, both {self.precision}, differ by {self.measured:.3g}; "
                    f"allowed {self.atol:.3g} = the fp32 difference {self.fp32_reduction_error:.3g} x "
                    f"{1 + REDUCTION_SLACK[self.precision]:g} + {floor}")
        why = "no unreduced model with the same output shapes to compare with; unmerge=True gives token outputs its shape"
        if self.min_sqnr_db is not None:
            return (f"{self.precision}: SQNR against the fp32 reduced graph {self.sqnr_db:.1f} dB, required >= "
                    f"{self.min_sqnr_db:g} dB (largest element error {self.measured:.3g}, "
                    f"{self.measured / self.scale if self.scale else 0.0:.1%} of the largest |output| {self.scale:.3g}; "
                    f"{why})")
        return (f"{self.precision}: differs from the fp32 reduced graph by {self.measured:.3g}; allowed {self.atol:.3g} "
                f"= {floor} ({why})")


def sqnr_db(got: Sequence[Any], expected: Sequence[Any]) -> float:
    """Signal-to-quantization-noise ratio in dB of `got` against `expected` (matching float arrays/tensors):
    10 log10(sum(expected^2) / sum((got - expected)^2)) over every element; inf when they are equal."""
    signal = noise = 0.0
    for g, e in zip(got, expected, strict=True):
        g64, e64 = np.asarray(g, dtype=np.float64), np.asarray(e, dtype=np.float64)
        signal += float((e64 ** 2).sum())
        noise += float(((g64 - e64) ** 2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(signal / noise)) if signal > 0 else float("-inf")


def tolerance(precision: str, scale: float, *, vs_fp32: float, reduction_error: float | None = None,
              fp32_reduction_error: float | None = None, sqnr_db: float | None = None) -> Tolerance:
    """Judge a `precision` file. With the unreduced model (`reduction_error` = max |reduced_P - unreduced_P|,
    `fp32_reduction_error` the same in fp32): the reduction may not move the output further from the
    unreduced model at this precision than in fp32, beyond `REDUCTION_SLACK` and the floor. Without it:
    `vs_fp32` (max |reduced_P - reduced fp32 graph|) must stay within the floor, or for the precisions in
    `MIN_SQNR_DB`, `sqnr_db` (the file against the fp32 reduced graph, see `sqnr_db()`) must reach it."""
    floor = FLOOR[precision] * scale
    if reduction_error is None or fp32_reduction_error is None:
        minimum = MIN_SQNR_DB.get(precision)
        if minimum is not None and sqnr_db is None:
            raise TokenReduceError(f"judging {precision} without an unreduced model needs the file's SQNR")
        return Tolerance(precision, floor, vs_fp32, scale, "fp32", sqnr_db=sqnr_db, min_sqnr_db=minimum)
    limit = fp32_reduction_error * (1 + REDUCTION_SLACK[precision]) + floor
    return Tolerance(precision, limit, reduction_error, scale, "unreduced", fp32_reduction_error)
