"""ONNX export of the reduced VLM prefill (the whole captured graph: vision tower, projector, placeholder
scatter, the pruned language model), verified in onnxruntime against the eager pruned graph by
`ReducedDecoder.export_onnx` itself (which refuses past `atol`), for every visual-token method on tiny LLaVA,
GlobalCom2 and FastV on tiny LLaVA-NeXT (AnyRes), and VisionZip on tiny Qwen2-VL (whose graph starts at the
language model's embeddings, with the vision tower's scores as an input). The eager pruned graph is checked
against the independent references in the method tests; here the file is checked against it.

The placeholder check transformers makes (image token count x width == image feature count) survives export
as NaN outputs (`passes/export_static.py`): a prompt with one image token too few gives NaN logits from the
file where the model raises."""

from __future__ import annotations

import pytest
import torch
from decoder_reference import IMG_ID, llava_prompt, qwen_case, tiny_llava
from decoders.test_llava_next import next_prompt, tiny_llava_next

import tokenreduce
from tokenreduce.targets.onnx import run_onnx

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

LLAVA_METHODS = ["fastv", "pyramiddrop", "divprune", "dart", "visionzip", "hiprune", "flowcut", "sparsevlm",
                 "visiondrop"]


@pytest.fixture(scope="module")
def llava4():  # type: ignore[no-untyped-def]
    """A 4-layer CLIP tower: HiPrune and FlowCut read several vision layers."""
    return tiny_llava(vision_layers=4)


@pytest.mark.parametrize("method", LLAVA_METHODS)
def test_llava_prefill_exports_and_verifies(llava4, method, tmp_path):
    ids, _, px = llava_prompt()
    dec = tokenreduce.reduce_decoder(llava4, method, keep_ratio=0.5)
    written = dec.export_onnx(tmp_path / f"{method}.onnx", ids[:1], pixel_values=px[:1])
    assert written.verified and written.max_abs_diff < 1e-4
    assert written.path.exists() and "NonZero" not in written.op_counts
    assert dec.report.tokens_per_block[-1] < ids.shape[1]  # the exported graph is the pruned one


def test_llava_batch_of_two_and_a_wrong_placeholder_count(llava4, tmp_path):
    """Two unpadded rows export and verify; one image token replaced by text makes every float output NaN
    (the count check), where the eager model raises."""
    ids, _, px = llava_prompt()
    ids = ids.clone()
    ids[1, :2] = ids[0, :2]  # unpadded
    dec = tokenreduce.reduce_decoder(llava4, "divprune", keep_ratio=0.25)
    written = dec.export_onnx(tmp_path / "b2.onnx", ids, pixel_values=px[:2])
    assert written.verified and written.max_abs_diff < 1e-4
    _, flat = dec.compiled_for(ids, None, None, pixel_values=px[:2])
    good = run_onnx(written.path, tuple(flat), {})
    assert all(torch.isfinite(t).all() for t in good if t.dtype.is_floating_point)
    bad = list(flat)
    bad[0] = bad[0].clone()
    bad[0][0, int((bad[0][0] == IMG_ID).nonzero()[0, 0])] = 5
    out = run_onnx(written.path, tuple(bad), {})
    floats = [t for t in out if t.dtype.is_floating_point]
    assert floats and all(t.isnan().all() for t in floats)
    with pytest.raises(Exception, match="(?i)image"):
        llava4(input_ids=bad[0], pixel_values=px[:2])


@pytest.mark.parametrize("method", ["globalcom2", "fastv"])
def test_llava_next_prefill_exports_and_verifies(method, tmp_path):
    """AnyRes: thumbnail + 1 x 2 crops + newline tokens, the graph specialised on `image_sizes`; batch 2 with two
    different image sizes of the same token count."""
    model = tiny_llava_next()
    ids, mask, media = next_prompt()
    ids = ids.clone()
    ids[1, :2] = ids[0, :2]
    dec = tokenreduce.reduce_decoder(model, method, keep_ratio=0.3)
    written = dec.export_onnx(tmp_path / f"next_{method}.onnx", ids, **media)
    assert written.verified and written.max_abs_diff < 1e-4
    assert dec.report.tokens_per_block[-1] < ids.shape[1]


def test_qwen2_vl_visionzip_prefill_exports_and_verifies(tmp_path):
    """Qwen2-VL: the vision tower runs eagerly (grid values decide its token count); the graph from the
    embeddings, with VisionZip's vision-tower scores as an input, exports and verifies."""
    case = qwen_case()
    media = {"pixel_values": case.media["pixel_values"][:64], "image_grid_thw": case.media["image_grid_thw"][:1],
             "pixel_values_videos": case.media["pixel_values_videos"][:32],
             "video_grid_thw": case.media["video_grid_thw"][:1]}
    dec = tokenreduce.reduce_decoder(case.model, "visionzip", keep_ratio=0.5)
    written = dec.export_onnx(tmp_path / "qwen_visionzip.onnx", case.ids[:1], **media)
    assert written.verified and written.max_abs_diff < 1e-4
    assert written.input_names[0] == "inputs_embeds" and "vision_scores" in written.input_names
