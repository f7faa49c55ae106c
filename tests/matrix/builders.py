"""Tiny, seeded, random-init models of every family the model matrix covers, with example inputs.

Why this file exists: issue 11 asks that tokenreduce be tried on the graphs of today's popular
transformers, as a new user would bring them. Each builder makes the real library class (timm
`create_model` with the architecture's own name, or the `transformers` model class) from a shrunk config
(2-3 blocks, hidden size 64, 16-40 tokens), seeded, in eval mode, so the graph has the family's real
constructs (rotary, relative bias, soft-capping, fused qkv, ...) at a size that captures in about a second.

Every encoder builder returns the model and its inputs at `BATCH_MAX` rows; the matrix traces on the first
`TRACE_BATCH` rows and runs the dynamic-batch check on all of them, so a row's input does not depend on the
batch size. Decoder builders return the model and a prompt (`DecoderPrompt`: ids with one left-padded row,
the droppable span, and extra inputs such as pixel values). Existing tiny builders are reused
(`tests/conftest.py`, `tests/cli/tiny_models.py`); nothing here downloads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TESTS_DIR = Path(__file__).resolve().parents[1]
for _p in (TESTS_DIR, TESTS_DIR / "cli"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import tiny_models  # noqa: E402  (tests/cli/tiny_models.py)
from conftest import _hf_vision_kw, bert_batch, make_timm_vit  # noqa: E402

SEED = 0
BATCH_MAX = 3  # rows of every encoder input; the dynamic-batch check runs on all of them
TRACE_BATCH = 2  # rows the matrix traces with
IMG = 32  # image side; 8x8 patches -> 16 patches
TEXT_LEN = 16
TEXT_LENGTHS = (16, 11, 13)  # valid tokens per text row (row 0 unpadded)
DEC_LEN, DEC_PAD, DEC_SPAN = 24, 3, (4, 20)  # decoder prompt: tokens, left padding of row 1, droppable span
TOKEN_IDS: dict[str, int] = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocabularies


@dataclass
class EncoderCase:
    model: torch.nn.Module
    args: tuple[Any, ...]  # at BATCH_MAX rows
    kwargs: dict[str, Any] = field(default_factory=dict)

    def rows(self, n: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The inputs' first n rows (tensors whose first axis is the batch)."""
        def cut(v: Any) -> Any:
            return v[:n] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == BATCH_MAX else v
        return tuple(cut(a) for a in self.args), {k: cut(v) for k, v in self.kwargs.items()}


@dataclass
class DecoderCase:
    model: torch.nn.Module
    input_ids: torch.Tensor  # [2, N], row 1 left-padded
    attention_mask: torch.Tensor
    span: tuple[int, int] | None  # None: a VLM whose span is its image tokens
    extra: dict[str, Any] = field(default_factory=dict)  # pixel_values, image_grid_thw, ...


