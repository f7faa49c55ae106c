"""Tiny random-init decoder LLMs of the families `reduce_decoder` supports (2-4 layers, hidden 32-64), for
the decoder tests. Each builder returns an eval-mode `*ForCausalLM` with its default attention
implementation (Gemma 2: eager, because SDPA cannot soft-cap; the others: SDPA)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as T

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _qwen3() -> torch.nn.Module:
    return T.Qwen3ForCausalLM(T.Qwen3Config(num_key_value_heads=2, head_dim=16, **_COMMON))


def _gemma2() -> torch.nn.Module:
    # soft-capped logits (small caps so the tanh matters), alternating sliding (window 6) / global layers
    cfg = T.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
                         attn_logit_softcapping=2.0, final_logit_softcapping=5.0, **_COMMON)
    return T.Gemma2ForCausalLM(cfg)


def _gemma3() -> torch.nn.Module:
    cfg = T.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
                             layer_types=["sliding_attention", "full_attention"] * 2, **_COMMON)
    return T.Gemma3ForCausalLM(cfg)


def _phi3() -> torch.nn.Module:
    cfg = T.Phi3Config(num_key_value_heads=2, partial_rotary_factor=0.5, **_COMMON)
    return T.Phi3ForCausalLM(cfg)


def _olmo2() -> torch.nn.Module:
    return T.Olmo2ForCausalLM(T.Olmo2Config(num_key_value_heads=2, **_COMMON))


def _gpt_neox() -> torch.nn.Module:
    cfg = T.GPTNeoXConfig(rotary_pct=0.25, **_COMMON)
    return T.GPTNeoXForCausalLM(cfg)


def _gpt2() -> torch.nn.Module:
    cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=256, bos_token_id=1,
                       eos_token_id=2)
    return T.GPT2LMHeadModel(cfg)


def _gemma() -> torch.nn.Module:
    return T.GemmaForCausalLM(T.GemmaConfig(num_key_value_heads=2, head_dim=16, **_COMMON))


def _phi() -> torch.nn.Module:  # Phi-2 (partial rotary 0.5, parallel attention + MLP)
    return T.PhiForCausalLM(T.PhiConfig(**_COMMON))


def _opt() -> torch.nn.Module:  # learned positions; its MLP runs on [B*N, C] (reshape(-1, C) ... view back)
    return T.OPTForCausalLM(T.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                        ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=256,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _mistral() -> torch.nn.Module:  # sliding window on every layer (6 of 24 prompt tokens)
    return T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, sliding_window=6, **_COMMON))


def _llama() -> torch.nn.Module:
    return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **_COMMON))


IMAGE, VIDEO, VISION_START, VISION_END = 120, 121, 122, 123  # token ids of the tiny VLMs
_VL_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
_VL_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)


def _qwen2_vl() -> torch.nn.Module:
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    return T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(vision_config=vision, text_config=_VL_TEXT, **_VL_IDS))


def _qwen2_5_vl() -> torch.nn.Module:
    vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, fullatt_block_indexes=[1],
                  window_size=56)
    return T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(vision_config=vision, text_config=_VL_TEXT,
                                                                   **_VL_IDS))


BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl,
    "llama": _llama, "qwen3": _qwen3, "gemma2": _gemma2, "gemma3": _gemma3, "phi3": _phi3, "olmo2": _olmo2,
    "gpt_neox": _gpt_neox, "gpt2": _gpt2, "mistral": _mistral, "gemma": _gemma,
    "phi": _phi, "opt": _opt,
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[name]().eval()
