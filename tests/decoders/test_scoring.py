"""The soft-capped last-query score (`tokenreduce::capped_row_scores`, Gemma 2's FastV ranking) against
the formula written out here: `softmax(tanh(q_last k^T * scale / c) * c + mask)` averaged over heads."""

from __future__ import annotations

import pytest
import torch

import tokenreduce.kernels.decoder_ops  # noqa: F401  (registers the op)
from tokenreduce.kernels.reference import query_row_scores

tr = torch.ops.tokenreduce


def test_capped_scores_are_the_capped_attention_row():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 7, 8) * 3, torch.randn(2, 2, 7, 8) * 3  # grouped keys: 2 kv heads for 4 heads
    mask = torch.zeros(2, 1, 7, 7)
    mask[1, ..., :2] = torch.finfo(torch.float32).min  # left padding in row 1
    scale, cap = 8 ** -0.5, 1.5
    kk = k.repeat_interleave(2, dim=1)
    want = []
    for b in range(2):
        heads = []
        for h in range(4):
            logits = (q[b, h, -1] @ kk[b, h].T) * scale
            heads.append(torch.softmax(torch.tanh(logits / cap) * cap + mask[b, 0, -1], -1))
        want.append(torch.stack(heads).mean(0))
    got = tr.capped_row_scores(q, k, mask, scale, cap, -1)
    torch.testing.assert_close(got, torch.stack(want), atol=1e-6, rtol=1e-6)
    # the cap changes the head-averaged ranking input (it is not the uncapped score)
    plain = query_row_scores(q, kk, mask, scale, -1)
    assert (plain - got).abs().max() > 1e-2
    # a bool mask (True = attend) gives the same scores as its additive form
    torch.testing.assert_close(tr.capped_row_scores(q, k, mask == 0, scale, cap, -1), got)


def test_capped_scores_refuse_a_nonpositive_cap():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="softcap must be > 0"):
        tr.capped_row_scores(q, q, None, 1.0, 0.0, -1)
