"""ONNX target: parity, export safety and the verifier's teeth.

* Parity: every method (ToMe with a per-layer r list, ToMe with unmerge, EViT with and without fuse) on a
  tiny timm ViT and a tiny Hugging Face ViT, and ToMe (r=3, unmerge) / EViT (keep 0.7 at layers 1 and 3)
  on the real all-MiniLM-L6-v2 with a padded 32-token batch and an attention mask. Each model is exported
  once (dynamic batch, example batch 4, `export_onnx` verifies it) and the file then runs in onnxruntime
  at batch 1 and batch 4 on *fresh* inputs against the eager reduced graph (`red.graph_module`), 1e-4.
* Export safety of every exported file: no ScatterND / NonZero, every ScatterElements is a sum, every
  TopK k a constant, every non-batch dimension static (`check_static` is empty), TensorRT check clean.
* A ToMe merge written the way ToMe's official code writes it (`scatter_reduce(mean, include_self=False)`),
  numerically right in PyTorch, is refused by `export_onnx` (the exporter turns the mean into an
  overwriting ScatterElements) and no file is left behind; each of the two detectors (static check,
  onnxruntime verification) catches it on its own.
* `check_static` on hand-built models: NonZero, non-constant TopK k, ScatterND, overwrite ScatterElements
  and a symbolic non-batch dimension are each reported; a clean model gives [].

Exports cost ~5-20 s each on 2 cores; every exported model is shared by its tests (module-scoped fixture).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from conftest import TOL, _hf_vision_kw, images, make_timm_vit
from onnx import TensorProto, helper
from torch.utils import _pytree as pytree

import tokenreduce
import tokenreduce.targets.onnx as onnx_target
from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels import reference
from tokenreduce.passes import inline_reference_ops
from tokenreduce.targets.onnx import check_static, export_failure, export_onnx, verify_onnx
from tokenreduce.targets.tensorrt import check_tensorrt

EXPORT_BATCH = 4
CHECK_BATCHES = (1, 4)
MINILM_LEN = 32


# ------------------------------------------------------------------------------------------------ models
def _hf_vit_classifier(request):
    return request.getfixturevalue("hf_vit")  # ViTForImageClassification, 17 tokens, logits [B, 5]


def _hf_vit_tokens(request):
    """HF ViTModel (same tiny config): last_hidden_state [B, 17, 64] is a token output, so unmerge shows."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    return ViTModel(ViTConfig(**_hf_vision_kw())).eval()


def _timm_classifier(request):
    return request.getfixturevalue("timm_vit")  # CLS pooling, 17 tokens, logits [B, 5]


def _timm_tokens(request):
    """timm ViT without pooling: the head runs on every token, output [B, 17, 5] (a token output)."""
    return make_timm_vit(global_pool="")


MINILM_EXPORT_SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the river bank this morning.",
    "Hi",
    "Token merging reduces the cost of transformers by combining similar tokens.",
]
MINILM_CHECK_SENTENCES = [  # fresh inputs for the batch-1 / batch-4 checks (row 0 alone at batch 1)
    "A woman is slicing an onion in the kitchen.",
    "Two dogs run across a snowy field.",
    "Stocks fell sharply on Monday after the central bank raised interest rates again.",
    "ok",
]


@pytest.fixture(scope="module")
def minilm():
    from tokenreduce.evaluate.models import ModelMissing, load_minilm

    try:
        return load_minilm()
    except ModelMissing as exc:
        pytest.skip(f"real all-MiniLM-L6-v2 ONNX parity skipped: {exc}")


def _minilm_batch(tokenizer, sentences):
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=MINILM_LEN, return_tensors="pt")
    return (enc["input_ids"],), {"attention_mask": enc["attention_mask"]}


@dataclass
class Case:
    model: Callable[[Any], torch.nn.Module] | None  # None: the MiniLM fixture
    settings: dict[str, Any]
    input_names: list[str]
    token_output: bool = False  # the first output keeps the original token count (unmerge)
    text: bool = False  # MiniLM: inputs come from the tokenizer


