"""Decoder families (random init, tiny configs): the analysis finds every block, its layout, the q/k/v
projections, score modifiers, sliding windows and rotary side inputs, checked against each model's own
config (num_hidden_layers, layer_types / sliding_window, partial_rotary_factor, attn_logit_softcapping, ...).

The decoder blocks are analysed with `analyse_block(..., causal_ok=True)` (what a decoder analysis builds on);
the encoder analysis must still skip them as causal.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from tokenreduce.analysis.encoder import analyse, analyse_block, find_attention, is_causal
from tokenreduce.compiler.capture import export_graph
from tokenreduce.ir.graph import ancestors, nodes_between

N = 12  # prompt length (distinct from every head/hidden size below, so a size says which axis it is)
VOCAB = 128


class _Prefill(torch.nn.Module):
    """One prefill call without a cache, as `reduce_decoder` captures it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits


def _config(cfg_cls, attn="sdpa", **kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, head_dim=16, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    base.update(kw)
    base = {k: v for k, v in base.items() if v is not None}  # None: the family has no such setting
    cfg = cfg_cls(**base)
    cfg._attn_implementation = attn
    return cfg


FAMILIES = {
    "llama": lambda: T.LlamaForCausalLM(_config(T.LlamaConfig)),
    "mistral": lambda: T.MistralForCausalLM(_config(T.MistralConfig, sliding_window=5)),
    "qwen2": lambda: T.Qwen2ForCausalLM(_config(T.Qwen2Config, use_sliding_window=True, sliding_window=5,
                                                max_window_layers=2)),
    "qwen3": lambda: T.Qwen3ForCausalLM(_config(T.Qwen3Config)),
    "olmo2": lambda: T.Olmo2ForCausalLM(_config(T.Olmo2Config)),
    "phi3": lambda: T.Phi3ForCausalLM(_config(T.Phi3Config, partial_rotary_factor=0.5, head_dim=None)),
    "gptneox": lambda: T.GPTNeoXForCausalLM(_config(T.GPTNeoXConfig, rotary_pct=0.25, head_dim=None)),
    "gpt2": lambda: T.GPT2LMHeadModel(_config(T.GPT2Config, n_embd=64, n_layer=4, n_head=4, head_dim=None)),
    "gemma2": lambda: T.Gemma2ForCausalLM(_config(T.Gemma2Config, attn="eager", sliding_window=4)),
    "gemma3": lambda: T.Gemma3ForCausalLM(_config(T.Gemma3TextConfig, sliding_window=4, sliding_window_pattern=2)),
}


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, N), generator=g)
    return ids, torch.ones(2, N, dtype=torch.long), torch.arange(N)[None].expand(2, N)


@pytest.fixture(scope="module")
def captured():
    cache: dict[tuple[str, str | None], tuple] = {}

    def get(name, attn=None):
        """`attn`: force transformers' attention implementation ("eager": explicit matmul-softmax-matmul)."""
        if (name, attn) not in cache:
            torch.manual_seed(0)
            model = FAMILIES[name]()
            if attn is not None:
                model.config._attn_implementation = attn
                for sub in model.modules():
                    if hasattr(sub, "config"):
                        sub.config._attn_implementation = attn
            model.eval()
            gm = export_graph(_Prefill(model), _inputs(), {}, dynamic_batch=False).gm
            cache[(name, attn)] = (model, gm)
        return cache[(name, attn)]

    return get


def _blocks(gm):
    return [analyse_block(i, a, causal_ok=True) for i, a in enumerate(find_attention(gm))]


def _weight_name(proj) -> str:
    return str(proj.args[1].target if proj.target is torch.ops.aten.linear.default else proj.args[2].target)


# family -> (layout, q projection weight, k, v; {i} = layer)
FACTS = {
    "llama": ("pre-ln", "model.layers.{i}.self_attn.q_proj.weight", "k_proj", "v_proj"),
    "mistral": ("pre-ln", "model.layers.{i}.self_attn.q_proj.weight", "k_proj", "v_proj"),
    "qwen2": ("pre-ln", "model.layers.{i}.self_attn.q_proj.weight", "k_proj", "v_proj"),
    "qwen3": ("pre-ln", "model.layers.{i}.self_attn.q_proj.weight", "k_proj", "v_proj"),
    "olmo2": ("post-attn-norm", "model.layers.{i}.self_attn.q_proj.weight", "k_proj", "v_proj"),
    "phi3": ("pre-ln", "model.layers.{i}.self_attn.qkv_proj.weight", "qkv_proj", "qkv_proj"),
    "gptneox": ("parallel", "gpt_neox.layers.{i}.attention.query_key_value.weight", "query_key_value",
                "query_key_value"),
    "gpt2": ("pre-ln", "transformer.h.{i}.attn.c_attn.weight", "c_attn", "c_attn"),
    "gemma2": ("sandwich", "model.layers.{i}.self_attn.q_proj.weight", "k_proj", "v_proj"),
    "gemma3": ("sandwich", "model.layers.{i}.self_attn.q_proj.weight", "k_proj", "v_proj"),
}


def _rotary_dim(cfg) -> int | None:
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if isinstance(cfg, T.GPT2Config):
        return None
    rope = getattr(cfg, "rope_parameters", None) or {}
    return int(head * rope.get("partial_rotary_factor", 1.0))


def _expected_window(cfg, i: int) -> int | None:
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return cfg.sliding_window if types[i] == "sliding_attention" else None
    return getattr(cfg, "sliding_window", None)