def _seeded(fn: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return fn().eval()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(size: int = IMG, channels: int = 3) -> torch.Tensor:
    return torch.randn(BATCH_MAX, channels, size, size, generator=_gen(1))


def _text(vocab: int = 100, lengths: tuple[int, ...] = TEXT_LENGTHS, pad_id: int = 0, first_id: int | None = None
          ) -> dict[str, torch.Tensor]:
    ids, mask = bert_batch(lengths=lengths, seq_len=TEXT_LEN)
    ids = ids % vocab
    ids = ids.masked_fill(mask == 0, pad_id).masked_fill((mask == 1) & (ids == pad_id), 5)
    if first_id is not None:
        ids[:, 0] = first_id
    return {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------------------------------------ timm
def _timm(name: str, img: int = IMG, **kw: Any) -> EncoderCase:
    import timm

    base: dict[str, Any] = dict(pretrained=False, img_size=img, patch_size=8, depth=2, embed_dim=64, num_heads=2,
                                num_classes=5)
    base.update(kw)
    return EncoderCase(_seeded(lambda: timm.create_model(name, **base)), (_images(img),))


def timm_vit() -> EncoderCase:
    return EncoderCase(make_timm_vit(img_size=IMG, depth=2), (_images(),))  # tests/conftest.py's ViT


def timm_pvt_v2() -> EncoderCase:
    import timm

    model = _seeded(lambda: timm.create_model("pvt_v2_b0", pretrained=False, depths=(1, 1, 1, 1),
                                              embed_dims=(16, 32, 48, 64), num_heads=(1, 1, 2, 2), num_classes=5))
    return EncoderCase(model, (_images(64),))


TIMM: dict[str, Callable[[], EncoderCase]] = {
    "timm-vit": timm_vit,
    "timm-deit": lambda: _timm("deit_tiny_distilled_patch16_224"),
    "timm-dinov2": lambda: _timm("vit_small_patch14_dinov2", img=28, patch_size=7),
    "timm-registers": lambda: _timm("vit_small_patch14_reg4_dinov2", img=28, patch_size=7),
    "timm-clip": lambda: _timm("vit_base_patch16_clip_224"),
    "timm-siglip": lambda: _timm("vit_base_patch16_siglip_224"),
    "timm-gap": lambda: _timm("vit_base_patch16_gap_224"),
    "timm-deit3": lambda: _timm("deit3_small_patch16_224"),
    "timm-beit": lambda: _timm("beit_base_patch16_224"),
    "timm-flexivit": lambda: _timm("flexivit_small"),
    "timm-eva02": lambda: _timm("eva02_tiny_patch14_224", img=28, patch_size=7),
    "timm-cait": lambda: _timm("cait_xxs24_224", depth_token_only=1),
    "timm-pvt-v2": timm_pvt_v2,
}


# ------------------------------------------------------------------------------------------------ transformers
def _hf(cls_name: str, cfg_name: str, **cfg_kw: Any) -> torch.nn.Module:
    import transformers

    cfg = getattr(transformers, cfg_name)(**cfg_kw)
    return _seeded(lambda: getattr(transformers, cls_name)(cfg))


def _vision(**kw: Any) -> dict[str, Any]:
    return _hf_vision_kw(num_hidden_layers=2, **kw)  # tests/conftest.py's tiny HF vision config


def _text_cfg(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=128, max_position_embeddings=64)
    base.update(kw)
    return base


def hf_bert() -> EncoderCase:
    model, _ = tiny_models.bert(batch=BATCH_MAX, seq_len=TEXT_LEN)  # tests/cli/tiny_models.py's BERT
    return EncoderCase(model, (), _text())


def hf_vit_mae() -> EncoderCase:
    model = _hf("ViTMAEModel", "ViTMAEConfig", **_vision(mask_ratio=0.5))
    noise = torch.rand(BATCH_MAX, (IMG // 8) ** 2, generator=_gen(3))  # the random masking, made an input
    return EncoderCase(model, (_images(),), {"noise": noise})


def hf_clip_text() -> EncoderCase:
    model = _hf("CLIPTextModel", "CLIPTextConfig", **_text_cfg(**TOKEN_IDS))
    inputs = _text(first_id=1)
    inputs["input_ids"][torch.arange(BATCH_MAX), torch.tensor(TEXT_LENGTHS) - 1] = 2  # EOS pools the text
    return EncoderCase(model, (), inputs)


def hf_wav2vec2() -> EncoderCase:
    model = _hf("Wav2Vec2Model", "Wav2Vec2Config", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    return EncoderCase(model, (torch.randn(BATCH_MAX, 400, generator=_gen(4)),))  # -> 39 frames


def hf_whisper_encoder() -> EncoderCase:
    import transformers

    cfg = transformers.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128,
                                     decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=128,
                                     num_mel_bins=16, max_source_positions=24, vocab_size=100,
                                     decoder_start_token_id=1, **TOKEN_IDS)
    model = _seeded(lambda: transformers.WhisperForAudioClassification(cfg).encoder)
    return EncoderCase(model, (torch.randn(BATCH_MAX, 16, 48, generator=_gen(5)),))  # -> 24 frames


def hf_t5_encoder() -> EncoderCase:
    model = _hf("T5EncoderModel", "T5Config", vocab_size=100, d_model=64, d_kv=32, d_ff=128, num_layers=2,
                num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return EncoderCase(model, (), _text())


HF_ENCODERS: dict[str, Callable[[], EncoderCase]] = {
    "hf-vit": lambda: EncoderCase(_hf("ViTModel", "ViTConfig", **_vision()), (_images(),)),
    "hf-deit": lambda: EncoderCase(_hf("DeiTModel", "DeiTConfig", **_vision()), (_images(),)),
    "hf-dinov2": lambda: EncoderCase(_hf("Dinov2Model", "Dinov2Config", **_vision()), (_images(),)),
    "hf-clip-vision": lambda: EncoderCase(_hf("CLIPVisionModel", "CLIPVisionConfig", **_vision()), (_images(),)),
    "hf-clip-text": hf_clip_text,
    "hf-siglip": lambda: EncoderCase(_hf("SiglipVisionModel", "SiglipVisionConfig", **_vision()), (_images(),)),
    "hf-vit-mae": hf_vit_mae,
    "hf-bert": hf_bert,
    "hf-roberta": lambda: EncoderCase(_hf("RobertaModel", "RobertaConfig", **_text_cfg(pad_token_id=1)), (),
                                      _text(pad_id=1)),
    "hf-distilbert": lambda: EncoderCase(_hf("DistilBertModel", "DistilBertConfig", vocab_size=100, dim=64,
                                             n_layers=2, n_heads=2, hidden_dim=128, max_position_embeddings=64),
                                         (), _text()),
    "hf-xlm-r": lambda: EncoderCase(_hf("XLMRobertaModel", "XLMRobertaConfig", **_text_cfg(pad_token_id=1)), (),
                                    _text(pad_id=1)),
    "hf-electra": lambda: EncoderCase(_hf("ElectraModel", "ElectraConfig", **_text_cfg(embedding_size=32)), (),
                                      _text()),
    "hf-t5-encoder": hf_t5_encoder,
    "hf-wav2vec2": hf_wav2vec2,
    "hf-whisper-encoder": hf_whisper_encoder,
    "hf-modernbert": lambda: EncoderCase(_hf("ModernBertModel", "ModernBertConfig", **_text_cfg(
        num_hidden_layers=3, global_attn_every_n_layers=3, local_attention=8, **TOKEN_IDS, cls_token_id=1,
        sep_token_id=2)), (), _text()),
    "hf-deberta-v2": lambda: EncoderCase(_hf("DebertaV2Model", "DebertaV2Config", **_text_cfg(
        relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=16)), (),
        _text()),
    "hf-mpnet": lambda: EncoderCase(_hf("MPNetModel", "MPNetConfig", **_text_cfg(pad_token_id=1)), (),
                                    _text(pad_id=1)),
    "hf-data2vec-vision": lambda: EncoderCase(_hf("Data2VecVisionModel", "Data2VecVisionConfig", **_vision(
        use_relative_position_bias=True)), (_images(),)),
}

ENCODERS: dict[str, Callable[[], EncoderCase]] = {**TIMM, **HF_ENCODERS}


# ------------------------------------------------------------------------------------------------ decoders
def _no_eos(model: torch.nn.Module) -> torch.nn.Module:
    """Greedy decoding of a random model may hit the EOS id and stop early: every check decodes a fixed count."""
    model.generation_config.eos_token_id = None  # type: ignore[union-attr]
    return model


def _prompt(vocab: int, low: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(low, vocab, (2, DEC_LEN), generator=_gen(6))
    mask = torch.ones(2, DEC_LEN, dtype=torch.long)
    mask[1, :DEC_PAD] = 0
    return ids, mask


LLAMA_LIKE: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  **TOKEN_IDS)


def _causal_lm(cls_name: str, cfg_name: str, base: dict[str, Any] | None = None, attn: str = "sdpa",
               **kw: Any) -> DecoderCase:
    import transformers

    base = dict(LLAMA_LIKE if base is None else base)
    base.update(kw)
    cfg = getattr(transformers, cfg_name)(**base)
    cfg._attn_implementation = attn
    model = _no_eos(_seeded(lambda: getattr(transformers, cls_name)(cfg)))
    ids, mask = _prompt(base["vocab_size"])
    return DecoderCase(model, ids, mask, DEC_SPAN)


def gpt2() -> DecoderCase:
    return _causal_lm("GPT2LMHeadModel", "GPT2Config",
                      dict(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=256, **TOKEN_IDS))


def gpt_neox() -> DecoderCase:
    base = {k: v for k, v in LLAMA_LIKE.items() if k != "num_key_value_heads"}
    return _causal_lm("GPTNeoXForCausalLM", "GPTNeoXConfig", base, rotary_pct=0.25)


def llava() -> DecoderCase:
    import transformers

    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8)
    tc = transformers.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=150, vision_feature_layer=-2,
                                   vision_feature_select_strategy="default")
    cfg._attn_implementation = "sdpa"
    model = _no_eos(_seeded(lambda: transformers.LlavaForConditionalGeneration(cfg)))
    ids, mask = _prompt(140)
    ids[:, 4:20] = 150  # 16 image tokens (4x4 patches, CLS dropped by the "default" strategy)
    return DecoderCase(model, ids, mask, None, {"pixel_values": torch.randn(2, 3, 32, 32, generator=_gen(7))})


def _qwen_vl(prefix: str) -> DecoderCase:
    """Qwen2-VL / Qwen2.5-VL with one 32x32 image per row: 8x8 patches of 4 pixels, merged 2x2 -> 16 image
    tokens, between the vision start and end tokens; positions are mRoPE (3 axes)."""
    import transformers

    text = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision: dict[str, Any] = dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                                  in_channels=3)
    if prefix == "Qwen2VL":
        vision.update(embed_dim=32, hidden_size=64)  # hidden_size: the merger's output (the text width)
    else:
        vision.update(hidden_size=32, out_hidden_size=64, intermediate_size=64, fullatt_block_indexes=[1],
                      window_size=16)
    cfg = getattr(transformers, f"{prefix}Config")(text_config={**text, **TOKEN_IDS}, vision_config=vision,
                                                  image_token_id=150, video_token_id=151, vision_start_token_id=152,
                                                  vision_end_token_id=153)
    cfg._attn_implementation = "sdpa"
    model = _no_eos(_seeded(lambda: getattr(transformers, f"{prefix}ForConditionalGeneration")(cfg)))
    ids, mask = _prompt(140)
    ids[:, 3] = 152
    ids[:, 4:20] = 150
    ids[:, 20] = 153
    grid = torch.tensor([[1, 8, 8]] * 2)  # per image: t, h, w in patches
    patches = torch.randn(2 * 64, 3 * 2 * 4 * 4, generator=_gen(8))  # [images * t*h*w, C * T * P * P]
    types = (ids == 150).int()  # what the processor returns beside input_ids (1 = image token); mRoPE needs it
    return DecoderCase(model, ids, mask, None, {"pixel_values": patches, "image_grid_thw": grid,
                                                "mm_token_type_ids": types})


DECODERS: dict[str, Callable[[], DecoderCase]] = {
    "llama": lambda: _causal_lm("LlamaForCausalLM", "LlamaConfig"),
    "qwen2": lambda: _causal_lm("Qwen2ForCausalLM", "Qwen2Config"),
    "mistral": lambda: _causal_lm("MistralForCausalLM", "MistralConfig", sliding_window=None),
    "llava": llava,
    "qwen3": lambda: _causal_lm("Qwen3ForCausalLM", "Qwen3Config", head_dim=16),
    # transformers runs Gemma 2 only with eager attention (soft-capping is not expressible in SDPA)
    "gemma2": lambda: _causal_lm("Gemma2ForCausalLM", "Gemma2Config", attn="eager", head_dim=16, sliding_window=8,
                                 attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3": lambda: _causal_lm("Gemma3ForCausalLM", "Gemma3TextConfig", head_dim=16, sliding_window=8),
    "phi3": lambda: _causal_lm("Phi3ForCausalLM", "Phi3Config", partial_rotary_factor=0.75, pad_token_id=0),
    "gpt2": gpt2,
    "gpt-neox": gpt_neox,
    "olmo2": lambda: _causal_lm("Olmo2ForCausalLM", "Olmo2Config"),
    "qwen2-vl": lambda: _qwen_vl("Qwen2VL"),
    "qwen2.5-vl": lambda: _qwen_vl("Qwen2_5_VL"),
}

FAMILIES: list[str] = [*ENCODERS, *DECODERS]

# What each builder makes and the construct it brings (the support table's "model" column).
DESCRIPTIONS: dict[str, str] = {
    "timm-vit": "timm ViT (`VisionTransformer`, CLS token)",
    "timm-deit": "timm `deit_tiny_distilled_patch16_224` (CLS + distillation token)",
    "timm-dinov2": "timm `vit_small_patch14_dinov2` (layer scale)",
    "timm-registers": "timm `vit_small_patch14_reg4_dinov2` (4 register tokens)",
    "timm-clip": "timm `vit_base_patch16_clip_224` (norm before the blocks)",
    "timm-siglip": "timm `vit_base_patch16_siglip_224` (no CLS, attention-pool head)",
    "timm-gap": "timm `vit_base_patch16_gap_224` (no CLS, average pool)",
    "timm-deit3": "timm `deit3_small_patch16_224` (layer scale)",
    "timm-beit": "timm `beit_base_patch16_224` (relative position bias)",
    "timm-flexivit": "timm `flexivit_small`",
    "timm-eva02": "timm `eva02_tiny_patch14_224` (rotary q/k, SwiGLU)",
    "timm-cait": "timm `cait_xxs24_224` (talking heads, class attention)",
    "timm-pvt-v2": "timm `pvt_v2_b0` (spatial-reduction attention, 4 stages)",
    "hf-vit": "HF `ViTModel`",
    "hf-deit": "HF `DeiTModel` (CLS + distillation token)",
    "hf-dinov2": "HF `Dinov2Model`",
    "hf-clip-vision": "HF `CLIPVisionModel`",
    "hf-clip-text": "HF `CLIPTextModel` (causal mask, EOS pooling)",
    "hf-siglip": "HF `SiglipVisionModel` (attention-pool head)",
    "hf-vit-mae": "HF `ViTMAEModel` (random masking, noise given as input)",
    "hf-bert": "HF `BertModel`, padded batch",
    "hf-roberta": "HF `RobertaModel`, padded batch",
    "hf-distilbert": "HF `DistilBertModel`, padded batch",
    "hf-xlm-r": "HF `XLMRobertaModel`, padded batch",
    "hf-electra": "HF `ElectraModel`, padded batch",
    "hf-t5-encoder": "HF `T5EncoderModel` (relative position bias)",
    "hf-wav2vec2": "HF `Wav2Vec2Model` (conv feature encoder, conv positions)",
    "hf-whisper-encoder": "HF Whisper encoder",
    "hf-modernbert": "HF `ModernBertModel` (rotary, local/global attention)",
    "hf-deberta-v2": "HF `DebertaV2Model` (disentangled relative attention)",
    "hf-mpnet": "HF `MPNetModel` (relative position bias)",
    "hf-data2vec-vision": "HF `Data2VecVisionModel` (relative position bias)",
    "llama": "HF `LlamaForCausalLM` (GQA)",
    "qwen2": "HF `Qwen2ForCausalLM` (q/k/v bias)",
    "mistral": "HF `MistralForCausalLM`",
    "llava": "HF `LlavaForConditionalGeneration` (CLIP vision + Llama)",
    "qwen3": "HF `Qwen3ForCausalLM` (q/k RMSNorm)",
    "gemma2": "HF `Gemma2ForCausalLM` (soft-capping, sliding window, eager attention)",
    "gemma3": "HF `Gemma3ForCausalLM` (sandwich norms, q/k norm, sliding window)",
    "phi3": "HF `Phi3ForCausalLM` (fused qkv, partial rotary 0.75 as Phi-4-mini)",
    "gpt2": "HF `GPT2LMHeadModel` (Conv1D, learned positions)",
    "gpt-neox": "HF `GPTNeoXForCausalLM` (fused qkv, partial rotary, parallel residual)",
    "olmo2": "HF `Olmo2ForCausalLM` (q/k RMSNorm, post-norms)",
    "qwen2-vl": "HF `Qwen2VLForConditionalGeneration` (image, mRoPE)",
    "qwen2.5-vl": "HF `Qwen2_5_VLForConditionalGeneration` (image, mRoPE)",
}