CASES = {
    "timm-tome-rlist": Case(_timm_classifier, dict(method="tome", r=[4, 3, 2, 1]), ["x"]),
    "timm-tome-unmerge": Case(_timm_tokens, dict(method="tome", r=3, unmerge=True), ["x"], token_output=True),
    "timm-evit-fuse": Case(_timm_classifier, dict(method="evit", keep_ratio=0.5, layers=[1, 2]), ["x"]),
    "timm-evit-nofuse": Case(_timm_classifier, dict(method="evit", keep_ratio=0.5, layers=[1, 2], fuse=False),
                             ["x"]),
    "hf-tome-rlist": Case(_hf_vit_classifier, dict(method="tome", r=[4, 3, 2, 1]), ["pixel_values"]),
    "hf-tome-unmerge": Case(_hf_vit_tokens, dict(method="tome", r=3, unmerge=True), ["pixel_values"],
                            token_output=True),
    "hf-evit-fuse": Case(_hf_vit_classifier, dict(method="evit", keep_ratio=0.5, layers=[1, 2]), ["pixel_values"]),
    "hf-evit-nofuse": Case(_hf_vit_classifier, dict(method="evit", keep_ratio=0.5, layers=[1, 2], fuse=False),
                           ["pixel_values"]),
    "minilm-tome-r3-unmerge": Case(None, dict(method="tome", r=3, unmerge=True), ["input_ids", "attention_mask"],
                                   token_output=True, text=True),
    "minilm-evit-0.7": Case(None, dict(method="evit", keep_ratio=0.7, layers=[1, 3]), ["input_ids", "attention_mask"],
                            text=True),
}


@dataclass
class Exported:
    name: str
    case: Case
    reduced: Any
    path: Path
    inputs: Callable[[int], tuple[tuple[Any, ...], dict[str, Any]]]
    result: Any = None
    error: Exception | None = None
    session: Any = None
    original_tokens: int = 0

    def require(self, skip: bool = False):
        """The export result; a refused export fails the parity tests and skips the others (no file)."""
        if self.error is not None:
            msg = f"{self.name}: export_onnx refused the reduced model: {self.error}"
            if skip:
                pytest.skip(msg + " (reported by test_onnx_parity; nothing to inspect)")
            pytest.fail(msg)
        return self.result


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory) -> Exported:
    """Compile one case at batch 4 (dynamic batch), export it once with verification, open an ORT session."""
    import onnxruntime as ort

    name = request.param
    case = CASES[name]
    if case.text:
        model, tokenizer = request.getfixturevalue("minilm")
        args, kwargs = _minilm_batch(tokenizer, MINILM_EXPORT_SENTENCES)

        def inputs(batch):
            return _minilm_batch(tokenizer, MINILM_CHECK_SENTENCES[:batch])
        tokens = MINILM_LEN
    else:
        model = case.model(request)
        args, kwargs = (images(EXPORT_BATCH),), {}

        def inputs(batch):
            return (images(batch, seed=100 + batch),), {}
        tokens = 17
    red = tokenreduce.compile(model, args, kwargs or None, inner="eager", count_model_flops=False, **case.settings)
    path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
    out = Exported(name, case, red, path, inputs, original_tokens=tokens)
    try:
        out.result = export_onnx(red, path)
    except TokenReduceError as exc:
        out.error = exc
        return out
    out.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return out


