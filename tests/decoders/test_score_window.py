"""`score_window=W` (SnapKV's observation window) for FastV / PyramidDrop / GemFilter: the span is ranked by
the attention the last W query tokens pay it, summed over those rows (each row its own causal softmax),
averaged over heads.

Checked against what is written out here: the op `tokenreduce::window_scores` against a per-row, per-head
loop over the attention formula (grouped keys, left padding, soft cap, bool masks, an `is_causal`
attention without a mask); the pruned prefill (logits, every layer's cache and kept positions, greedy
tokens) against a windowed copy of the eager reference's prefill loop (`tests/decoder_reference.py`'s
pieces, no tokenreduce code); the default `score_window=1` against the papers' one-row op, bit for bit;
the graph's ONNX export; and the refusals.
"""

from __future__ import annotations

import types

import pytest
import torch
from decoder_reference import RefDecoder, check_prefill
from decoders.families import build

import tokenreduce
import tokenreduce.kernels.decoder_ops  # noqa: F401  (registers the ops)
from tokenreduce import TokenReduceError
from tokenreduce.kernels.reference import query_row_scores

tr = torch.ops.tokenreduce
N, PAD1 = 24, 3
NEG = torch.finfo(torch.float32).min


@pytest.fixture(scope="module")
def prompt():
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (2, N))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, :PAD1] = 0  # left padding in row 1
    span = torch.zeros(2, N, dtype=torch.bool)
    span[0, 2:18] = True
    span[1, 5:21] = True  # the window of 4 below reaches into row 1's span
    return ids, mask, span


# ------------------------------------------------------------------------------------------ the op
def loop_scores(q, k, allowed, scale, cap, window):  # type: ignore[no-untyped-def]
    """sum over the last `window` rows r of mean over heads of softmax over the keys row r may see."""
    b, h, n, _ = q.shape
    kk = k.repeat_interleave(h // k.shape[1], dim=1)
    out = torch.zeros(b, n)
    for bi in range(b):
        for r in range(n - window, n):
            acc = torch.zeros(n)
            for hi in range(h):
                logits = (q[bi, hi, r] @ kk[bi, hi].T) * scale
                if cap is not None:
                    logits = torch.tanh(logits / cap) * cap
                ok = allowed[bi, r]
                p = torch.zeros(n)
                p[ok] = torch.softmax(logits[ok], -1)
                acc += p
            out[bi] += acc / h
    return out


@pytest.mark.parametrize("cap", [None, 1.5])
@pytest.mark.parametrize("window", [1, 3, 7])
def test_window_scores_are_the_summed_attention_rows(cap, window):
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 7, 8) * 3, torch.randn(2, 2, 7, 8) * 3  # grouped keys: 2 kv heads for 4 heads
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    allowed = causal.expand(2, 7, 7).clone()
    allowed[1, :, :2] = False  # left padding in row 1
    additive = torch.zeros(2, 1, 7, 7).masked_fill(~allowed[:, None], NEG)
    scale = 8 ** -0.5
    want = loop_scores(q, k, allowed, scale, cap, window)
    torch.testing.assert_close(tr.window_scores(q, k, additive, scale, cap, window, False), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tr.window_scores(q, k, allowed[:, None], scale, cap, window, False), want,
                               atol=1e-5, rtol=1e-5)  # bool mask, True = attend
    # an is_causal attention without a mask: the op hides the later keys itself
    want_causal = loop_scores(q, k, causal.expand(2, 7, 7), scale, cap, window)
    torch.testing.assert_close(tr.window_scores(q, k, None, scale, cap, window, True), want_causal,
                               atol=1e-5, rtol=1e-5)
    # a one-row mask (padding only) applies to every window row, on top of the causal mask
    one_row = additive[..., -1:, :]
    torch.testing.assert_close(tr.window_scores(q, k, one_row, scale, cap, window, True), want, atol=1e-5, rtol=1e-5)


