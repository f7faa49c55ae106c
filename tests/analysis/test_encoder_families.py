"""Encoder families (random init, tiny configs): blocks, layout, score modifiers, local windows, side inputs
and protected tokens, checked against each model's own config; and the families that worked before issue 11
still analysed as before (every block reducible, depth from the config).
"""

from __future__ import annotations

import pytest
import timm
import torch
import transformers as T

from tokenreduce.analysis.encoder import analyse
from tokenreduce.compiler.capture import export_graph

aten = torch.ops.aten
N_TXT = 12


def _ids(n=N_TXT, vocab=100):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, vocab, (2, n), generator=g)
    ids[:, 0] = 1
    return ids


def _img(size):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


TXT = dict(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=96,
           max_position_embeddings=64)
VIS = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=96, image_size=32,
           patch_size=8)


def _hf(model_cls, cfg):
    return lambda: model_cls(cfg)


FAMILIES = {
    # new in issue 11
    "modernbert": (lambda: T.ModernBertModel(T.ModernBertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=96,
        local_attention=4, global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2)), lambda: (_ids(),)),
    "deberta-v2": (lambda: T.DebertaV2Model(T.DebertaV2Config(
        **TXT, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8)), lambda: (_ids(),)),
    "mpnet": (lambda: T.MPNetModel(T.MPNetConfig(**TXT)), lambda: (_ids(),)),
    "data2vec-vision": (lambda: T.Data2VecVisionModel(T.Data2VecVisionConfig(
        **VIS, use_relative_position_bias=True)), lambda: (_img(32),)),
    "eva02": (lambda: timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, embed_dim=64,
                                        depth=4, num_heads=2, num_classes=5), lambda: (_img(28),)),
    "cait": (lambda: timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                                       depth=4, num_heads=2, depth_token_only=1, num_classes=5), lambda: (_img(32),)),
    "pvt-v2": (lambda: timm.create_model("pvt_v2_b0", pretrained=False, num_classes=5), lambda: (_img(64),)),
    # worked before issue 11: must keep working
    "timm-deit3": (lambda: timm.create_model("deit3_small_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                             embed_dim=64, depth=4, num_heads=2, num_classes=5), lambda: (_img(32),)),
    "timm-beit": (lambda: timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                            embed_dim=64, depth=4, num_heads=2, num_classes=5), lambda: (_img(32),)),
    "timm-siglip": (lambda: timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=32,
                                              patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=5),
                    lambda: (_img(32),)),
    "hf-roberta": (lambda: T.RobertaModel(T.RobertaConfig(**{**TXT, "max_position_embeddings": 70}),
                                          add_pooling_layer=False), lambda: (_ids(),)),
    "hf-t5-encoder": (lambda: T.T5EncoderModel(T.T5Config(vocab_size=100, d_model=64, d_kv=32, d_ff=96,
                                                          num_layers=4, num_heads=2)), lambda: (_ids(),)),
    "hf-wav2vec2": (lambda: T.Wav2Vec2Model(T.Wav2Vec2Config(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=96, conv_dim=(16, 16),
        conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4)),
        lambda: (torch.randn(2, 400, generator=torch.Generator().manual_seed(3)),)),
    "hf-whisper-encoder": (lambda: T.WhisperModel(T.WhisperConfig(
        d_model=64, encoder_layers=4, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=96, decoder_ffn_dim=96, num_mel_bins=8, max_source_positions=10)).encoder,
        lambda: (torch.randn(2, 8, 20, generator=torch.Generator().manual_seed(3)),)),
}


@pytest.fixture(scope="module")
def analysed():
    cache: dict[str, tuple] = {}

    def get(name):
        if name not in cache:
            build, inputs = FAMILIES[name]
            torch.manual_seed(0)
            model = build().eval()
            gm = export_graph(model, inputs(), {}, dynamic_batch=False).gm
            cache[name] = (model, gm, analyse(gm))
        return cache[name]

    return get


def _depth(model) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None:
        return getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers", None) or cfg.encoder_layers
    return len(model.blocks)


@pytest.mark.parametrize("family", ["timm-deit3", "timm-beit", "timm-siglip", "hf-roberta", "hf-t5-encoder",
                                    "hf-wav2vec2", "hf-whisper-encoder"])
def test_families_that_worked_keep_working(analysed, family):
    model, _, an = analysed(family)
    pool = getattr(model, "attn_pool", None) is not None  # timm SigLIP's MAP head: one latent query
    assert len(an.blocks) == _depth(model) + pool
    assert all(b.reducible for b in an.blocks[:_depth(model)]), [b.skip_reason for b in an.blocks]
    assert len({b.num_tokens for b in an.blocks[:_depth(model)]}) == 1
    if pool:
        assert an.blocks[-1].skip_reason.startswith("class attention / attention pooling (1 query")


