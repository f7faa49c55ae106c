"""Property tests of the plan ops (`torch.ops.tokenreduce.tome_plan / topk_plan / apply_plan`, whose CPU
implementations are the references) over random token counts, merge counts, protected counts and padding
patterns: every output slot has a source, protected tokens keep their slots, sizes add up, merges never mix
padding with real tokens, and a NaN stays in its own row (and slot)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce  # noqa: F401  (registers torch.ops.tokenreduce.*)
from tokenreduce.kernels.plans import max_r

ops = torch.ops.tokenreduce
PROPS = settings(max_examples=40, deadline=None)


@st.composite
def token_batches(draw, min_tokens=2):
    """(keys [B, H, N, d], size [B, N], valid [B, N] or None, P): right padding or a random pattern that
    keeps the protected tokens valid."""
    n = draw(st.integers(min_tokens, 24))
    p = draw(st.integers(0, min(3, n - 1)))
    bsz = draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    keys = torch.randn(bsz, 2, n, 4, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (bsz, n), generator=g).double()
    padding = draw(st.sampled_from(["none", "right", "random"]))
    valid = None
    if padding == "right":
        lengths = [draw(st.integers(max(p, 1), n)) for _ in range(bsz)]
        valid = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    elif padding == "random":
        valid = torch.rand(bsz, n, generator=g) < 0.7
        valid[:, : max(p, 1)] = True
    return keys, size, valid, p


def _every_slot_has_a_source(slot, rep, n_out):
    for b in range(slot.shape[0]):
        counts = torch.bincount(slot[b], minlength=int(slot.max()) + 1)[:n_out]
        assert counts.numel() == n_out, f"row {b}: output slots without a source"
        assert bool((counts >= 1).all()), f"row {b}: an output slot without a source"
        assert bool((slot[b].gather(0, rep[b]) == torch.arange(n_out)).all()), "a representative outside its slot"


@PROPS
@given(token_batches(), st.data())
def test_tome_plan_properties(batch, data):
    keys, size, valid, p = batch
    n = keys.shape[2]
    r = data.draw(st.integers(0, max_r(n, p)))
    slot, rep, keep = ops.tome_plan(keys, r, p, valid)
    n_out = n - r
    assert slot.shape == keys.shape[:1] + (n,) and rep.shape == (keys.shape[0], n_out)
    assert int(slot.min()) >= 0 and int(slot.max()) < n_out  # ToMe drops nothing: every token has a slot
    _every_slot_has_a_source(slot, rep, n_out)
    for i in range(p):  # protected tokens survive alone in their own slot
        assert bool((slot[:, i] == i).all()) and bool((rep[:, i] == i).all())
        assert bool(((slot == i).sum(dim=1) == 1).all())
    x = torch.randn(keys.shape[0], n, 3, dtype=torch.float64)
    _, size_out = ops.apply_plan(x, slot, size * keep, size, n_out)
    torch.testing.assert_close(size_out.sum(dim=1), (size * (keep > 0)).sum(dim=1))
    if valid is None:
        assert bool((keep == 1).all())
        torch.testing.assert_close(size_out.sum(dim=1), size.sum(dim=1))  # sizes sum to the original count
    else:  # a counted source has its slot's validity: merges never mix padding and real tokens
        slot_valid = valid.gather(1, rep)
        counted = keep > 0
        assert bool((slot_valid.gather(1, slot)[counted] == valid[counted]).all())


@PROPS
@given(token_batches(min_tokens=3), st.data())
def test_topk_plan_properties(batch, data):
    keys, size, valid, p = batch
    p = max(p, 1)  # EViT ranks by the CLS row: at least one protected token
    bsz, n = size.shape
    cand = n - p
    if cand < 1:
        return
    keep = data.draw(st.integers(1, cand))
    fuse = data.draw(st.booleans())
    scores = torch.rand(bsz, n, dtype=torch.float64) + 1e-3
    slot, weight, rep = ops.topk_plan(scores, keep, p, fuse, valid)
    n_out = p + keep + (1 if fuse else 0)
    assert rep.shape == (bsz, n_out) and int(slot.max()) <= n_out
    filled = p + keep + (1 if fuse and keep < cand else 0)  # the fused slot is empty when nothing is pruned
    _every_slot_has_a_source(slot, rep[:, :filled], filled)
    for i in range(p):
        assert bool((slot[:, i] == i).all()) and bool((rep[:, i] == i).all())
    kept = slot < p + keep
    assert bool((kept.sum(dim=1) == p + keep).all())  # each kept slot holds exactly one token
    if valid is not None:  # padding never outranks a real token
        real = valid[:, p:].sum(dim=1)
        kept_real = (kept & valid)[:, p:].sum(dim=1)
        assert bool((kept_real == torch.minimum(real, torch.full_like(real, keep))).all())
    x = torch.randn(bsz, n, 3, dtype=torch.float64)
    _, size_out = ops.apply_plan(x, slot, weight, size, n_out)
    expected = size.sum(dim=1) if fuse else (size * kept).sum(dim=1)
    torch.testing.assert_close(size_out.sum(dim=1), expected)


@PROPS
@given(token_batches(), st.data())
def test_nan_stays_in_its_row_and_slot(batch, data):
    keys, size, valid, p = batch
    bsz, n = size.shape
    r = data.draw(st.integers(0, max_r(n, p)))
    row, token = data.draw(st.integers(0, bsz - 1)), data.draw(st.integers(0, n - 1))
    slot, rep, keep = ops.tome_plan(keys, r, p, valid)
    poisoned = keys.clone()
    poisoned[row] = float("nan")
    slot_nan, rep_nan, keep_nan = ops.tome_plan(poisoned, r, p, valid)
    others = [b for b in range(bsz) if b != row]
    assert torch.equal(slot_nan[others], slot[others]) and torch.equal(rep_nan[others], rep[others])
    x = torch.randn(bsz, n, 3, dtype=torch.float64)
    x[row, token] = float("nan")
    out, size_out = ops.apply_plan(x, slot, size * keep, size, n - r)
    assert bool(torch.isfinite(out[others]).all()) and bool(torch.isfinite(size_out).all())
    finite_slots = torch.ones(n - r, dtype=torch.bool)
    if keep[row, token] > 0:
        finite_slots[slot[row, token]] = False
    assert bool(torch.isfinite(out[row, finite_slots]).all())


def test_dropped_nan_source_never_reaches_its_slot():
    """Found by the property above: a real token merged into padding is dropped with weight 0, and `0 * nan`
    is nan, so its NaN used to land in the padding slot it was dropped into."""
    x = torch.tensor([[[float("nan")] * 3, [1.0, 2.0, 3.0]]], dtype=torch.float64)
    slot = torch.tensor([[0, 0]])
    out, size = ops.apply_plan(x, slot, torch.tensor([[0.0, 1.0]], dtype=torch.float64),
                               torch.tensor([[1.0, 1.0]], dtype=torch.float64), 1)
    assert torch.equal(out, x[:, 1:]) and torch.equal(size, torch.tensor([[1.0]], dtype=torch.float64))