CASES = [(f, None) for f in FAMILIES] + [(f, "eager") for f in FAMILIES if f != "gemma2"]  # Gemma 2: eager already


@pytest.mark.parametrize("family, attn", CASES)
def test_decoder_blocks_layout_projections_rotary_window(captured, family, attn):
    model, gm = captured(family, attn)
    if attn == "eager":
        assert all(b.attention.kind == "explicit" for b in _blocks(gm))
    cfg = model.config
    blocks = _blocks(gm)
    assert len(blocks) == cfg.num_hidden_layers
    layout, q_w, k_name, v_name = FACTS[family]
    prefix = "model."  # the _Prefill wrapper holds the model as .model
    rot = _rotary_dim(cfg)
    for i, b in enumerate(blocks):
        assert b.skip_reason is None, (family, i, b.skip_reason)
        assert is_causal(b.attention)
        assert b.layout == layout
        assert b.num_tokens == N
        q, k, v = b.projections
        assert _weight_name(q) == prefix + q_w.format(i=i)
        assert _weight_name(k) == prefix + q_w.format(i=i).replace(q_w.split(".")[-2], k_name)
        assert _weight_name(v) == prefix + q_w.format(i=i).replace(q_w.split(".")[-2], v_name)
        # the residual add reads the block input; the block input is [B, N, C]
        assert b.x_in in b.residual_add.args
        assert tuple(b.x_in.meta["val"].shape) == (2, N, cfg.hidden_size)
        assert b.attention.window == _expected_window(cfg, i), (family, i)
        assert b.attention.heads == cfg.num_attention_heads
        rotary = [s for s in b.side_inputs if s.kind == "rotary"]
        if rot is None:
            assert rotary == []
        else:  # cos and sin, [B|1, 1, N, rotary dim], token axis -2, read by both the q and the k paths
            assert len(rotary) == 2
            q_path = nodes_between([q], [b.attention.q])
            k_path = nodes_between([k], [b.attention.k])
            for s in rotary:
                assert s.axes == (-2,) and s.offset == 0
                assert tuple(s.node.meta["val"].shape[-2:]) == (N, rot)
                assert set(s.users) <= b.qkv_path
                assert set(s.users) & q_path and set(s.users) & k_path  # rotary on q and on k
        assert len({s.node for s in b.side_inputs}) == len(b.side_inputs)


def test_gemma2_softcap_and_scale_from_config(captured):
    model, gm = captured("gemma2")
    cfg = model.config
    for b in _blocks(gm):
        att = b.attention
        kinds = [m.kind for m in att.score_mods]
        assert kinds == ["scale", "softcap", "mask"]  # q @ k^T * s -> tanh(x / c) * c -> + mask
        assert att.softcap == pytest.approx(cfg.attn_logit_softcapping)
        assert att.scale == pytest.approx(cfg.query_pre_attn_scalar ** -0.5)
        cap = att.score_mods[1]
        assert [n.target for n in cap.nodes] == [torch.ops.aten.div.Tensor, torch.ops.aten.tanh.default,
                                                 torch.ops.aten.mul.Tensor]


def test_decoders_are_causal_for_the_encoder_analysis(captured):
    for family in ("qwen3", "gemma2", "gpt2"):
        _, gm = captured(family)
        blocks = analyse(gm).blocks
        assert blocks and all(b.skip_reason and b.skip_reason.startswith("causal attention") for b in blocks)


class _Qwen2VLText(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state


def test_qwen2_vl_text_mrope_positions():
    """Qwen2-VL's language model: 3-axis (temporal, height, width) position ids -> multi-axis rotary. The
    cos/sin side inputs are traced back to the [3, B, N] position input."""
    torch.manual_seed(0)
    cfg = T.Qwen2VLTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                              rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    cfg._attn_implementation = "sdpa"
    model = T.Qwen2VLTextModel(cfg).eval()
    ids, mask, _ = _inputs()
    pos = torch.stack([torch.arange(N), torch.arange(N) // 3, torch.arange(N) % 3])[:, None].expand(3, 2, N)
    gm = export_graph(_Qwen2VLText(model), (ids, mask, pos.contiguous()), {}, dynamic_batch=False).gm
    blocks = _blocks(gm)
    assert len(blocks) == cfg.num_hidden_layers
    pos_ph = [p for p in gm.graph.nodes if p.op == "placeholder" and tuple(p.meta["val"].shape) == (3, 2, N)]
    assert len(pos_ph) == 1
    head = cfg.hidden_size // cfg.num_attention_heads
    for b in blocks:
        assert b.skip_reason is None and b.layout == "pre-ln"
        rotary = [s for s in b.side_inputs if s.kind == "rotary"]
        assert len(rotary) == 2
        for s in rotary:
            assert tuple(s.node.meta["val"].shape[-2:]) == (N, head)
            assert pos_ph[0] in ancestors(s.node, 400)


def test_projection_weights_are_not_side_inputs_when_tokens_equal_width():
    """With N == hidden size a [C, C] projection weight has the shape of a per-token table; it is not one."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(_config(T.LlamaConfig, hidden_size=N, intermediate_size=24, num_attention_heads=2,
                                       num_key_value_heads=2, head_dim=None)).eval()
    gm = export_graph(_Prefill(model), _inputs(), {}, dynamic_batch=False).gm
    for b in _blocks(gm):
        assert [s.kind for s in b.side_inputs] == ["rotary", "rotary"]
        assert all(s.node.op == "call_function" for s in b.side_inputs)
