"""The torch.compile backend on valid inputs whose layout or length differs from the first call: every call,
in sequence on one compiled model, equals the reference (it used to fail with "dynamic size s7 of the
captured graph is not a tensor dimension" once Dynamo made a stride symbolic)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import bert_batch, images, make_timm_vit
from reference import hf_bert_forward, timm_vit_forward

TOL = dict(atol=1e-4, rtol=1e-4)

@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Other tests compiled the same `forward`: start below Dynamo's recompile limit for it."""
    torch._dynamo.reset()


def test_vit_layouts_in_sequence():
    model = make_timm_vit(depth=2)
    fast = torch.compile(model, backend="tokenreduce", options={"method": "tome", "r": 3, "inner": "eager"})
    calls = [
        images(2),
        images(2).contiguous(memory_format=torch.channels_last),
        images(4)[::2],                                   # sliced: batch stride differs
        images(3, seed=5).permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2),  # permuted view
    ]
    with torch.no_grad():
        for i, x in enumerate(calls):
            torch.testing.assert_close(fast(x), timm_vit_forward(model, x.contiguous(), tome_r=[3] * 2), **TOL,
                                       msg=f"call {i}: shape {tuple(x.shape)} stride {x.stride()}")


def test_bert_sequence_lengths_in_sequence():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64)
    bert = BertModel(cfg, add_pooling_layer=False).eval()
    fast = torch.compile(bert, backend="tokenreduce",
                         options={"method": "tome", "r": 1, "inner": "eager", "unmerge": True})
    wide_ids, wide_mask = bert_batch(lengths=(16, 10), seq_len=16, seed=9)
    calls = [bert_batch(lengths=(8, 5), seq_len=8), bert_batch(lengths=(12, 7), seq_len=12),
             bert_batch(lengths=(8, 6), seq_len=8, seed=3),
             (wide_ids[:, :10], wide_mask[:, :10])]   # a slice of a wider batch: row stride 16, not 10
    with torch.no_grad():
        for ids, mask in calls:
            got = fast(ids, attention_mask=mask).last_hidden_state
            exp = hf_bert_forward(bert, ids.contiguous(), mask.contiguous(), tome_r=[1, 1], unmerge=True)
            valid = mask.bool()
            torch.testing.assert_close(got[valid], exp[valid], **TOL, msg=f"length {ids.shape[1]}")
