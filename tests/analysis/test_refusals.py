"""What the analysis cannot handle is named: the refusal for a graph whose softmax looks like attention but does
not match says which node and where matching stopped (never "the model has neither"); per-block skip reasons
name the construct (no projection above the query, no residual add, cross-attention)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenreduce import TokenReduceError
from tokenreduce.analysis.encoder import analyse
from tokenreduce.compiler.capture import export_graph

DIM, HEADS, N = 16, 2, 6


class _Block(torch.nn.Module):
    """A pre-LN block with explicit attention; `logits` transforms q @ k^T before softmax."""

    def __init__(self, logits=None, softmax_dim=-1, residual=True, project_q=True, kv_tokens=None):
        super().__init__()
        self.norm = torch.nn.LayerNorm(DIM)
        self.qkv = torch.nn.Linear(DIM, 3 * DIM)
        self.proj = torch.nn.Linear(DIM, DIM)
        self.logits, self.softmax_dim, self.residual, self.project_q = logits, softmax_dim, residual, project_q
        self.kv_tokens = kv_tokens

    def forward(self, x):
        b, n, c = x.shape
        h = self.norm(x)
        q, k, v = self.qkv(h).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        if not self.project_q:
            q = h.reshape(b, n, HEADS, c // HEADS).transpose(1, 2)
        if self.kv_tokens is not None:
            k, v = k[:, :, :self.kv_tokens], v[:, :, :self.kv_tokens]
        s = q @ k.transpose(-2, -1) * (c // HEADS) ** -0.5
        if self.logits is not None:
            s = self.logits(s)
        o = s.softmax(self.softmax_dim) @ v
        o = self.proj(o.transpose(1, 2).reshape(b, n, c))
        return x + o if self.residual else o


def _analyse(module):
    torch.manual_seed(0)
    return analyse(export_graph(module.eval(), (torch.randn(2, N, DIM),), {}, dynamic_batch=False).gm)


@pytest.mark.parametrize("logits, names", [
    (torch.sin, ["softmax", "sin", "not a recognised score modifier"]),
    (lambda s: torch.tanh(s) * 5.0, ["tanh", "soft-cap form tanh(x / c) * c"]),
])
def test_unrecognised_score_modifier_is_named(logits, names):
    torch.manual_seed(0)
    with pytest.raises(TokenReduceError) as info:
        _analyse(_Block(logits=logits))
    msg = str(info.value)
    assert "has neither" not in msg
    assert "attention-like ops were seen but not matched" in msg
    for name in names:
        assert name in msg, msg


def test_softmax_over_another_axis_is_named():
    with pytest.raises(TokenReduceError, match=r"softmax over axis -2, not the last \(key\) axis"):
        _analyse(_Block(softmax_dim=-2))


def test_soft_cap_in_explicit_attention_is_recorded():
    an = _analyse(_Block(logits=lambda s: torch.tanh(s / 30.0) * 30.0))
    att = an.blocks[0].attention
    assert [m.kind for m in att.score_mods] == ["scale", "softcap"] and att.softcap == pytest.approx(30.0)


def test_in_place_masked_fill_is_a_score_mod():
    keep = torch.ones(N, N, dtype=torch.bool).triu(-2).tril(2)  # a band |i - j| <= 2 built as a constant

    def fill(s):
        return s.masked_fill_(~keep, float("-inf"))

    an = _analyse(_Block(logits=fill))
    mods = an.blocks[0].attention.score_mods
    assert [m.kind for m in mods] == ["scale", "masked_fill"] and mods[1].value == float("-inf")


def test_no_residual_add_is_named():
    blk = _analyse(_Block(residual=False)).blocks[0]
    assert blk.skip_reason.startswith("no residual add after the attention output")
    assert "query projection" in blk.skip_reason


def test_no_projection_above_the_query_is_named():
    blk = _analyse(_Block(project_q=False)).blocks[0]
    assert blk.skip_reason.startswith("no projection (linear, addmm, mm or matmul with a parameter) found above "
                                      "the attention query")


def test_cross_attention_is_named():
    blk = _analyse(_Block(kv_tokens=4)).blocks[0]
    assert blk.skip_reason == f"cross-attention ({N} queries over 4 keys); only self-attention is reduced"


class _Sdpa(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(DIM, 3 * DIM)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return x + o.transpose(1, 2).reshape(b, n, c)


def test_block_without_any_norm_is_reduced_at_its_residual_add():
    """ModernBERT's layer 0 (attn_norm = Identity): x + attn(x), no norm before or after."""
    blk = _analyse(torch.nn.Sequential(_Sdpa(), torch.nn.Linear(DIM, DIM))).blocks[0]
    assert blk.reducible and blk.layout == "no-pre-norm"
    assert blk.reduce_at is blk.residual_add and blk.x_in.op == "placeholder"


class _TwoBlocks(torch.nn.Module):
    """One block the analysis knows and one whose logits pass through `sin`: the second is reported."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _Block(), _Block(logits=torch.sin)

    def forward(self, x):
        return self.b(self.a(x))


def test_unmatched_attention_next_to_matched_blocks_is_reported():
    an = _analyse(_TwoBlocks())
    assert len(an.blocks) == 1 and an.blocks[0].reducible
    assert len(an.unmatched) == 1 and "`sin` (sin.default) between the logits and softmax" in an.unmatched[0]


class _Banded(torch.nn.Module):
    """SDPA with a position mask built from two comparisons: j >= i - (w - 1) and j <= i (+ (w - 1))."""

    def __init__(self, window, causal):
        super().__init__()
        self.qkv = torch.nn.Linear(DIM, 3 * DIM)
        self.window, self.causal = window, causal

    def forward(self, x):
        b, n, c = x.shape
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = (j >= i - (self.window - 1)) & (j <= i + (0 if self.causal else self.window - 1))
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return x + o.transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize("causal", [False, True])
def test_band_masks_give_window_and_causality(causal):
    """A local band |i - j| < 3 is bidirectional (reducible by encoder methods); with j <= i it is causal."""
    blk = _analyse(_Banded(window=3, causal=causal)).blocks[0]
    assert blk.attention.window == 3
    if causal:
        assert blk.skip_reason.startswith("causal attention")
    else:
        assert blk.reducible, blk.skip_reason
