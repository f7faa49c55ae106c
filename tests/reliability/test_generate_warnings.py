"""`ReducedDecoder.generate()` and `continuation_logits()` hand the pruned cache to transformers under the
keyword it takes now, so no call warns about the deprecated `past_key_values`."""

from __future__ import annotations

import warnings

import pytest
import torch

import tokenreduce

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


def test_generate_and_continuation_do_not_warn(llama):
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (1, 12))
    dec = tokenreduce.reduce_decoder(llama, method="fastv", layers=[1], keep_ratio=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = dec.generate(ids, span=(2, 10), max_new_tokens=3)
        logits = dec.continuation_logits(ids, torch.randint(0, 64, (1, 3)), span=(2, 10))
    assert out.shape == (1, 15) and logits.shape == (1, 3, 64)
    deprecated = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert not deprecated, deprecated