def test_modernbert_rotary_local_global_and_first_layer_without_norm(analysed):
    model, _, an = analysed("modernbert")
    cfg = model.config
    head = cfg.hidden_size // cfg.num_attention_heads
    assert len(an.blocks) == cfg.num_hidden_layers
    assert an.text_model and an.num_protected == 1
    for i, b in enumerate(an.blocks):
        assert b.reducible, b.skip_reason
        assert b.layout == ("no-pre-norm" if i == 0 else "pre-ln")  # layer 0's attn_norm is an Identity
        is_global = i % cfg.global_attn_every_n_layers == 0
        assert b.attention.window == (None if is_global else cfg.local_attention // 2 + 1)
        rotary = [s for s in b.side_inputs if s.kind == "rotary"]
        assert len(rotary) == 2  # cos, sin
        for s in rotary:
            assert s.axes == (-2,) and s.offset == 0
            assert tuple(s.node.meta["val"].shape[-2:]) == (N_TXT, head)


def test_eva02_rotary_on_patch_tokens_and_cls_protected(analysed):
    model, _, an = analysed("eva02")
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    assert len(an.blocks) == len(model.blocks)
    assert an.num_protected == model.num_prefix_tokens == 1  # EViT must see the CLS token
    for b in an.blocks:
        assert b.reducible and b.layout == "pre-ln" and b.num_tokens == n
        rotary = [s for s in b.side_inputs if s.kind == "rotary"]
        # sin and cos for q and for k; rows are the patch tokens, after the prefix tokens
        assert len(rotary) == 4
        for s in rotary:
            assert s.offset == model.num_prefix_tokens
            assert s.node.meta["val"].shape[-2] == model.patch_embed.num_patches


def test_deberta_v2_bmm_attention_c2p_p2c_and_masked_fill(analysed):
    model, _, an = analysed("deberta-v2")
    cfg = model.config
    assert len(an.blocks) == cfg.num_hidden_layers
    head = cfg.hidden_size // cfg.num_attention_heads
    scale_factor = 1 + len(cfg.pos_att_type)  # DeBERTa scales by sqrt(d * (1 + #relative terms))
    for b in an.blocks:
        att = b.attention
        assert b.reducible and b.layout == "post-ln" and b.num_tokens == N_TXT
        assert att.kind == "explicit" and "bmm" in att.spelling
        assert tuple(att.q.meta["val"].shape) == (2 * cfg.num_attention_heads, N_TXT, head)
        assert att.heads == cfg.num_attention_heads
        assert [m.kind for m in att.score_mods] == ["scale", "bias", "masked_fill"]
        assert att.scale == pytest.approx((head * scale_factor) ** -0.5)
        assert att.mask is None  # the c2p + p2c sum is computed from q/k, not a mask to gather
        rel = [s for s in b.side_inputs if s.kind == "relative-bias"]
        assert len(rel) == len(cfg.pos_att_type)  # the c2p and the p2c position index matrices
        for s in rel:
            assert s.axes == (-2, -1) and not s.node.meta["val"].is_floating_point()
            assert all(u.target is aten.gather.default for u in s.users)


def test_mpnet_in_place_relative_bias(analysed):
    model, _, an = analysed("mpnet")
    cfg = model.config
    assert len(an.blocks) == cfg.num_hidden_layers
    for b in an.blocks:
        att = b.attention
        assert b.reducible and b.layout == "post-ln"
        assert [m.kind for m in att.score_mods] == ["scale", "bias", "mask"]
        bias = att.score_mods[1]
        assert bias.nodes[0].target is aten.add_.Tensor  # `scores += position_bias`
        rel = [s for s in b.side_inputs if s.kind == "relative-bias"]
        assert [s.node for s in rel] == [bias.operand]
        assert tuple(bias.operand.meta["val"].shape) == (2, cfg.num_attention_heads, N_TXT, N_TXT)
        assert att.mask is not None and att.mask is not bias.operand


@pytest.mark.parametrize("grad", [False, True])
def test_data2vec_relative_position_bias_in_any_grad_mode(grad):
    build, inputs = FAMILIES["data2vec-vision"]
    torch.manual_seed(0)
    model = build().eval()
    with torch.set_grad_enabled(grad):
        an = analyse(export_graph(model, inputs(), {}, dynamic_batch=False).gm)
    cfg = model.config
    n = (cfg.image_size // cfg.patch_size) ** 2 + 1
    assert len(an.blocks) == cfg.num_hidden_layers and an.num_protected == 1
    for b in an.blocks:
        assert b.reducible and b.layout == "pre-ln" and b.num_tokens == n
        mods = b.attention.score_mods
        assert [m.kind for m in mods] == ["scale", "bias"]  # the learned table, passed as SDPA's attn_mask
        assert b.attention.mask is mods[1].operand
        assert tuple(b.attention.mask.meta["val"].shape[-2:]) == (n, n)


def test_cait_talking_heads_and_class_attention(analysed):
    model, _, an = analysed("cait")
    depth, token_only = len(model.blocks), len(model.blocks_token_only)
    assert len(an.blocks) == depth + token_only
    heads = model.blocks[0].attn.num_heads
    for b in an.blocks[:depth]:
        assert b.reducible and b.layout == "pre-ln"
        th = [m for m in b.attention.score_mods if m.kind == "talking-heads"]
        assert [m.after_softmax for m in th] == [False, True]  # proj_l before softmax, proj_w after
        assert all(tuple(m.operand.meta["val"].shape) == (heads, heads) for m in th)
    for b in an.blocks[depth:]:
        assert b.skip_reason.startswith("class attention / attention pooling (1 query")


def test_pvt_v2_spatial_reduction_refused_by_name(analysed):
    model, _, an = analysed("pvt-v2")
    stages = model.stages
    assert len(an.blocks) == sum(len(s.blocks) for s in stages)
    i = 0
    for stage in stages:
        for blk in stage.blocks:
            b = an.blocks[i]
            i += 1
            if blk.attn.sr is not None:  # keys/values from a strided conv of the token grid
                assert b.skip_reason.startswith("spatial-reduction attention"), b.skip_reason
            else:
                assert b.reducible, b.skip_reason
