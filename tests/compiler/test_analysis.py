"""Graph analysis: blocks, layout, token counts, protected tokens and attention spellings, checked against
what each model's own config says; and the refusal for a model without attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BERT_LEN, images

from tokenreduce import TokenReduceError
from tokenreduce.analysis.encoder import analyse
from tokenreduce.compiler.capture import export_graph

aten = torch.ops.aten


def _analyse(model, args, kwargs=None):
    return analyse(export_graph(model, args, kwargs or {}, dynamic_batch=False).gm)


def _check_blocks(an, depth, tokens, layout, kind="sdpa"):
    assert len(an.blocks) == depth
    assert [b.index for b in an.blocks] == list(range(depth))
    for b in an.blocks:
        assert b.skip_reason is None, b.skip_reason
        assert b.layout == layout
        assert b.num_tokens == tokens
        assert b.attention.kind == kind


def test_timm_vit_cls(timm_vit):
    an = _analyse(timm_vit, (images(2),))
    _check_blocks(an, 4, 16 + 1, "pre-ln")
    assert an.num_protected == timm_vit.num_prefix_tokens == 1
    assert not an.text_model
    assert [b.name for b in an.blocks] == [f"blocks.{i}" for i in range(4)]
    for b in an.blocks:  # pre-LN: reduce h = x + attn(norm1(x))
        assert b.reduce_at is b.residual_add and b.reduce_at.target is aten.add.Tensor


def test_timm_distilled_protects_cls_and_dist(timm_deit_distilled):
    an = _analyse(timm_deit_distilled, (images(2, 64),))
    _check_blocks(an, 4, 64 + 2, "pre-ln")
    assert an.num_protected == timm_deit_distilled.num_prefix_tokens == 2


def test_timm_without_cls_protects_nothing(timm_vit_nocls):
    an = _analyse(timm_vit_nocls, (images(2, 64),))
    _check_blocks(an, 4, 64, "pre-ln")
    assert an.num_protected == 0


def test_timm_explicit_attention_found(timm_vit_explicit):
    an = _analyse(timm_vit_explicit, (images(2, 64),))
    _check_blocks(an, 4, 65, "pre-ln", kind="explicit")
    assert an.num_protected == 1
    for b in an.blocks:
        assert b.attention.scale == pytest.approx(32 ** -0.5)
        assert b.attention.node.target in (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)


def test_hf_vit(hf_vit):
    an = _analyse(hf_vit, (images(2),))
    _check_blocks(an, 4, 17, "pre-ln")
    assert an.num_protected == 1


def test_hf_vit_eager_attention_found(hf_vit_eager):
    """transformers' eager attention: matmul -> softmax(dtype=float32) -> .to(dtype) -> dropout -> matmul."""
    an = _analyse(hf_vit_eager, (images(2),))
    _check_blocks(an, 4, 17, "pre-ln", kind="explicit")
    assert an.num_protected == 1


def test_dinov2(dinov2):
    an = _analyse(dinov2, (images(2),))
    _check_blocks(an, 4, 17, "pre-ln")
    assert an.num_protected == 1


def test_dinov2_with_registers(dinov2_registers):
    regs = dinov2_registers.config.num_register_tokens
    an = _analyse(dinov2_registers, (images(2),))
    _check_blocks(an, 4, 16 + 1 + regs, "pre-ln")
    assert an.num_protected == 1 + regs == 5


def test_clip_vision(clip_vision):
    an = _analyse(clip_vision, (images(2),))
    _check_blocks(an, 4, 17, "pre-ln")
    assert an.num_protected == 1


def test_bert_post_ln_text(bert, bert_inputs):
    ids, am = bert_inputs
    an = _analyse(bert, (ids,), {"attention_mask": am})
    _check_blocks(an, 4, BERT_LEN, "post-ln")
    assert an.text_model and an.num_protected == 1
    for b in an.blocks:  # post-LN: reduce h = norm1(x + attn(x))
        assert b.reduce_at.target is aten.layer_norm.default
        assert b.reduce_at.args[0] is b.residual_add
        assert b.attention.mask is not None  # the padding mask reaches attention


def test_user_protected_tokens_override(timm_vit):
    an = analyse(export_graph(timm_vit, (images(2),), {}, dynamic_batch=False).gm, protected_tokens=3)
    assert an.num_protected == 3


class _CausalBlock(torch.nn.Module):
    """A pre-LN block with causal attention (decoder): found, but must be skipped with a reason."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(o.transpose(1, 2).reshape(b, n, c))


def test_causal_block_is_skipped_with_reason():
    torch.manual_seed(0)
    an = _analyse(_CausalBlock().eval(), (torch.randn(2, 6, 16),))
    assert len(an.blocks) == 1
    assert an.blocks[0].skip_reason is not None and "causal" in an.blocks[0].skip_reason


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_model_without_attention_is_refused(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        model, x = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)), torch.randn(2, 8)
    else:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten(), torch.nn.Linear(8, 3))
        x = torch.randn(2, 3, 16, 16)
    import tokenreduce

    with pytest.raises(TokenReduceError) as info:
        tokenreduce.compile(model.eval(), (x,), method="tome", r=2, inner="eager")
    msg = str(info.value)
    assert "attention" in msg
    assert "scaled_dot_product_attention" in msg and "softmax" in msg  # names what it looked for
