"""Edge deployment of reduced models: the cheaper exported plan subgraph, fp16/int8 files, refusals, threads.

* The exported forms of `apply_plan` (`reference.apply_plan_reps` / `apply_plan_packed`) against a loop
  written here (weighted mean per slot, size sums over sources with weight > 0, dump slot dropped) on real
  ToMe and EViT plans, with padding weights of 0 and a NaN source (it stays in its slot and channel).
* The ONNX export with the exported forms: verified against the eager graph, fewer ScatterElements than
  the reference form, and the representative map found for ToMe and EViT plans.
* fp16 and int8 (static with a calibration folder; dynamic for a text encoder): verified against the
  unreduced model at the same precision; the plan subgraph stays fp32 (no Cast to fp16 feeds a TopK;
  int8: the similarity MatMul stays a float MatMul) and weights are converted/quantized.
* Refusals: unknown precision, calibration without int8, int8 of an image model without calibration,
  an empty calibration folder, a precision on a target that cannot honour it.
* `--threads`: the onnxruntime runner and `tokenreduce bench --json` report the threads used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import bert_batch, images, make_timm_vit

import tokenreduce
from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels import plans, reference
from tokenreduce.passes.inline_reference_ops import inline_reference_ops
from tokenreduce.targets import TargetOptions, get, quantize
from tokenreduce.targets.onnx import export_graph, export_onnx, run_onnx
from tokenreduce.targets.quantize import plan_nodes


def loop_apply(x, slot, weight, size, n_out):
    """Independent reference: per batch row and slot, sum(w * x) / sum(w) (0 if no weight), sizes of w > 0."""
    bsz, n, c = x.shape
    size = torch.ones(bsz, n, dtype=x.dtype) if size is None else size
    weight = size if weight is None else weight
    out = torch.zeros(bsz, n_out, c, dtype=x.dtype)
    sizes = torch.zeros(bsz, n_out, dtype=size.dtype)
    for b in range(bsz):
        for s in range(n_out):
            src = [i for i in range(n) if int(slot[b, i]) == s]
            wsum = sum(float(weight[b, i]) for i in src)
            acc = sum((weight[b, i] * x[b, i] for i in src), torch.zeros(c, dtype=x.dtype))
            out[b, s] = acc / wsum if wsum > 0 else acc * 0
            sizes[b, s] = sum(float(size[b, i]) for i in src if float(weight[b, i]) > 0)
    return out, sizes


def tome_case(n=17, c=8, r=5, protected=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(3, n, c, generator=g)
    slot, rep, keep = plans.bipartite_plan(k, r, protected)
    x = torch.randn(3, n, c, generator=g)
    size = torch.randint(1, 4, (3, n), generator=g).float()
    return x, slot, size * keep, size, n - r, rep


def evit_case(n=17, c=8, keep=9, fuse=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(3, n, generator=g).softmax(-1)
    slot, weight, rep = plans.topk_plan(scores, keep, 1, fuse)
    x = torch.randn(3, n, c, generator=g)
    return x, slot, weight, None, rep.shape[1], rep


@pytest.mark.parametrize("case", [tome_case(), tome_case(protected=0, r=8, seed=3), evit_case(),
                                  evit_case(fuse=False)], ids=["tome", "tome-r8-p0", "evit", "evit-nofuse"])
def test_exported_apply_forms_match_a_loop(case):
    x, slot, weight, size, n_out, rep = case
    want_x, want_s = loop_apply(x, slot, weight, size, n_out)
    for got in (reference.apply_plan_reps(x, slot, weight, size, n_out, rep),
                reference.apply_plan_packed(x, slot, weight, size, n_out)):
        torch.testing.assert_close(got[0], want_x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want_s)


def test_exported_apply_keeps_a_nan_in_its_slot_and_channel():
    x, slot, weight, size, n_out, rep = tome_case()
    x[0, 4, 2] = float("nan")  # token 4 of row 0, channel 2
    for out, _ in (reference.apply_plan_reps(x, slot, weight, size, n_out, rep),
                   reference.apply_plan_packed(x, slot, weight, size, n_out)):
        bad = torch.isnan(out).nonzero().tolist()
        assert bad == [[0, int(slot[0, 4]), 2]]


def test_zero_weight_sources_count_no_size():
    x, slot, weight, size, n_out, rep = tome_case()
    weight = weight.clone()
    weight[1, 0::2] = 0.0  # every A token of row 1 (including merged ones) contributes nothing
    want_x, want_s = loop_apply(x, slot, weight, size, n_out)
    got_x, got_s = reference.apply_plan_reps(x, slot, weight, size, n_out, rep)
    torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_s, want_s)


# ------------------------------------------------------------------------------------------------ ONNX
@pytest.fixture(scope="module")
def vit():
    return make_timm_vit(img_size=32, depth=3)


@pytest.fixture(scope="module")
def reduced(vit):
    x = images(2)
    with torch.no_grad():
        return {
            "tome": tokenreduce.compile(vit, (x,), inner="eager", method="tome", r=3),
            "evit": tokenreduce.compile(vit, (x,), inner="eager", method="evit", keep_ratio=0.6, layers=[1]),
            "none": tokenreduce.compile(vit, (x,), inner="eager", method="none", count_model_flops=False),
        }


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_inlining_uses_the_representative_form(reduced, method):
    gm = reduced[method].graph_module
    import copy

    inlined = copy.deepcopy(gm)
    inline_reference_ops(inlined, exported_apply=True)
    targets = [n.target for n in inlined.graph.nodes if n.op == "call_function"]
    assert reference.apply_plan_reps in targets
    assert torch.ops.tokenreduce.apply_plan.default not in targets
    x = images(2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(inlined(x), gm(x), atol=1e-5, rtol=1e-5)


def test_exported_plan_subgraph_is_verified_and_has_fewer_scatters(reduced, tmp_path):
    red = reduced["tome"]
    args = (red.graph_module, red.example_args, red.example_kwargs)
    new = export_graph(*args, tmp_path / "new.onnx", plan_form="exported")
    old = export_graph(*args, tmp_path / "old.onnx", plan_form="reference")
    assert new.verified and new.max_abs_diff is not None and new.max_abs_diff <= 1e-4
    # reference: 3 scatters over all tokens per merging block (the first block's two sums of ones are one
    # after the exporter's CSE); exported: at most 2 small ones (only the r merged sources)
    assert new.op_counts.get("ScatterElements", 0) <= 2 * 3 < old.op_counts["ScatterElements"]


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(folder / f"{i}.npy", rng.standard_normal((3, 32, 32)).astype(np.float32))
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "img.png")
    return folder


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def test_fp16_keeps_the_plan_in_fp32_and_is_verified(reduced, tmp_path):
    red = reduced["tome"]
    result = export_onnx(red, tmp_path / "fp16.onnx", precision="fp16", unreduced=reduced["none"])
    assert result.verified and result.tolerance is not None and result.tolerance.against == "unreduced"
    assert result.tolerance.measured <= result.tolerance.atol
    model = onnx.load(str(tmp_path / "fp16.onnx"))
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    big = [i for i in model.graph.initializer if np.prod(i.dims) >= 64 * 64]
    assert big and all(i.data_type == onnx.TensorProto.FLOAT16 for i in big)
    prod = _producers(model)
    for node in model.graph.node:
        if node.op_type == "TopK":
            src = prod.get(node.input[0])
            assert not (src is not None and src.op_type == "Cast"
                        and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in src.attribute))


def test_int8_static_with_calibration_folder(reduced, calib_dir, tmp_path):
    red = reduced["tome"]
    result = export_onnx(red, tmp_path / "int8.onnx", precision="int8", calibration=calib_dir,
                         unreduced=reduced["none"])
    assert result.verified and "static" in result.quantization
    model = onnx.load(str(tmp_path / "int8.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # the plan subgraph (ToMe's similarity MatMul, max, ranking) has no (de)quantize node: not quantized
    inside = plan_nodes(model)
    kinds = {n.op_type for n in model.graph.node if n.name in inside}
    assert "MatMul" in kinds and "TopK" in kinds
    assert not kinds & {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger"}


def test_int8_dynamic_for_a_text_encoder(bert, tmp_path):
    ids, mask = bert_batch()
    with torch.no_grad():
        red = tokenreduce.compile(bert, (ids,), {"attention_mask": mask}, inner="eager", method="tome", r=2,
                                  unmerge=True)
        base = tokenreduce.compile(bert, (ids,), {"attention_mask": mask}, inner="eager", method="none",
                                   count_model_flops=False)
    result = export_onnx(red, tmp_path / "bert_int8.onnx", precision="int8", unreduced=base)
    assert result.verified and "dynamic" in result.quantization and result.tolerance.against == "unreduced"
    ops = {n.op_type for n in onnx.load(str(tmp_path / "bert_int8.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops


def test_plan_nodes_cover_the_index_ops_and_only_feed_them(reduced, tmp_path):
    red = reduced["tome"]
    export_graph(red.graph_module, red.example_args, red.example_kwargs, tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    inside = plan_nodes(model)
    index_ops = [n.name for n in model.graph.node if n.op_type in ("TopK", "ArgMax", "CumSum")]
    assert index_ops and set(index_ops) <= inside
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.name)
    for n in model.graph.node:
        if n.name in inside and n.op_type not in ("TopK", "ArgMax", "CumSum"):
            assert all(u in inside for o in n.output for u in consumers.get(o, []))
    assert any(n.op_type == "MatMul" and n.name in inside for n in model.graph.node)  # the similarity matmul


# ------------------------------------------------------------------------------------------------ refusals
def test_refusals(reduced, tmp_path):
    with pytest.raises(TokenReduceError, match="precision must be one of"):
        TargetOptions(precision="int4")
    with pytest.raises(TokenReduceError, match="calibration inputs are for precision='int8'"):
        TargetOptions(precision="fp16", calibration=tmp_path)
    red = reduced["tome"]
    with pytest.raises(TokenReduceError, match="calibration.*or use precision 'fp16'") as info:
        export_onnx(red, tmp_path / "x.onnx", precision="int8")
    assert info.value.setting == "calibration" and not (tmp_path / "x.onnx").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenReduceError, match="holds no images"):
        export_onnx(red, tmp_path / "y.onnx", precision="int8", calibration=empty)
    assert not (tmp_path / "y.onnx").exists()


def test_cli_refuses_precision_for_tensorrt_and_calib_without_int8(tmp_path, capsys):
    from tokenreduce.cli import main

    model = ["timm:vit_tiny_patch16_224", "--model-arg", "img_size=32", "--model-arg", "depth=2",
             "--model-arg", "patch_size=8", "--method", "tome", "--r", "2"]
    code = main(["convert", *model, "--to", "tensorrt", "--precision", "int8", "-o", str(tmp_path / "m.engine")])
    assert code != 0 and "--precision int8 applies to --to onnx" in capsys.readouterr().err
    code = main(["convert", *model, "--calib", str(tmp_path), "-o", str(tmp_path / "m.onnx")])
    assert code != 0 and "--calib DIR is the calibration data of --precision int8" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ threads
def test_onnxruntime_runner_uses_the_threads_asked_for(reduced):
    red = reduced["tome"]
    lowered = get("onnx").lower(red.graph_module, red.example_args, red.example_kwargs, TargetOptions(threads=1))
    assert lowered.threads == 1


def test_bench_reports_threads():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "tokenreduce", "bench", "timm:vit_tiny_patch16_224", "--model-arg", "img_size=32",
         "--model-arg", "depth=2", "--model-arg", "patch_size=8", "--method", "tome", "--r", "2", "--target",
         "onnxruntime", "--batch", "1", "--repeats", "1", "--warmup", "0", "--threads", "1", "--json"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["threads"] == 1 and [row["threads"] for row in doc["rows"]] == [1]


def test_fp32_path_of_the_target_is_unchanged(reduced, tmp_path):
    red = reduced["evit"]
    out = Path(tmp_path / "evit.onnx")
    lowered = get("onnx").lower(red.graph_module, red.example_args, red.example_kwargs, TargetOptions(output=out))
    assert lowered.verification is not None and lowered.verification.precision == "fp32"
    x = images(1, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), red.graph_module(x), atol=1e-4, rtol=1e-4)


def test_sqnr_is_the_ratio_of_signal_to_noise_energy_in_db():
    expected = [np.array([3.0, 4.0]), np.array([[0.0, 0.0]])]  # signal energy 25
    got = [np.array([3.5, 4.0]), np.array([[0.0, -0.5]])]  # noise energy 0.5
    assert quantize.sqnr_db(got, expected) == pytest.approx(10 * np.log10(25 / 0.5))
    assert quantize.sqnr_db(expected, expected) == float("inf")


def test_int8_without_reference_is_judged_by_sqnr_not_by_its_largest_element():
    # one element off by 20% of the largest output (a floor rule would refuse), the rest exact: 30 dB -> passes
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(1000)
    scale = float(np.abs(ref).max())
    spiky = ref.copy()
    spiky[7] += 0.2 * scale
    tol = quantize.tolerance("int8", scale, vs_fp32=0.2 * scale, sqnr_db=quantize.sqnr_db([spiky], [ref]))
    assert tol.against == "fp32" and tol.min_sqnr_db == quantize.MIN_SQNR_DB["int8"] and tol.ok
    assert "SQNR" in tol.describe() and "required >= 15 dB" in tol.describe()
    # an unrelated output of the same scale (a broken conversion) is about 0 dB and refused
    broken = rng.standard_normal(1000)
    bad = quantize.tolerance("int8", scale, vs_fp32=float(np.abs(broken - ref).max()),
                             sqnr_db=quantize.sqnr_db([broken], [ref]))
    assert bad.sqnr_db is not None and bad.sqnr_db < 1.0 and not bad.ok
    # fp16 keeps the floor on the largest element
    fp16 = quantize.tolerance("fp16", scale, vs_fp32=0.02 * scale, sqnr_db=40.0)
    assert fp16.min_sqnr_db is None and not fp16.ok
    with pytest.raises(TokenReduceError, match="SQNR"):
        quantize.tolerance("int8", scale, vs_fp32=0.0)


def test_int8_of_an_unreduced_model_is_verified_by_sqnr(reduced, calib_dir, tmp_path):
    result = export_onnx(reduced["none"], tmp_path / "none_int8.onnx", precision="int8", calibration=calib_dir)
    tol = result.tolerance
    assert result.verified and tol is not None and tol.against == "fp32" and tol.ok
    # the SQNR the rule read is the file's own against the fp32 graph, recomputed here
    red = reduced["none"]
    got = run_onnx(tmp_path / "none_int8.onnx", red.example_args, red.example_kwargs)
    with torch.no_grad():
        expected = red.graph_module(*red.example_args, **red.example_kwargs)
    assert tol.sqnr_db == pytest.approx(quantize.sqnr_db([got[0].numpy()], [expected.numpy()]), rel=1e-6)
