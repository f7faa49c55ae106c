"""An ONNX file that is not a model is reported, never passed (issue 18: `inspect empty.onnx --strict` said OK).

`check_static` and `check_tensorrt` (and the targets' `check`) take a ModelProto or a path. Each of these
must give at least one problem: an empty ModelProto, an empty file, every strict prefix of a valid model's
bytes (a truncated copy), a model without outputs, a model without an opset import, and bytes that are not
protobuf at all. The valid model they are cut from passes both checks, so the checks are not simply failing.
"""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from tokenreduce import targets
from tokenreduce.targets.onnx import check_static
from tokenreduce.targets.tensorrt import check_tensorrt


def _valid_model(outputs=True, opset=True):
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    graph = helper.make_graph(nodes, "g", [x], [y] if outputs else [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    if not opset:
        del model.opset_import[:]
    return model


def _problems(model):
    return check_static(model), [str(i) for i in check_tensorrt(model)]


def test_valid_model_passes_both_checks(tmp_path):
    path = tmp_path / "ok.onnx"
    onnx.save(_valid_model(), str(path))
    for model in (_valid_model(), path, str(path)):
        assert _problems(model) == ([], [])
        assert targets.get("onnx").check(model) == [] and targets.get("tensorrt").check(model) == []


def test_empty_model_proto_is_invalid():
    static, trt = _problems(onnx.ModelProto())
    assert any("no graph" in p for p in static) and any("no opset" in p for p in static)
    assert any("no graph" in p for p in trt)


def test_empty_file_is_invalid(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    static, trt = _problems(path)
    assert static and any("no graph" in p for p in static), static
    assert trt and all(str(path) in p for p in trt), trt
    assert targets.get("onnx").check(path) and targets.get("tensorrt").check(path)


def test_every_truncation_of_a_valid_file_is_invalid(tmp_path):
    data = _valid_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    for n in range(len(data)):
        path.write_bytes(data[:n])
        static, trt = _problems(path)
        assert static, f"check_static passed a file cut to {n} of {len(data)} bytes"
        assert trt, f"check_tensorrt passed a file cut to {n} of {len(data)} bytes"


@pytest.mark.parametrize("kind, needle", [("outputs", "no outputs"), ("opset", "no opset")])
def test_model_without_outputs_or_opset_is_invalid(kind, needle):
    model = _valid_model(**{kind: False})
    static, trt = _problems(model)
    assert any(needle in p for p in static), static
    assert any(needle in p for p in trt), trt


def test_garbage_bytes_are_reported_not_raised(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\xff\xfe this is not protobuf \x00\x01\x02" * 8)
    static, trt = _problems(path)
    assert static and trt


def test_shape_check_carries_no_weights():
    """check_static's shape-inference copy holds weights as typed inputs, not bytes: a model above 2 GB cannot be
    serialized in one protobuf, which shape inference does (the 860M-parameter SD UNet failed so). Small
    initializers (shape constants) stay constants."""
    import numpy as np
    from onnx import numpy_helper

    from tokenreduce.targets.onnx import PROBE_WEIGHT_ELEMENTS, _shape_probe

    weight = numpy_helper.from_array(np.ones((64, 128), np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 4, 32], np.int64), "shape")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 32])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [weight, shape]),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    assert 64 * 128 > PROBE_WEIGHT_ELEMENTS
    probe = _shape_probe(model)
    assert [i.name for i in probe.graph.input] == ["x", "w"] and [i.name for i in probe.graph.initializer] == ["shape"]
    assert probe.ByteSize() < model.ByteSize() / 10
    assert check_static(model) == []
    # shapes still flow through the weight-as-input: a reshape that cannot hold the MatMul's 128 columns is found
    bad_shape = numpy_helper.from_array(np.array([-1, 5, 32], np.int64), "shape")
    bad = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [weight, bad_shape]),
                            opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    assert check_static(bad) != []
