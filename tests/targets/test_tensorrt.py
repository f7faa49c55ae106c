"""TensorRT target: the static compatibility check (runs anywhere) and the engine builder (needs TensorRT + CUDA).

* `check_tensorrt` finds nothing to object to in reduced models exported by `export_onnx` (ToMe on a timm
  ViT, EViT on a Hugging Face ViT), given as a ModelProto or a path.
* On hand-built models it flags each refusal: an op in a custom domain (needs a plugin), an op outside the
  parser's table, TopK with k above TensorRT's 3840 (3840 itself is fine), TopK with a non-constant k,
  NonZero (data-dependent shape); a Constant-node k counts as constant.
* `build_engine` builds an engine where TensorRT and CUDA exist (skipped here, with
  `tensorrt_available()`'s reason); where they do not, it raises `TokenReduceError` saying what to install
  and leaves no engine file. Both "missing" branches of `tensorrt_available` are exercised with a fake
  module so the messages are tested on any machine.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from conftest import images
from onnx import TensorProto, helper

import tokenreduce
from tokenreduce.errors import TokenReduceError
from tokenreduce.targets.onnx import export_onnx
from tokenreduce.targets.tensorrt import TOPK_MAX_K, build_engine, check_tensorrt, tensorrt_available


# ------------------------------------------------------------------------------------------------ exported models
@pytest.fixture(scope="module")
def exported_paths(timm_vit, hf_vit, tmp_path_factory):
    """Two reduced models exported (and verified) once: ToMe r-list on timm, EViT on HF ViT."""
    folder = tmp_path_factory.mktemp("trt")
    paths = {}
    for name, model, settings in (
        ("timm-tome", timm_vit, dict(method="tome", r=[4, 3, 2, 1])),
        ("hf-evit", hf_vit, dict(method="evit", keep_ratio=0.5, layers=[1, 2])),
    ):
        red = tokenreduce.compile(model, (images(4),), inner="eager", count_model_flops=False, **settings)
        res = export_onnx(red, folder / f"{name}.onnx")
        assert res.problems == [] and res.verified
        paths[name] = res.path
    return paths


@pytest.mark.parametrize("name", ["timm-tome", "hf-evit"])
def test_check_tensorrt_accepts_exported_reduced_models(exported_paths, name):
    import onnx

    path = exported_paths[name]
    assert check_tensorrt(path) == []
    assert check_tensorrt(str(path)) == []
    model = onnx.load(str(path))
    assert check_tensorrt(model) == []
    ops = {n.op_type for n in model.graph.node}
    assert {"TopK", "ScatterElements"} <= ops  # the reduction is in the graph being checked


# ------------------------------------------------------------------------------------------------ hand-built models
def _model(nodes, inputs, outputs, initializers=(), extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", 18)] + [helper.make_opsetid(d, 1) for d in extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _x(n=8):
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])


def _out(name, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, None)


def _topk_model(k, n=8):
    init = helper.make_tensor("k", TensorProto.INT64, [1], [k])
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, name="topk")
    return _model([node], [_x(n)], [_out("v"), _out("i", TensorProto.INT64)], [init])


def test_clean_model_has_no_issues():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Softmax", ["r"], ["y"], axis=-1, name="softmax")]
    assert check_tensorrt(_model(nodes, [_x()], [_out("y")])) == []


def test_custom_domain_op_is_flagged():
    node = helper.make_node("MergeTokens", ["x"], ["y"], domain="com.example", name="merge")
    issues = check_tensorrt(_model([node], [_x()], [_out("y")], extra_opsets=["com.example"]))
    assert len(issues) == 1
    assert (issues[0].node, issues[0].op) == ("merge", "MergeTokens")
    assert "custom domain 'com.example'" in issues[0].reason and "plugin" in issues[0].reason
    assert "merge (MergeTokens)" in str(issues[0])


def test_tokenreduce_domain_op_is_flagged():
    """A tokenreduce op that escaped inlining would appear in a custom domain: it must not pass."""
    node = helper.make_node("apply_plan", ["x"], ["y"], domain="tokenreduce", name="plan")
    issues = check_tensorrt(_model([node], [_x()], [_out("y")], extra_opsets=["tokenreduce"]))
    assert [i.op for i in issues] == ["apply_plan"]


def test_unsupported_standard_op_is_flagged():
    node = helper.make_node("Det", ["x"], ["y"], name="det")
    issues = check_tensorrt(_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                                   [_out("y")]))
    assert [(i.op, i.reason) for i in issues] == [("Det", "not supported by the TensorRT ONNX parser")]


def test_topk_k_above_limit_is_flagged():
    issues = check_tensorrt(_topk_model(TOPK_MAX_K + 1, n=8192))
    assert len(issues) == 1 and issues[0].op == "TopK"
    assert f"k={TOPK_MAX_K + 1}" in issues[0].reason and str(TOPK_MAX_K) in issues[0].reason


def test_topk_k_at_limit_is_fine():
    assert TOPK_MAX_K == 3840
    assert check_tensorrt(_topk_model(TOPK_MAX_K, n=8192)) == []
    assert check_tensorrt(_topk_model(3)) == []


def test_topk_constant_node_k_is_fine_and_checked():
    for k, n_issues in ((5, 0), (5000, 1)):
        nodes = [helper.make_node("Constant", [], ["kc"], name="kconst",
                                  value=helper.make_tensor("kv", TensorProto.INT64, [1], [k])),
                 helper.make_node("TopK", ["x", "kc"], ["v", "i"], axis=-1, name="topk")]
        issues = check_tensorrt(_model(nodes, [_x(8192)], [_out("v"), _out("i", TensorProto.INT64)]))
        assert len(issues) == n_issues, (k, issues)


def test_topk_non_constant_k_is_flagged():
    k_in = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, name="topk_dyn")
    issues = check_tensorrt(_model([node], [_x(), k_in], [_out("v"), _out("i", TensorProto.INT64)]))
    assert [(i.node, i.op) for i in issues] == [("topk_dyn", "TopK")]
    assert "not a constant" in issues[0].reason


def test_topk_k_computed_from_shape_is_flagged():
    """k from Shape -> Gather (data flow, not an initializer) is not a build-time constant for the check."""
    idx = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "one"], ["k"], axis=0, name="gather"),
             helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, name="topk_shape")]
    issues = check_tensorrt(_model(nodes, [_x()], [_out("v"), _out("i", TensorProto.INT64)], [idx]))
    assert [i.node for i in issues] == ["topk_shape"]


def test_nonzero_is_flagged():
    node = helper.make_node("NonZero", ["x"], ["nz"], name="nz")
    issues = check_tensorrt(_model([node], [_x()], [_out("nz", TensorProto.INT64)]))
    assert [(i.node, i.op) for i in issues] == [("nz", "NonZero")]
    assert "depends on data" in issues[0].reason


def test_every_issue_is_reported():
    k_in = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    big = helper.make_tensor("kbig", TensorProto.INT64, [1], [4000])
    nodes = [helper.make_node("NonZero", ["x"], ["nz"], name="nz"),
             helper.make_node("TopK", ["x", "k"], ["v1", "i1"], axis=-1, name="topk_dyn"),
             helper.make_node("TopK", ["x", "kbig"], ["v2", "i2"], axis=-1, name="topk_big"),
             helper.make_node("Custom", ["x"], ["c"], domain="org.acme", name="custom")]
    outs = [_out("nz", TensorProto.INT64), _out("v1"), _out("i1", TensorProto.INT64), _out("v2"),
            _out("i2", TensorProto.INT64), _out("c")]
    issues = check_tensorrt(_model(nodes, [_x(8192), k_in], outs, [big], extra_opsets=["org.acme"]))
    assert sorted(i.node for i in issues) == ["custom", "nz", "topk_big", "topk_dyn"]


# ------------------------------------------------------------------------------------------------ engine building
@pytest.fixture
def tiny_onnx(tmp_path):
    """A valid, TensorRT-compatible ONNX file (batch-dynamic Relu)."""
    import onnx

    model = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_x()],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])])
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    return path


def test_build_engine_from_reduced_model(request, tmp_path):
    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(why)
    paths = request.getfixturevalue("exported_paths")  # only export when an engine can be built
    for name, fp16 in (("timm-tome", False), ("hf-evit", True)):
        engine = build_engine(paths[name], tmp_path / f"{name}.engine", fp16=fp16, batch=(1, 4, 8))
        assert engine == tmp_path / f"{name}.engine"
        assert engine.is_file() and engine.stat().st_size > 0
        assert not (tmp_path / f"{name}.engine.partial").exists()


def test_build_engine_refuses_incompatible_model(tmp_path):
    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(why)
    import onnx

    node = helper.make_node("NonZero", ["x"], ["nz"], name="nz")
    path = tmp_path / "bad.onnx"
    onnx.save(_model([node], [_x()], [_out("nz", TensorProto.INT64)]), str(path))
    with pytest.raises(TokenReduceError, match="not TensorRT-compatible"):
        build_engine(path, tmp_path / "bad.engine")
    assert not (tmp_path / "bad.engine").exists()


def test_build_engine_without_tensorrt_says_what_to_install(tiny_onnx, tmp_path):
    ok, why = tensorrt_available()
    if ok:
        pytest.skip(f"TensorRT {why} and CUDA are available here; the missing-TensorRT error cannot happen")
    engine = tmp_path / "tiny.engine"
    with pytest.raises(TokenReduceError) as err:
        build_engine(tiny_onnx, engine)
    assert str(err.value) == why
    if "not installed" in why:
        assert "install" in why and "tensorrt" in why
    assert not engine.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]  # no engine, no .partial


def test_tensorrt_missing_message(monkeypatch, tiny_onnx, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    ok, why = tensorrt_available()
    assert not ok
    assert "not installed" in why and "install the `tensorrt` Python package" in why and "NVIDIA" in why
    with pytest.raises(TokenReduceError, match="install the `tensorrt` Python package"):
        build_engine(tiny_onnx, tmp_path / "x.engine", fp16=True)
    assert not (tmp_path / "x.engine").exists()


def test_tensorrt_without_cuda_message(monkeypatch, tiny_onnx, tmp_path):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.9.0"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = tensorrt_available()
    assert not ok
    assert "10.9.0" in why and "no CUDA device" in why
    with pytest.raises(TokenReduceError, match="no CUDA device"):
        build_engine(tiny_onnx, tmp_path / "x.engine")
    assert not (tmp_path / "x.engine").exists()