def test_window_one_is_the_last_query_row_bit_for_bit():
    torch.manual_seed(2)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    mask = torch.zeros(2, 1, 9, 9).masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), NEG)
    assert torch.equal(tr.window_scores(q, k, mask, 0.25, None, 1, False), query_row_scores(q, k, mask, 0.25, -1))
    assert torch.equal(tr.window_scores(q, k, mask, 0.25, 2.0, 1, False), tr.capped_row_scores(q, k, mask, 0.25, 2.0, -1))


def test_window_scores_refuse_windows_longer_than_the_rows():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match=r"score_window must be in 1\.\.5"):
        tr.window_scores(q, q, None, 0.5, None, 6, True)


# ------------------------------------------------------------------------------------- the prefill
def windowed_prefill(ref: RefDecoder, embeds, mask, span, stages, window, pool):  # type: ignore[no-untyped-def]
    """`RefDecoder.prefill` with the ranking of every stage read from the last `window` query rows (summed,
    after the head mean) instead of the last row. stages: (score_layer, first_pruned_layer, keep)."""

    def rank(p: torch.Tensor) -> torch.Tensor:  # p [B, H, n, n] -> [B, n]
        s = p[:, :, -window:].float().mean(1).sum(1)
        if pool > 1:
            padded = torch.nn.functional.pad(s, (pool // 2, pool // 2), value=float("-inf"))
            s = padded.unfold(-1, pool, 1).max(-1).values
        return s

    def select(scores, droppable, keep):  # type: ignore[no-untyped-def]
        rows = []
        for s, d in zip(scores, droppable):
            cand = torch.nonzero(d).flatten()
            best = cand[torch.sort(s[cand], descending=True, stable=True).indices[:keep]]
            rows.append(torch.sort(torch.cat([torch.nonzero(~d).flatten(), best])).values)
        return torch.stack(rows)

    def take(x, idx):  # type: ignore[no-untyped-def]
        return x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[-1]))

    b, n, _ = embeds.shape
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    idx = torch.arange(n).expand(b, n)
    x = embeds
    gem = [s for s in stages if s[0] >= s[1]]
    if gem:  # GemFilter: the filter pass over the first L+1 layers on all tokens
        for li in range(gem[0][0] + 1):
            q, k, v = ref.qkv(li, x, position_ids)
            out, p = ref.attend(li, q, k, v, ref.allowed(li, idx, idx, mask.bool()))
            x = ref.finish(li, x, out)
        idx = select(rank(p), span, gem[0][2])
        x, stages = take(embeds, idx), []
    droppable = span.gather(1, idx)
    cache, last = [], None
    by_first = {s[1]: s for s in stages}
    for li in range(len(ref.layers)):
        if li in by_first:
            keep_idx = select(last, droppable, by_first[li][2])
            x, idx, droppable = take(x, keep_idx), idx.gather(1, keep_idx), droppable.gather(1, keep_idx)
        q, k, v = ref.qkv(li, x, position_ids.gather(1, idx))
        out, p = ref.attend(li, q, k, v, ref.allowed(li, idx, idx, mask.bool().gather(1, idx)))
        last = rank(p)
        cache.append([k, v, idx.clone()])
        x = ref.finish(li, x, out)
    return ref.logits(x[:, -1]), cache


