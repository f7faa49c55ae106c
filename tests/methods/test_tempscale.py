"""TempScale (`method="tempscale"`) against hand-written attention with the temperature, as the official code has it.

The reference follows Zhou et al., "Length-Induced Embedding Collapse in PLM-based Models" (ACL 2025) and its
official `BertAttention` (Yuqi-Zhou/Length_Collapse `src/model.py`): `softmax((Q K^T / sqrt(d) + mask) / tau)` in
every self-attention layer, the additive padding mask divided with the logits. It is written here from the
models' weights (a BERT encoder layer by layer, a timm ViT block by block) and never imports the method.

Checked: a padded BERT batch, with SDPA and with eager (explicit softmax) attention, equals the reference for all
layers and for chosen layers only; a timm ViT with fused and with explicit attention; tokens and FLOPs unchanged
in the report; temperature 1 is the unmodified model; refusals (temperature range and type, layers, unmerge);
ONNX export verified in onnxruntime, and onnxruntime's output equals the reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, bert_batch, images, make_timm_vit, output_tensor
from torch import Tensor

import tokenreduce
from tokenreduce import TokenReduceError
from tokenreduce.targets.onnx import export_onnx


# ------------------------------------------------------------------------------------------------ references
@torch.no_grad()
def ref_bert(model: torch.nn.Module, ids: Tensor, mask: Tensor, taus: list[float]) -> Tensor:
    """HF BertModel's last hidden state by hand, layer l's softmax input divided by `taus[l]`."""
    emb = model.embeddings
    pos = torch.arange(ids.shape[1])[None]
    h = emb.word_embeddings(ids) + emb.position_embeddings(pos) + emb.token_type_embeddings(torch.zeros_like(ids))
    h = emb.LayerNorm(h)
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for layer, tau in zip(model.encoder.layer, taus):
        sa = layer.attention.self
        bsz, n, c = h.shape
        heads = model.config.num_attention_heads
        d = c // heads
        q, k, v = (proj(h).view(bsz, n, heads, d).transpose(1, 2) for proj in (sa.query, sa.key, sa.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + additive
        probs = torch.clamp(scores / tau, min=torch.finfo(torch.float32).min).softmax(dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(bsz, n, c)
        a = layer.attention.output
        h = a.LayerNorm(a.dense(ctx) + h)
        inter = F.gelu(layer.intermediate.dense(h))
        h = layer.output.LayerNorm(layer.output.dense(inter) + h)
    return h


@torch.no_grad()
def ref_vit(model: torch.nn.Module, x: Tensor, tau: float) -> Tensor:
    """timm VisionTransformer (CLS pooling) by hand with `softmax(q k^T * scale / tau)`."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for blk in model.blocks:
        att = blk.attn
        bsz, n, c = x.shape
        qkv = att.qkv(blk.norm1(x)).reshape(bsz, n, 3, att.num_heads, c // att.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = att.q_norm(q), att.k_norm(k)
        probs = ((q @ k.transpose(-2, -1)) * att.scale / tau).softmax(dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(bsz, n, c)
        x = x + blk.ls1(att.proj(att.norm(out)))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.head(model.fc_norm(model.norm(x)[:, 0]))


def make_bert(attn: str) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64, hidden_act="gelu",
                     initializer_range=0.3)  # larger weights than the 0.02 default: peaked attention
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return BertModel(cfg, add_pooling_layer=False).eval()


def compile_ts(model, args, kwargs=None, **settings):
    return tokenreduce.compile(model, args, kwargs or {}, method="tempscale", inner="eager", **settings)


# ------------------------------------------------------------------------------------------------ BERT
@pytest.fixture(scope="module", params=["sdpa", "eager"])
def bert_attn(request):
    return request.param, make_bert(request.param)


@pytest.mark.parametrize("settings, taus", [(dict(temperature=0.7), [0.7] * 4),
                                            (dict(temperature=1.6, layers=[1, 3]), [1.0, 1.6, 1.0, 1.6])])
def test_bert_matches_reference(bert_attn, settings, taus):
    attn, model = bert_attn
    ids, mask = bert_batch()
    red = compile_ts(model, (ids,), {"attention_mask": mask}, count_model_flops=False, **settings)
    with torch.no_grad():
        got = output_tensor(red(ids, attention_mask=mask))
        plain = output_tensor(model(ids, attention_mask=mask))
    want = ref_bert(model, ids, mask, taus)
    assert float((got - want).abs().max()) <= TOL, attn
    assert float((plain - want).abs().max()) > 1e-2  # the temperature changes the output: the test can fail
    rows = red.report.blocks
    assert [b.tokens_in for b in rows] == [b.tokens_out for b in rows] == [16] * 4
    scaled = [i for i, t in enumerate(taus) if t != 1.0]
    assert [i for i, b in enumerate(rows) if b.action.startswith("tempscale")] == scaled


def test_report_and_flops_unchanged():
    model = make_bert("sdpa")
    ids, mask = bert_batch()
    red = compile_ts(model, (ids,), {"attention_mask": mask}, temperature=0.8)
    assert red.report.blocks[0].action == "tempscale tau=0.8"
    assert red.report.flops_ratio is not None and abs(red.report.flops_ratio - 1.0) < 1e-3
    assert any("tempscale" in n for n in red.report.notes)


# ------------------------------------------------------------------------------------------------ ViT
@pytest.mark.parametrize("fused", [True, False])
def test_vit_matches_reference(fused):
    model = make_timm_vit(fused_attn=fused)
    red = compile_ts(model, (images(2),), temperature=0.6, count_model_flops=False)
    x = images(3, seed=5)
    with torch.no_grad():
        got, plain = red(x), model(x)
    assert float((got - ref_vit(model, x, 0.6)).abs().max()) <= TOL
    assert float((plain - ref_vit(model, x, 0.6)).abs().max()) > 1e-3


def test_temperature_one_is_the_unmodified_model():
    model = make_timm_vit()
    x = images(2)
    red = compile_ts(model, (x,), temperature=1.0, count_model_flops=False)
    with torch.no_grad():
        assert torch.equal(red(x), model(x))
    assert all(b.action == "-" for b in red.report.blocks)
    from tokenreduce.methods import registry

    assert "changes nothing" in (registry.get("tempscale").identity_reason({"temperature": 1.0}) or "")


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("value, match", [(0.0, r"in \(0, 10\]"), (-0.5, r"in \(0, 10\]"), (10.5, r"in \(0, 10\]"),
                                          (float("nan"), "finite"), ("0.8", "finite"), (True, "finite")])
def test_temperature_is_checked(value, match):
    from tokenreduce.methods.settings import Settings

    with pytest.raises(TokenReduceError, match=match) as info:
        Settings.from_options({"method": "tempscale", "temperature": value})
    assert info.value.setting == "temperature"


def test_layers_and_unmerge_are_refused():
    model = make_timm_vit()
    with pytest.raises(TokenReduceError, match=r"valid layers 0\.\.3"):
        compile_ts(model, (images(2),), temperature=0.8, layers=[4], count_model_flops=False)
    with pytest.raises(TokenReduceError, match="nothing to undo") as info:
        compile_ts(model, (images(2),), temperature=0.8, unmerge=True, count_model_flops=False)
    assert info.value.setting == "unmerge"


# ------------------------------------------------------------------------------------------------ ONNX
def test_onnx_export_verifies_and_matches_reference(tmp_path):
    import onnxruntime as ort

    model = make_bert("sdpa")
    ids, mask = bert_batch()
    red = compile_ts(model, (ids,), {"attention_mask": mask}, temperature=0.7, count_model_flops=False)
    res = export_onnx(red, tmp_path / "tempscale.onnx")
    assert res.problems == [] and res.verified and res.max_abs_diff is not None and res.max_abs_diff <= TOL
    sess = ort.InferenceSession(str(tmp_path / "tempscale.onnx"), providers=["CPUExecutionProvider"])
    feeds = dict(zip(res.input_names, (ids.numpy(), mask.numpy())))
    got = sess.run(None, feeds)[0]
    want = ref_bert(model, ids, mask, [0.7] * 4)
    assert float(np.abs(got - want.numpy()).max()) <= TOL
