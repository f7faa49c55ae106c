"""Side inputs and sliding windows under encoder reductions (docs/methods.md, "Side inputs under reduction").

- ModernBERT (rotary tables `[1, 1, N, d]` per layer, text, padding mask) with global attention only: ToMe
  at every block compiles, is the model at r=0, and its rotary tables are gathered (every block after the
  first merge reads a gathered table, none reads the captured one).
- ModernBERT alternating local/global attention: ToMe may only reduce from the last windowed block on (the
  earlier blocks carry the precise reason); EViT without fusing prunes anywhere.
- EVA-02 with the CLS token unprotected: its rotary table leaves the CLS token out, so it cannot follow a
  sequence whose first token may merge; refused by name.
"""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from tokenreduce.errors import TokenReduceError

GATHER = "gather_side_input"


def tiny_modernbert(every: int) -> torch.nn.Module:
    from transformers import ModernBertConfig, ModernBertModel

    torch.manual_seed(0)
    cfg = ModernBertConfig(vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                           sep_token_id=2, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=2, global_attn_every_n_layers=every, local_attention=4,
                           attn_implementation="sdpa")
    return ModernBertModel(cfg).eval()


def _inputs(batch: int = 2, n: int = 12):
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (batch, n))
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[0, -3:] = 0
    return ids, mask


def _compile(model, ids, mask, **settings):
    return tokenreduce.compile(model, (ids,), {"attention_mask": mask}, inner="eager", count_model_flops=False,
                               **settings)


def test_modernbert_global_tome_gathers_rotary_tables():
    model = tiny_modernbert(every=1)
    ids, mask = _inputs()
    zero = _compile(model, ids, mask, method="tome", r=0)
    torch.testing.assert_close(zero(ids, attention_mask=mask).last_hidden_state,
                               model(ids, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=1e-5)
    red = _compile(model, ids, mask, method="tome", r=2)
    assert red.report.tokens_per_block == [12, 10, 8, 6]
    gm = red.graph_module
    gathers = [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") == GATHER]
    assert len(gathers) >= 3  # blocks 1..3 read gathered cos and sin tables
    sdpa = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    for att in sdpa[1:]:  # the q/k of every block after the first merge have the reduced token count
        assert att.args[0].meta["val"].shape[-2] < 12
    out = red(ids, attention_mask=mask).last_hidden_state
    assert out.shape == (2, 4, 32) and torch.isfinite(out).all()
    ids3, mask3 = _inputs(batch=3)
    assert red(ids3, attention_mask=mask3).last_hidden_state.shape == (3, 4, 32)


def test_modernbert_windows_limit_merging_to_the_last_windowed_block():
    model = tiny_modernbert(every=2)  # layers 0, 2 global; 1, 3 local
    ids, mask = _inputs()
    red = _compile(model, ids, mask, method="tome", r=2)
    blocks = red.report.blocks
    for b in blocks[:3]:
        assert b.tokens_out == b.tokens_in
        assert "a later block (3, layers.3) uses sliding-window attention (window" in b.reason
        assert "reduce from block 3 on, or prune without fusing" in b.reason
    assert (blocks[3].tokens_in, blocks[3].tokens_out) == (12, 10)
    assert torch.isfinite(red(ids, attention_mask=mask).last_hidden_state).all()


def test_modernbert_windows_allow_pruning_without_fusing():
    model = tiny_modernbert(every=2)
    ids, mask = _inputs()
    red = _compile(model, ids, mask, method="evit", keep_ratio=0.5, layers=[0], fuse=False)
    # 11 candidates after the protected first token: keep ceil(5.5) = 6
    assert red.report.tokens_per_block == [12, 7, 7, 7]
    out = red(ids, attention_mask=mask).last_hidden_state
    assert out.shape == (2, 7, 32) and torch.isfinite(out).all()
    fused = _compile(model, ids, mask, method="evit", keep_ratio=0.5, layers=[0], fuse=True)
    assert "sliding-window attention" in fused.report.blocks[0].reason
    assert fused.report.tokens_per_block == [12, 12, 12, 12]


def test_a_table_that_leaves_out_an_unprotected_prefix_is_refused():
    import timm

    torch.manual_seed(0)
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, patch_size=7, embed_dim=32,
                            depth=2, num_heads=2, num_classes=0).eval()
    x = torch.randn(2, 3, 28, 28)
    with pytest.raises(TokenReduceError, match=r"rotary side input .* has 16 positions .* 17 tokens with 0 protected"):
        tokenreduce.compile(eva, (x,), method="tome", r=2, protected_tokens=0, inner="eager", count_model_flops=False)
