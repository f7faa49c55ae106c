"""The tokenreduce custom ops against arithmetic written out in the test.

Each op (`tome_plan`, `topk_plan`, `query_row_scores`, `apply_plan`) is checked against loops or plain
torch math (never against the package's own helpers), plus the op contract with `torch.library.opcheck`
(fake implementation shapes equal the real ones, schema, autograd registration).
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import tome_merge

import tokenreduce  # noqa: F401  (registers torch.ops.tokenreduce.*)

tr = torch.ops.tokenreduce


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ apply_plan
def _apply_loop(x, slot, weight, size, n_out):
    """Weighted mean per slot written as a loop over batches and slots."""
    bsz, n, c = x.shape
    size = torch.ones(bsz, n) if size is None else size
    weight = size if weight is None else weight
    out = torch.zeros(bsz, n_out, c)
    out_size = torch.zeros(bsz, n_out)
    for b in range(bsz):
        for s in range(n_out):
            members = [i for i in range(n) if int(slot[b, i]) == s]
            wsum = sum(float(weight[b, i]) for i in members)
            if members and wsum > 0:
                out[b, s] = sum(weight[b, i] * x[b, i] for i in members) / wsum
            out_size[b, s] = sum(float(size[b, i]) for i in members if float(weight[b, i]) > 0)
    return out, out_size


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("with_size", [False, True])
def test_apply_plan_is_weighted_mean_per_slot(with_weight, with_size):
    g = _gen(1)
    bsz, n, c, n_out = 3, 11, 5, 6
    x = torch.randn(bsz, n, c, generator=g)
    # every slot gets at least one token; two tokens dropped (slot == n_out)
    slot = torch.stack([torch.cat([torch.arange(n_out), torch.randint(0, n_out + 1, (n - n_out,), generator=g)])
                        [torch.randperm(n, generator=g)] for _ in range(bsz)])
    size = torch.randint(1, 5, (bsz, n), generator=g).float() if with_size else None
    weight = torch.rand(bsz, n, generator=g) + 0.1 if with_weight else None
    got_x, got_size = tr.apply_plan(x, slot, weight, size, n_out)
    exp_x, exp_size = _apply_loop(x, slot, weight, size, n_out)
    assert got_x.shape == (bsz, n_out, c) and got_size.shape == (bsz, n_out)
    torch.testing.assert_close(got_x, exp_x, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_size, exp_size)


def test_apply_plan_empty_weight_slot_is_zero():
    x = torch.randn(1, 4, 3)
    slot = torch.tensor([[0, 1, 1, 2]])
    weight = torch.tensor([[1.0, 0.0, 0.0, 2.0]])  # slot 1 has zero total weight
    out, size = tr.apply_plan(x, slot, weight, None, 3)
    assert torch.equal(out[0, 1], torch.zeros(3))
    torch.testing.assert_close(out[0, 0], x[0, 0])
    torch.testing.assert_close(out[0, 2], x[0, 3])
    assert size.tolist() == [[1.0, 0.0, 1.0]]  # zero-weight sources are not counted (docs step 7)


def test_apply_plan_identity_plan_returns_input():
    x = torch.randn(2, 7, 4)
    slot = torch.arange(7).expand(2, 7)
    size = torch.full((2, 7), 3.0)
    out, out_size = tr.apply_plan(x, slot, None, size, 7)
    torch.testing.assert_close(out, x)
    torch.testing.assert_close(out_size, size)


# ------------------------------------------------------------------------------------------ tome_plan
def _tome_loop(k, r, p, valid=None):
    """ToMe matching from docs/methods.md written with Python loops (ties: lowest index first): returns, per batch, the list of
    merged A tokens (original positions) and the B token (original position) each merges into."""
    metric = k.mean(dim=1)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    bsz, n, _ = metric.shape
    result = []
    for b in range(bsz):
        best = []
        for a in range(0, n, 2):
            cands = []
            for bb in range(1, n, 2):
                s = float(metric[b, a] @ metric[b, bb])
                if valid is not None and bool(valid[b, a]) != bool(valid[b, bb]):
                    s = -2.0 if not bool(valid[b, a]) else -3.0  # below every cosine (docs step 3)
                if a < p or bb < p:
                    s = -math.inf
                cands.append((s, bb))
            # max with first index on ties, as torch.max
            sbest = max(c[0] for c in cands)
            bbest = next(c[1] for c in cands if c[0] == sbest)
            best.append((sbest, a, bbest))
        ranked = sorted(best, key=lambda t: -t[0])
        result.append({a: bb for _, a, bb in ranked[:r]})
    return result


@pytest.mark.parametrize("n,p,r", [(17, 1, 5), (18, 2, 4), (16, 0, 8), (21, 5, 3), (9, 1, 4)])
def test_tome_plan_matches_loop_and_invariants(n, p, r):
    g = _gen(n + p + r)
    bsz, heads, d = 3, 2, 8
    k = torch.randn(bsz, heads, n, d, generator=g)
    slot, rep, keep = tr.tome_plan(k, r, p, None)
    assert slot.shape == (bsz, n) and rep.shape == (bsz, n - r) and keep.shape == (bsz, n)
    assert torch.equal(keep, torch.ones(bsz, n))  # no padding: every source keeps its weight
    assert slot.dtype == torch.long and rep.dtype == torch.long
    merges = _tome_loop(k, r, p)
    for b in range(bsz):
        # every slot is used; sizes sum to N
        counts = torch.bincount(slot[b], minlength=n - r)
        assert counts.numel() == n - r and bool((counts >= 1).all()) and int(counts.sum()) == n
        # each representative is a token of its slot
        assert torch.equal(slot[b][rep[b]], torch.arange(n - r))
        # protected tokens keep slots 0..P-1 and represent themselves
        assert slot[b, :p].tolist() == list(range(p)) and rep[b, :p].tolist() == list(range(p))
        # the merged tokens are exactly the loop's, each in its B token's slot
        merged = [i for i in range(n) if int(rep[b][slot[b, i]]) != i]
        assert sorted(merged) == sorted(merges[b])
        for a, bb in merges[b].items():
            assert int(slot[b, a]) == int(slot[b, bb])
            assert int(rep[b, slot[b, a]]) == bb  # the B token represents a merged slot


def test_tome_plan_order_matches_official_output_order():
    """apply_plan with tome_plan's slots gives the reference's merged tokens in the official order."""
    g = _gen(7)
    for n, p, r in [(17, 1, 6), (66, 2, 20), (20, 0, 7)]:
        k = torch.randn(2, 3, n, 4, generator=g)
        x = torch.randn(2, n, 5, generator=g)
        size = torch.randint(1, 4, (2, n), generator=g).float()
        slot = tr.tome_plan(k, r, p, None)[0]
        got_x, got_size = tr.apply_plan(x, slot, None, size, n - r)
        exp_x, exp_size, _, _ = tome_merge(x, size, r, k.mean(dim=1), p)
        torch.testing.assert_close(got_x, exp_x, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got_size, exp_size)


def test_tome_plan_r0_merges_nothing():
    """r=0 keeps every token alone (the compiler never inserts an r=0 step; see test_insert_reductions).

    The op itself may reorder tokens into the official A/B output order, so the check is: every slot
    holds exactly one token, `rep` names it, and applying the plan loses nothing."""
    k = torch.randn(2, 2, 9, 4)
    x = torch.randn(2, 9, 3)
    slot, rep, _ = tr.tome_plan(k, 0, 1, None)
    assert rep.shape == (2, 9)
    for b in range(2):
        assert sorted(slot[b].tolist()) == list(range(9))
        assert torch.equal(slot[b][rep[b]], torch.arange(9))
        assert int(slot[b, 0]) == 0  # the protected token stays first
    out, size = tr.apply_plan(x, slot, None, None, 9)
    torch.testing.assert_close(out, torch.stack([x[b, rep[b]] for b in range(2)]))
    assert torch.equal(size, torch.ones(2, 9))


def test_tome_plan_never_merges_across_padding():
    g = _gen(3)
    n = 16
    k = torch.randn(4, 2, n, 8, generator=g)
    lengths = [16, 11, 7, 4]
    valid = torch.stack([torch.arange(n) < m for m in lengths])
    r = 7  # = (16 - 1) // 2: the most merges; same-kind pairs suffice in every row, so none may cross
    slot, rep, keep = tr.tome_plan(k, r, 1, valid)
    assert torch.equal(keep, torch.ones(4, n))
    merges = _tome_loop(k, r, 1, valid)
    for b in range(4):
        rep_valid = valid[b][rep[b][slot[b]]]  # validity of the slot each token landed in
        assert torch.equal(rep_valid, valid[b]), f"row {b}: a merge crossed padding"
        merged = [i for i in range(n) if int(rep[b][slot[b, i]]) != i]
        assert sorted(merged) == sorted(merges[b])
    # tokens + sizes through apply_plan equal the reference merge (which also tracks validity)
    x = torch.randn(4, n, 5, generator=g)
    size = torch.ones(4, n)
    got_x, got_size = tr.apply_plan(x, slot, size * keep, size, n - r)
    exp_x, exp_size, exp_valid, _ = tome_merge(x, size, r, k.mean(dim=1), 1, valid)
    torch.testing.assert_close(got_x, exp_x, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_size, exp_size)
    assert torch.equal(valid.gather(1, rep), exp_valid)


def test_tome_plan_forced_cross_padding_merge_has_zero_weight():
    """7 tokens, CLS + 5 real + 1 padding (an A token); r = 3 = (7 - 1) // 2 needs every A candidate,
    so the padding token must merge into a real B token: with weight 0, not counted in the size."""
    g = _gen(4)
    k = torch.randn(2, 2, 7, 4, generator=g)
    valid = torch.tensor([[True] * 6 + [False]] * 2)
    slot, rep, keep = tr.tome_plan(k, 3, 1, valid)
    assert keep[:, 6].tolist() == [0.0, 0.0]
    assert torch.equal(keep[:, :6], torch.ones(2, 6))
    assert bool(valid.gather(1, rep).all())  # every slot is represented by a real token
    x = torch.randn(2, 7, 3, generator=g)
    x[:, 6] = 1e6  # a padding value that must not leak into any real token
    size = torch.ones(2, 7)
    got_x, got_size = tr.apply_plan(x, slot, size * keep, size, 4)
    assert float(got_x.abs().max()) < 1e3
    assert got_size.sum(-1).tolist() == [6.0, 6.0]
    exp_x, exp_size, _, _ = tome_merge(x, size, 3, k.mean(dim=1), 1, valid)
    torch.testing.assert_close(got_x, exp_x)
    torch.testing.assert_close(got_size, exp_size)


def test_tome_plan_rejects_r_above_bound():
    with pytest.raises(Exception, match="largest valid r is 8"):
        tr.tome_plan(torch.randn(1, 2, 17, 4), 9, 1, None)


# ------------------------------------------------------------------------------------------ topk_plan
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("p", [1, 2])
def test_topk_plan_matches_loop(fuse, p):
    g = _gen(11 + p)
    bsz, n, keep = 3, 13, 5
    scores = torch.rand(bsz, n, generator=g)
    slot, weight, rep = tr.topk_plan(scores, keep, p, fuse, None)
    n_out = p + keep + (1 if fuse else 0)
    assert slot.shape == (bsz, n) and weight.shape == (bsz, n) and rep.shape == (bsz, n_out)
    for b in range(bsz):
        cand = sorted(range(p, n), key=lambda i: -float(scores[b, i]))
        kept, pruned = cand[:keep], cand[keep:]
        for i in range(p):
            assert int(slot[b, i]) == i and int(rep[b, i]) == i and float(weight[b, i]) == 1.0
        for j, i in enumerate(kept):  # descending score order
            assert int(slot[b, i]) == p + j and int(rep[b, p + j]) == i and float(weight[b, i]) == 1.0
        for i in pruned:
            assert int(slot[b, i]) == p + keep  # fused slot, or the dump slot n_out when not fusing
            assert float(weight[b, i]) == pytest.approx(float(scores[b, i]))
        if fuse:
            assert int(rep[b, -1]) == max(pruned, key=lambda i: float(scores[b, i]))
    # the fused token is the attention-weighted mean of the pruned ones
    x = torch.randn(bsz, n, 4, generator=g)
    out, size = tr.apply_plan(x, slot, weight, None, n_out)
    for b in range(bsz):
        cand = sorted(range(p, n), key=lambda i: -float(scores[b, i]))
        pruned = cand[keep:]
        torch.testing.assert_close(out[b, p:p + keep], x[b, cand[:keep]])
        if fuse:
            w = scores[b, pruned]
            torch.testing.assert_close(out[b, -1], (w[:, None] * x[b, pruned]).sum(0) / w.sum())
            assert float(size[b, -1]) == len(pruned)
        else:
            assert float(size[b].sum()) == p + keep


def test_topk_plan_padding_never_outranks_real_tokens():
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.05, 0.02, 0.7]])
    valid = torch.tensor([[True, False, False, True, True, True]])  # high scores on padding
    slot, weight, rep = tr.topk_plan(scores, 3, 1, True, valid)
    assert rep[0, 1:4].tolist() == [5, 3, 4]


# ------------------------------------------------------------------------------------------ query_row_scores
def _row_scores_loop(q, k, bias, scale, row):
    bsz, heads, _, _ = q.shape
    out = torch.zeros(bsz, k.shape[2])
    for b in range(bsz):
        acc = torch.zeros(k.shape[2])
        for h in range(heads):
            logits = (k[b, h] @ q[b, h, row]) * scale
            if bias is not None:
                bb = bias.expand(bsz, heads, q.shape[2], k.shape[2])[b, h, row]
                logits = logits + (bb if bb.dtype != torch.bool else torch.where(bb, 0.0, -math.inf))
            acc += torch.softmax(logits, dim=0)
        out[b] = acc / heads
    return out


@pytest.mark.parametrize("bias_kind", [None, "float", "bool", "full"])
def test_query_row_scores_matches_softmax(bias_kind):
    g = _gen(5)
    bsz, heads, n, d = 2, 3, 9, 4
    q = torch.randn(bsz, heads, n, d, generator=g)
    k = torch.randn(bsz, heads, n, d, generator=g)
    bias = None
    if bias_kind == "float":
        bias = torch.randn(bsz, 1, 1, n, generator=g)
    elif bias_kind == "bool":
        bias = torch.ones(bsz, 1, 1, n, dtype=torch.bool)
        bias[1, ..., 6:] = False
    elif bias_kind == "full":
        bias = torch.randn(bsz, heads, n, n, generator=g)
    scale = 0.37
    got = tr.query_row_scores(q, k, bias, scale, 0)
    exp = _row_scores_loop(q, k, bias, scale, 0)
    assert got.shape == (bsz, n)
    torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(bsz))
    if bias_kind == "bool":
        assert float(got[1, 6:].abs().max()) == 0.0


def test_query_row_scores_last_row():
    g = _gen(6)
    q, k = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    torch.testing.assert_close(tr.query_row_scores(q, k, None, 0.5, -1), _row_scores_loop(q, k, None, 0.5, 4))


# ------------------------------------------------------------------------------------------ op contracts
def _opcheck_cases():
    g = _gen(9)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False
    return [
        ("tome_plan", (torch.randn(2, 2, 9, 4, generator=g), 3, 1, None)),
        ("tome_plan", (torch.randn(2, 2, 9, 4, generator=g), 2, 2, valid)),
        ("topk_plan", (torch.rand(2, 9, generator=g), 4, 1, True, None)),
        ("topk_plan", (torch.rand(2, 9, generator=g), 3, 2, False, valid)),
        ("query_row_scores", (torch.randn(2, 2, 9, 4, generator=g), torch.randn(2, 2, 9, 4, generator=g),
                              None, 0.5, 0)),
        ("query_row_scores", (torch.randn(2, 2, 9, 4, generator=g), torch.randn(2, 2, 9, 4, generator=g),
                              torch.randn(2, 1, 1, 9, generator=g), 0.5, 0)),
        ("apply_plan", (torch.randn(2, 9, 4, generator=g), torch.randint(0, 5, (2, 9), generator=g),
                        None, None, 5)),
        ("apply_plan", (torch.randn(2, 9, 4, generator=g), torch.randint(0, 6, (2, 9), generator=g),
                        torch.rand(2, 9, generator=g), torch.ones(2, 9), 5)),
    ]


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    op = getattr(tr, name).default
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_fake_shapes_equal_real_shapes(name, args):
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = getattr(tr, name).default
    real = op(*args)
    mode = FakeTensorMode()
    fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
    with mode:
        fake = op(*fargs)
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real]
    assert [t.dtype for t in fake] == [t.dtype for t in real]
