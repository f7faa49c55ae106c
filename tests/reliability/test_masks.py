"""Ahead-of-time text models normalise the attention mask at the module boundary: the traced dtype is not
the only one accepted (bool / int / float 0-1 masks), a missing mask means no padding, and what cannot be
converted is refused by the input's name."""

from __future__ import annotations

import pytest
import torch
from conftest import bert_batch

import tokenreduce
from tokenreduce import TokenReduceError


@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    return BertModel(cfg, add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def inputs():
    return bert_batch(lengths=(12, 9), seq_len=12)


def _compile(model, ids, kwargs):
    return tokenreduce.compile(model, (ids,), kwargs, method="tome", r=2, inner="eager", count_model_flops=False)


def _out(red, ids, **kw):
    with torch.no_grad():
        return red(ids, **kw).last_hidden_state


def test_mask_dtypes_and_absence_are_normalised(tiny_bert, inputs):
    ids, mask = inputs  # traced with an int64 mask
    red = _compile(tiny_bert, ids, {"attention_mask": mask})
    ref = _out(red, ids, attention_mask=mask)
    for other in (mask.bool(), mask.int(), mask.float(), mask.half()):
        torch.testing.assert_close(_out(red, ids, attention_mask=other), ref, msg=str(other.dtype))
    no_padding = _out(red, ids, attention_mask=torch.ones_like(mask))
    torch.testing.assert_close(_out(red, ids), no_padding)
    torch.testing.assert_close(_out(red, ids, attention_mask=None), no_padding)
    ids3, mask3 = bert_batch(lengths=(12, 4, 7), seq_len=12, seed=4)  # another batch, no mask: ones of its shape
    torch.testing.assert_close(_out(red, ids3), _out(red, ids3, attention_mask=torch.ones_like(mask3)))


def test_unconvertible_masks_are_refused_by_name(tiny_bert, inputs):
    ids, mask = inputs
    red = _compile(tiny_bert, ids, {"attention_mask": mask})
    additive = torch.zeros(mask.shape).masked_fill(mask == 0, float("-inf"))
    with pytest.raises(TokenReduceError, match="attention_mask.*0 \\(padding\\)"):
        _out(red, ids, attention_mask=additive)
    with pytest.raises(TokenReduceError, match="attention_mask must be a tensor"):
        _out(red, ids, attention_mask=[[1] * 12] * 2)


def test_graph_traced_without_a_mask(tiny_bert, inputs):
    ids, mask = inputs
    red = _compile(tiny_bert, ids, None)
    ref = _out(red, ids)
    torch.testing.assert_close(_out(red, ids, attention_mask=torch.ones_like(mask).bool()), ref)
    with pytest.raises(TokenReduceError, match="no attention_mask.*example_kwargs"):
        _out(red, ids, attention_mask=mask)
