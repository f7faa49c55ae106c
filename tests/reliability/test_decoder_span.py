"""reduce_decoder never drops the query token: a span that covers the last prompt token is clipped (and the
report says so), so the returned logits are always the last token's. Before the fix FastV ranked it with the
other span tokens and, when dropped, the logits of another position came back as the last one's."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tokenreduce  # noqa: E402
from tokenreduce.compiler.decoder_api import CLIPPED_NOTE  # noqa: E402

N = 24


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


def test_span_over_the_last_token_is_clipped(llama):
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (2, N))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, :3] = 0  # left padding: every row's last real token is position N - 1
    covering = tokenreduce.reduce_decoder(llama, "fastv", layers=[1], keep_ratio=0.25)
    explicit = tokenreduce.reduce_decoder(llama, "fastv", layers=[1], keep_ratio=0.25)
    span_all = torch.zeros(2, N, dtype=torch.bool)
    span_all[:, 4:] = True  # covers the query token
    span_clipped = span_all.clone()
    span_clipped[:, -1] = False
    a = covering.prefill(ids, mask, span_all)
    b = explicit.prefill(ids, mask, span_clipped)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    assert all(bool((kept[:, -1] == N - 1).all()) for kept in a.kept), "the query token must stay in every block"
    assert CLIPPED_NOTE in covering.report.notes and CLIPPED_NOTE in str(covering.report)
    assert CLIPPED_NOTE not in explicit.report.notes


def test_evit_with_more_protected_tokens_than_the_sequence_says_so():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=2, num_classes=0).eval()
    red = tokenreduce.compile(model, torch.randn(2, 3, 32, 32), method="evit", keep_ratio=0.5, layers=[1],
                              protected_tokens=90, inner="eager", count_model_flops=False)
    reason = red.report.blocks[1].reason
    assert "no candidate tokens" in reason and "-" not in reason.split("tokens")[0], reason