def _flat(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("batch", CHECK_BATCHES)
def test_onnx_parity(exported, batch):
    res = exported.require()
    assert res.problems == []
    assert res.verified and res.max_abs_diff is not None and res.max_abs_diff <= TOL
    assert res.input_names == exported.case.input_names
    assert exported.path.is_file()
    # one file, dynamic batch: the batch dimension of every input is symbolic, the rest fixed
    for inp in exported.session.get_inputs():
        assert isinstance(inp.shape[0], str), (inp.name, inp.shape)
        assert all(isinstance(d, int) for d in inp.shape[1:]), (inp.name, inp.shape)

    args, kwargs = exported.inputs(batch)
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    assert leaves[0].shape[0] == batch
    feeds = {name: t.numpy() for name, t in zip(res.input_names, leaves)}
    got = exported.session.run(None, feeds)
    with torch.no_grad():
        expected = _flat(exported.reduced.graph_module(*args, **kwargs))
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert tuple(g.shape) == tuple(e.shape), (i, g.shape, e.shape)
        assert g.shape[0] == batch
        diff = float(np.abs(g - e.numpy()).max())
        assert diff <= TOL, f"{exported.name} batch {batch} output {i}: onnxruntime vs eager max abs diff {diff:.3g}"
    if exported.case.token_output:  # unmerge restored the original token count in the ONNX graph too
        assert got[0].shape[1] == exported.original_tokens


def test_reduction_is_in_the_onnx_graph(exported):
    """The exported graph really reduces: plans (TopK) and merges (ScatterElements sums) are present, no
    tokenreduce op is left, and the report says blocks lost tokens."""
    res = exported.require(skip=True)
    assert res.op_counts.get("TopK", 0) >= 1
    assert res.op_counts.get("ScatterElements", 0) >= 1
    assert not any(op.startswith("tokenreduce") for op in res.op_counts)
    blocks = exported.reduced.report.blocks
    assert blocks[-1].tokens_out < blocks[0].tokens_in


# ------------------------------------------------------------------------------------------------ export safety
def _graphs(model):
    """(nodes, constant names) of the main graph, every subgraph and every local function."""
    def walk(graph, consts):
        consts = set(consts) | {i.name for i in graph.initializer}
        consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        yield list(graph.node), consts
        for n in graph.node:
            for a in n.attribute:
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    yield from walk(g, consts)

    yield from walk(model.graph, set())
    for fn in model.functions:
        yield list(fn.node), {o for n in fn.node if n.op_type == "Constant" for o in n.output}


def test_exported_graph_is_export_safe(exported):
    exported.require(skip=True)
    model = onnx.load(str(exported.path))
    n_topk = n_scatter = 0
    for nodes, consts in _graphs(model):
        for node in nodes:
            assert node.op_type not in ("ScatterND", "NonZero", "Unique", "Compress", "Loop", "If", "Scan"), node.name
            assert node.domain in ("", "ai.onnx"), (node.name, node.domain, node.op_type)
            if node.op_type == "ScatterElements":
                n_scatter += 1
                reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
                assert reduction == "add", f"{node.name}: ScatterElements reduction={reduction!r}"
            if node.op_type == "TopK":
                n_topk += 1
                assert len(node.input) > 1 and node.input[1] in consts, f"{node.name}: k={node.input[1]!r} not constant"
    assert n_topk >= 1 and n_scatter >= 1
    assert check_static(model) == []
    # the batch is the only symbolic dimension of inputs and outputs
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        assert dims[0].dim_param, vi.name
        assert all(d.HasField("dim_value") for d in dims[1:]), vi.name
    assert check_tensorrt(model) == []


# ------------------------------------------------------------------------------------------------ the verifier bites
def scatter_mean_apply_plan(x, slot, weight, size, n_out):
    """`apply_plan` written with `scatter_reduce(mean, include_self=False)`, as ToMe's official merge is.

    Exactly the reference in PyTorch (mean * count = sum), but the ONNX exporter turns the mean into an
    overwriting ScatterElements: every slot keeps one source instead of the average."""
    _, size_out = reference.apply_plan(x, slot, weight, size, n_out)  # sizes as usual: only the merge differs
    bsz, n, c = x.shape
    w = weight if weight is not None else size if size is not None else torch.ones(bsz, n, dtype=x.dtype)
    w = w.to(x.dtype)
    mean = torch.zeros(bsz, n_out + 1, c, dtype=x.dtype, device=x.device).scatter_reduce(
        1, slot[:, :, None].expand(bsz, n, c), x * w[:, :, None], reduce="mean", include_self=False)
    count = torch.zeros(bsz, n_out + 1, dtype=x.dtype, device=x.device).scatter_add(1, slot, torch.ones_like(w))
    wsum = torch.zeros(bsz, n_out + 1, dtype=x.dtype, device=x.device).scatter_add(1, slot, w)[:, :n_out]
    denom = torch.where(wsum > 0, wsum, torch.ones_like(wsum))
    return mean[:, :n_out] * count[:, :n_out, None] / denom[:, :, None], size_out


@pytest.fixture(scope="module")
def tome_timm(timm_vit):
    return tokenreduce.compile(timm_vit, (images(EXPORT_BATCH),), method="tome", r=3, inner="eager",
                               count_model_flops=False)


@pytest.fixture
def scatter_mean_merge(monkeypatch):
    monkeypatch.setitem(inline_reference_ops.REFERENCES, torch.ops.tokenreduce.apply_plan.default,
                        scatter_mean_apply_plan)


def test_scatter_mean_merge_is_right_in_pytorch(tome_timm):
    """The replacement is a correct merge in eager PyTorch: the model with it inlined matches the reduced model,
    so whatever the ONNX checks catch below is the exporter's doing, not a wrong replacement."""
    g = torch.Generator().manual_seed(0)
    x, slot = torch.randn(3, 11, 5, generator=g), torch.randint(0, 7, (3, 11), generator=g)
    weight, size = torch.rand(3, 11, generator=g), torch.rand(3, 11, generator=g) + 1
    weight[0, :3] = 0
    for w, s in ((weight, size), (None, size), (None, None)):
        for got, exp in zip(scatter_mean_apply_plan(x, slot, w, s, 6), reference.apply_plan(x, slot, w, s, 6)):
            torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-6)

    import copy

    gm = copy.deepcopy(tome_timm.graph_module)
    refs = dict(inline_reference_ops.REFERENCES)
    refs[torch.ops.tokenreduce.apply_plan.default] = scatter_mean_apply_plan
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in refs:
            n += node.target == torch.ops.tokenreduce.apply_plan.default
            node.target = refs[node.target]
    gm.recompile()
    assert n >= 1
    x = images(EXPORT_BATCH)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), tome_timm.graph_module(x), atol=1e-5, rtol=1e-5)