CASES = {  # name -> (family, method, options, reference stages)
    "llama-gemfilter": ("llama", "gemfilter", dict(layers=[2], keep_tokens=6, score_window=4), [(2, 0, 6)]),
    "llama-fastv-pooled": ("llama", "fastv", dict(layers=[2], keep_ratio=0.5, score_window=3, score_pool=3),
                           [(1, 2, 8)]),
    "llama-pyramiddrop": ("llama", "pyramiddrop", dict(layers=[1, 3], keep_ratio=0.5, score_window=5),
                          [(0, 1, 8), (2, 3, 4)]),
    "gemma2-gemfilter": ("gemma2", "gemfilter", dict(layers=[3], keep_tokens=5, score_window=3), [(3, 0, 5)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_generate_match_the_windowed_reference(prompt, case):
    """Gemma 2 adds the soft cap and sliding-window layers (window 6: the window rows see different keys)."""
    family, method, kw, stages = CASES[case]
    ids, mask, span = prompt
    model = build(family)
    dec = tokenreduce.reduce_decoder(model, method, **kw)
    pre = dec.prefill(ids, mask, span)
    ref = RefDecoder(model)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    embeds = ref.embed(ids, pos)
    window, pool = kw["score_window"], kw.get("score_pool", 1)
    ref_logits, ref_cache = windowed_prefill(ref, embeds, mask, span, stages, window, pool)
    check_prefill(dec, pre, ref_logits, ref_cache, mask)
    # the window changes the ranking here: the last row alone keeps other tokens
    _, one_row = windowed_prefill(ref, embeds, mask, span, stages, 1, pool)
    assert any(not torch.equal(a[2], b[2]) for a, b in zip(ref_cache, one_row))
    steps = 5
    out = dec.generate(ids, mask, span, max_new_tokens=steps)
    want = ref.decode(ref_logits, windowed_prefill(ref, embeds, mask, span, stages, window, pool)[1], mask, steps)
    assert torch.equal(out[:, :N], ids)
    assert torch.equal(out[:, N:], want)


@pytest.mark.parametrize("method, kw", [("gemfilter", dict(layers=[2], keep_tokens=6)),
                                        ("pyramiddrop", dict(layers=[1, 3], keep_ratio=0.5, score_pool=3))])
def test_default_window_is_the_papers_ranking_bit_for_bit(prompt, method, kw):
    """score_window=1 (the default) emits the one-row op and no window op, and the prefill equals, bit for
    bit, both the option left out and the reference's last-row ranking's kept positions."""
    ids, mask, span = prompt
    model = build("llama")
    plain = tokenreduce.reduce_decoder(model, method, **kw)
    one = tokenreduce.reduce_decoder(model, method, score_window=1, **kw)
    a, b = plain.prefill(ids, mask, span), one.prefill(ids, mask, span)
    assert torch.equal(a.logits, b.logits)
    for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.positions, lb.positions)
    targets = [n.target for n in one.compiled_for(ids, mask, span)[0].gm.graph.nodes]
    assert tr.query_row_scores.default in targets and tr.window_scores.default not in targets


def test_windowed_prefill_exports_to_onnx(tmp_path):
    """The window is a constant of the graph: the prefill exports and onnxruntime reproduces it."""
    pytest.importorskip("onnxruntime")
    from tokenreduce.targets.onnx import export_onnx

    torch.manual_seed(1)
    ids = torch.randint(3, 128, (1, N))
    dec = tokenreduce.reduce_decoder(build("llama"), "gemfilter", layers=[2], keep_tokens=6, score_window=4,
                                     score_pool=3)
    compiled, flat = dec.compiled_for(ids, None, (2, 18))
    assert any(n.target is tr.window_scores.default for n in compiled.gm.graph.nodes)
    shim = types.SimpleNamespace(graph_module=compiled.gm, example_args=tuple(flat), example_kwargs={},
                                 dynamic_batch=False)
    written = export_onnx(shim, tmp_path / "llama_gemfilter_window.onnx", verify=True, atol=1e-4)
    assert written.verified and written.max_abs_diff < 1e-4


def test_bad_windows_are_refused(prompt):
    ids, mask, span = prompt
    with pytest.raises(TokenReduceError, match="score_window must be >= 1"):
        tokenreduce.reduce_decoder(build("llama"), "fastv", score_window=0)
    dec = tokenreduce.reduce_decoder(build("llama"), "gemfilter", layers=[2], keep_tokens=6, score_window=N + 1)
    with pytest.raises(TokenReduceError, match=f"score_window={N + 1} but the prompt has {N} tokens"):
        dec.prefill(ids, mask, span)