def test_scatter_mean_merge_is_refused(tome_timm, scatter_mean_merge, tmp_path):
    out = tmp_path / "tome.onnx"
    with pytest.raises(TokenReduceError, match=r"ScatterElements|verification failed"):
        export_onnx(tome_timm, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file or folder left either


def test_each_check_alone_catches_scatter_mean(tome_timm, scatter_mean_merge, tmp_path, monkeypatch):
    """Export with both checks off, then run each on the file: the static check flags the overwriting
    ScatterElements and onnxruntime verification sees the wrong numbers (either one is enough)."""
    monkeypatch.setattr(onnx_target, "check_static", lambda model, probe_batch=3: [])
    out = tmp_path / "unchecked.onnx"
    export_onnx(tome_timm, out, verify=False)
    model = onnx.load(str(out))
    problems = check_static(model)
    assert any("ScatterElements" in p and "'none'" in p for p in problems), problems
    with pytest.raises(TokenReduceError, match="verification failed"):
        verify_onnx(out, tome_timm, tome_timm.example_args, tome_timm.example_kwargs)
    # and a generous tolerance tells how wrong it is: far from float noise
    x = tome_timm.example_args[0]
    import onnxruntime as ort

    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert float(np.abs(got - tome_timm.graph_module(x).numpy()).max()) > 1e-2


# ------------------------------------------------------------------------------------------------ check_static
def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _x(name="x", shape=("batch", 8)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _out(name, dtype=TensorProto.FLOAT, shape=None):
    return helper.make_tensor_value_info(name, dtype, shape)


def _k(value=3):
    return helper.make_tensor("k", TensorProto.INT64, [1], [value])


def _good_model():
    """Relu -> TopK (constant k) -> ScatterElements(add) back onto zeros: static, export-safe."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("TopK", ["r", "k"], ["vals", "idx"], axis=-1, name="topk"),
        helper.make_node("Mul", ["r", "zero"], ["z"], name="zeros"),
        helper.make_node("ScatterElements", ["z", "idx", "vals"], ["y"], axis=1, reduction="add", name="scatter_add"),
    ]
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    return _model(nodes, [_x()], [_out("y", shape=["batch", 8]), _out("idx", TensorProto.INT64, ["batch", 3])],
                  [_k(), zero])


def test_check_static_accepts_good_model():
    model = _good_model()
    onnx.checker.check_model(model)
    assert check_static(model) == []


def test_check_static_accepts_constant_node_k():
    nodes = [helper.make_node("Constant", [], ["kc"], value=_k(2), name="kconst"),
             helper.make_node("TopK", ["x", "kc"], ["v", "i"], axis=-1, name="topk")]
    assert check_static(_model(nodes, [_x()], [_out("v"), _out("i", TensorProto.INT64)])) == []


def test_check_static_reports_nonzero():
    model = _model([helper.make_node("NonZero", ["x"], ["nz"], name="nz")], [_x()], [_out("nz", TensorProto.INT64)])
    problems = check_static(model)
    assert any("NonZero" in p and "data-dependent" in p for p in problems), problems


def test_check_static_reports_non_constant_topk_k():
    k_in = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    model = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, name="topk_dyn")], [_x(), k_in],
                   [_out("v"), _out("i", TensorProto.INT64)])
    problems = check_static(model)
    assert any("topk_dyn" in p and "not a constant" in p for p in problems), problems


def test_check_static_reports_scatternd():
    idx = helper.make_tensor("ind", TensorProto.INT64, [1, 1], [0])
    upd = helper.make_tensor("upd", TensorProto.FLOAT, [1, 8], [1.0] * 8)
    model = _model([helper.make_node("ScatterND", ["x", "ind", "upd"], ["y"], name="snd")],
                   [_x(shape=(4, 8))], [_out("y")], [idx, upd])
    problems = check_static(model)
    assert any("ScatterND" in p for p in problems), problems


@pytest.mark.parametrize("reduction", ["none", "max"])
def test_check_static_reports_non_sum_scatter_elements(reduction):
    model = _good_model()
    for node in model.graph.node:
        if node.op_type == "ScatterElements":
            for a in node.attribute:
                if a.name == "reduction":
                    a.s = reduction.encode()
    problems = check_static(model)
    assert any("scatter_add" in p and repr(reduction) in p for p in problems), problems


def test_check_static_reports_symbolic_non_batch_dim():
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_x(shape=("batch", "tokens"))],
                   [_out("y")])
    problems = check_static(model)
    assert any("not static" in p for p in problems), problems


def test_check_static_reports_each_problem_once_per_node():
    """A model with all three faults reports all three."""
    idx = helper.make_tensor("ind", TensorProto.INT64, [1, 1], [0])
    upd = helper.make_tensor("upd", TensorProto.FLOAT, [1, 8], [1.0] * 8)
    k_in = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    nodes = [helper.make_node("NonZero", ["x"], ["nz"], name="nz"),
             helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, name="topk_dyn"),
             helper.make_node("ScatterND", ["x", "ind", "upd"], ["y"], name="snd")]
    model = _model(nodes, [_x(shape=(4, 8)), k_in],
                   [_out("nz", TensorProto.INT64), _out("v"), _out("i", TensorProto.INT64), _out("y")], [idx, upd])
    problems = check_static(model)
    for needle in ("NonZero", "TopK k is not a constant", "ScatterND"):
        assert any(needle in p for p in problems), (needle, problems)


def test_export_failure_names_the_innermost_cause():
    """torch.onnx's summary says only which of its steps failed; the line adds the cause it wraps."""
    summary = ("Failed to convert the exported program to an ONNX model. \x1b[96mThis is step 3/3\x1b[0m of exporting "
               "the model to ONNX. Next steps:\n- If there is a missing ONNX function, implement it.")
    try:
        try:
            try:
                raise LookupError("No ONNX function found for aten._is_all_true.default\nmore detail")
            except LookupError as root:
                raise ValueError("Error when translating node %_is_all_true") from root
        except ValueError as middle:
            raise RuntimeError(summary) from middle
    except RuntimeError as exc:
        line = export_failure(exc)
    assert line == ("Failed to convert the exported program to an ONNX model (step 3/3); "
                    "cause: LookupError: No ONNX function found for aten._is_all_true.default")
    assert export_failure(RuntimeError("no wrapped cause")) == "no wrapped cause"
