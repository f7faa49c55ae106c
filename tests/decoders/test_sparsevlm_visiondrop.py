"""SparseVLM (text-guided pruning with recycling) and VisionDrop (visual-only dropping with merging), inside the
LLM of tiny random-init LLaVA and Qwen2-VL models, checked against an independent reference written here:
per row, plain-python selections from the previous layer's attention probabilities of the hand-written eager
decoder in tests/decoder_reference.py (SparseVLM: rater tokens, relevance, DPC-KNN recycling with direct
distances in float64; VisionDrop: visual-to-visual attention, dominant tokens, contextual targets and joins by
key cosine), and a staged eager prefill that applies them. Compared: prefill logits, every layer's cached
keys/values and kept original positions, and the greedy tokens `generate()` produces after the pruned
prefill. Also: rows of a batch selected alone, `keep_ratio=1` is the plain model, the ops against the
python selections on random inputs, the settings' checks, and the pruned prefill through ONNX export."""

from __future__ import annotations

import math

import pytest
import torch
from decoder_reference import (
    IMG_ID,
    N_IMG,
    RefDecoder,
    check_prefill,
    check_qwen_prefill_and_decode,
    embeds_of,
    qwen_case,
)
from decoders.families import build

import tokenreduce
from tokenreduce import TokenReduceError
from tokenreduce.methods import sparsevlm, visiondrop

transformers = pytest.importorskip("transformers")
tr = torch.ops.tokenreduce


# ------------------------------------------------------------------------------------------- the reference
def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / max(na, 1e-12) / max(nb, 1e-12) if na and nb else 0.0


def sparsevlm_row(probs, x, emb0, span0, orig, span_now, real, keep, recycled, candidates):  # type: ignore[no-untyped-def]
    """SparseVLM on one row (python): kept span positions (current index) and {position: new hidden}.
    probs `[N, N]` head-mean attention of the previous layer; x `[N, C]` hidden; emb0 `[N0, C]` input
    embeddings with `span0` the original span; orig the current tokens' original positions."""
    n = len(orig)
    last = max(i for i in range(len(span0)) if span0[i])
    text = [i for i in range(n) if orig[i] > last and not span_now[i] and real[i]]
    if text:
        vis = [v for v in range(len(span0)) if span0[v]]
        rating = {t: 0.0 for t in text}
        for v in vis:
            dots = [float(emb0[v].double() @ emb0[orig[t]].double()) for t in text]
            top = max(dots)
            ex = [math.exp(d - top) for d in dots]
            for t, e in zip(text, ex):
                rating[t] += e / sum(ex) / len(vis)
        mean = sum(rating.values()) / len(text)
        raters = [t for t in text if rating[t] > mean or rating[t] == max(rating.values())]
    else:
        raters = [n - 1]
    span = [j for j in range(n) if span_now[j]]
    rel = {j: sum(float(probs[i, j]) for i in raters) / len(raters) for j in span}
    order = sorted(span, key=lambda j: -rel[j])
    chosen, new = order[:keep - recycled], {}
    if recycled:
        cand = [j for j in order if j not in chosen][:candidates]
        feats = [x[j].double() for j in cand]
        m, c = len(cand), recycled
        dist = [[float((feats[a] - feats[b]).norm()) / math.sqrt(x.shape[1]) for b in range(m)] for a in range(m)]
        density = [math.exp(-sum(d * d for d in sorted(row)[:c]) / c) for row in dist]
        far = max(max(row) for row in dist)
        indicator = [min([dist[a][b] for b in range(m) if density[b] > density[a]], default=far) for a in range(m)]
        centres = sorted(range(m), key=lambda a: -indicator[a] * density[a])[:c]
        groups: dict[int, list[int]] = {ci: [] for ci in centres}
        for a in range(m):
            home = a if a in centres else min(centres, key=lambda ci: dist[ci][a])
            groups[home].append(a)
        for ci, members in groups.items():
            new[cand[ci]] = torch.stack([feats[a] for a in members]).mean(0).float()
        chosen = chosen + [cand[ci] for ci in centres]
    return chosen, new


def visiondrop_row(probs, x, keys, span_now, dominant, contextual):  # type: ignore[no-untyped-def]
    """VisionDrop on one row (python): kept span positions and {position: new hidden}. keys `[H_kv, N, d]`
    of the previous layer (their head mean is the similarity metric)."""
    span = [j for j in range(len(span_now)) if span_now[j]]
    score = {j: sum(float(probs[i, j]) for i in span) / len(span) for j in span}
    dom = sorted(span, key=lambda j: -score[j])[:dominant]
    rest = [j for j in span if j not in dom]
    if contextual == 0:
        return dom, {}
    step = max(1, len(rest) // contextual)
    targets = rest[::step][:contextual]
    metric = keys.double().mean(0)
    joined: dict[int, list[int]] = {t: [] for t in targets}
    for o in (j for j in rest if j not in targets):
        sims = [_cos(metric[o], metric[t]) for t in targets]
        joined[targets[max(range(len(targets)), key=lambda a: (sims[a], -a))]].append(o)
    new = {t: x[t] + x[g].mean(0) for t, g in joined.items() if g}
    return dom + targets, new


def staged_prefill(ref, embeds, mask, span, stages, position_ids=None):  # type: ignore[no-untyped-def]
    """An eager prefill that, at each stage layer K, asks `stages[K](row, x, probs, keys, orig, span_now, real)`
    for the kept span positions and the new hidden states (from block K-1's attention and keys), then keeps
    the non-span tokens plus those. Returns last logits and per layer (k, v, original positions)."""
    b, n, _ = embeds.shape
    if position_ids is None:
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)

    def pos_of(idx):  # type: ignore[no-untyped-def]
        return position_ids.gather(2, idx[None].expand(3, *idx.shape)) if position_ids.dim() == 3 else \
            position_ids.gather(1, idx)

    idx = torch.arange(n).expand(b, n)
    x, cache, probs, keys = embeds, [], None, None
    with torch.no_grad():
        for li in range(len(ref.layers)):
            if li in stages:
                rows, xs = [], []
                for r in range(b):
                    span_now, real = span[r, idx[r]].tolist(), mask[r, idx[r]].bool().tolist()
                    kept, new = stages[li](r, x[r], probs[r], keys[r], idx[r].tolist(), span_now, real)
                    keep = sorted([i for i in range(idx.shape[1]) if not span_now[i]] + list(kept))
                    xr = x[r].clone()
                    for j, val in new.items():
                        xr[j] = val.to(xr.dtype)
                    rows.append(torch.tensor(keep))
                    xs.append(xr[keep])
                keep_idx = torch.stack(rows)
                x, idx = torch.stack(xs), idx.gather(1, keep_idx)
            q, k, v = ref.qkv(li, x, pos_of(idx))
            out, p = ref.attend(li, q, k, v, ref.allowed(li, idx, idx, mask.bool().gather(1, idx)))
            cache.append([k, v, idx.clone()])
            probs, keys = p.float().mean(1), k
            x = ref.finish(li, x, out)
    return ref.logits(x[:, -1]), cache


def sparsevlm_stages(emb0, span0, layers, keeps, remaining, ratio):  # type: ignore[no-untyped-def]
    out = {}
    for layer, keep in zip(layers, keeps):
        rec, cand = _recycle(remaining, keep, ratio)

        def stage(r, x, probs, keys, orig, span_now, real, keep=keep, rec=rec, cand=cand):  # type: ignore[no-untyped-def]
            return sparsevlm_row(probs, x, emb0[r], span0[r].tolist(), orig, span_now, real, keep, rec, cand)
        out[layer] = stage
        remaining = keep
    return out


def visiondrop_stages(layers, keeps, contextual_ratio):  # type: ignore[no-untyped-def]
    out = {}
    for layer, keep in zip(layers, keeps):
        ctx = min(keep, round(contextual_ratio * keep))

        def stage(r, x, probs, keys, orig, span_now, real, keep=keep, ctx=ctx):  # type: ignore[no-untyped-def]
            return visiondrop_row(probs, x, keys, span_now, keep - ctx, ctx)
        out[layer] = stage
    return out


def _recycle(remaining: int, keep: int, ratio: float) -> tuple[int, int]:
    """The recycled / candidate counts as the method documents them (written out here, not imported)."""
    if ratio == 0 or keep >= remaining or keep < 2:
        return 0, 0
    c = min(keep - 1, (int(ratio * (remaining - keep)) + 1) // 10 + 1)
    pruned = remaining - keep + c
    return c, max(c, min(pruned, int(ratio * pruned) + 1))


def _keeps(span: int, ratio: float, stages: int) -> list[int]:
    return [max(1, math.ceil(span * ratio ** (s / stages))) for s in range(1, stages + 1)]


# ------------------------------------------------------------------------------------------- counts
def test_stage_counts_follow_the_documented_formulas():
    assert sparsevlm.staged_keeps(576, 110 / 576, 3) == [332, 192, 110]  # official 192-token setting: 300/200/110
    assert visiondrop.Visiondrop.split(visiondrop.VisiondropOptions(), 35) == (30, 5)  # official [30, 5]
    for span, ratio, n in [(16, 0.25, 2), (24, 0.5, 3), (7, 1.0, 2), (100, 0.01, 1)]:
        assert sparsevlm.staged_keeps(span, ratio, n) == _keeps(span, ratio, n)
    for remaining, keep in [(576, 332), (332, 192), (16, 8), (16, 16), (5, 1), (40, 2)]:
        assert sparsevlm.recycle_counts(remaining, keep, 0.3) == _recycle(remaining, keep, 0.3)
    assert sparsevlm.recycle_counts(576, 332, 0.3) == (8, 76)  # 244 + 8 pruned: int(0.3 * 252) + 1 candidates
    assert sparsevlm.recycle_counts(576, 332, 0.0) == (0, 0)


# ------------------------------------------------------------------------------------------- the ops
def _random_case(seed: int):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    b, n, h, d, c = 2, 22, 2, 4, 8
    span = torch.zeros(b, n, dtype=torch.bool)
    span[0, 3:15], span[1, 5:17] = True, True
    mask = torch.ones(b, 1, n, n, dtype=torch.bool).tril()
    mask[1, ..., :2] = False  # row 1: two padding keys
    return torch.randn(b, n, c), torch.randn(b, h, n, d), torch.randn(b, h, n, d), mask, span


def test_sparsevlm_plan_matches_the_python_selection():
    x, q, k, mask, span = _random_case(3)
    emb = torch.randn_like(x)
    probs = sparsevlm.head_mean_probs(q, k, mask, 0.5, 0.0, True)
    for keep, (rec, cand) in [(6, (1, 3)), (6, (2, 4)), (6, (3, 6)), (4, (0, 0)), (12, (0, 0))]:
        scores, merged = tr.sparsevlm_plan(x, q, k, mask, emb, span, None, span, 0.5, 0.0, True, keep, 12, rec, cand)
        for r in range(2):
            kept, new = sparsevlm_row(probs[r], x[r], emb[r], span[r].tolist(), list(range(22)), span[r].tolist(),
                                      mask[r, 0, -1].tolist(), keep, rec, cand)
            assert torch.nonzero(scores[r]).flatten().tolist() == sorted(kept), (keep, rec, r)
            want = x[r].clone()
            for j, val in new.items():
                want[j] = val
            torch.testing.assert_close(merged[r], want, atol=1e-5, rtol=1e-5)
            assert len(new) == rec


def test_sparsevlm_attention_probs_are_the_models_softmax():
    _, q, k, mask, _ = _random_case(4)
    want = torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf")), -1).mean(1)
    rows = mask[:, 0].any(-1)  # fully masked (padding) query rows are undefined
    torch.testing.assert_close(sparsevlm.head_mean_probs(q, k, mask, 0.5, 0.0, False)[rows], want[rows])
    torch.testing.assert_close(sparsevlm.head_mean_probs(q, k[:, :1], None, 0.5, 0.0, True)[0],
                               torch.softmax((q[0] @ k[0, :1].transpose(-1, -2) * 0.5).masked_fill(
                                   ~mask[0, 0], float("-inf")), -1).mean(0))
    capped = sparsevlm.head_mean_probs(q, k, mask, 0.5, 2.0, False)
    logits = torch.tanh(q @ k.transpose(-1, -2) * 0.5 / 2.0) * 2.0
    torch.testing.assert_close(capped[rows], torch.softmax(logits.masked_fill(~mask, float("-inf")), -1).mean(1)[rows])


def test_visiondrop_plan_matches_the_python_selection():
    x, q, k, mask, span = _random_case(5)
    probs = sparsevlm.head_mean_probs(q, k, mask, 0.5, 0.0, True)
    for dominant, contextual in [(4, 2), (3, 0), (0, 3), (6, 6), (9, 1)]:
        scores, merged = tr.visiondrop_plan(x, q, k, mask, span, 0.5, 0.0, True, dominant, contextual, 12)
        for r in range(2):
            kept, new = visiondrop_row(probs[r], x[r], k[r], span[r].tolist(), dominant, contextual)
            assert torch.nonzero(scores[r]).flatten().tolist() == sorted(kept), (dominant, contextual, r)
            want = x[r].clone()
            for j, val in new.items():
                want[j] = val
            torch.testing.assert_close(merged[r], want, atol=1e-5, rtol=1e-5)


def test_ops_refuse_counts_outside_the_span():
    x, q, k, mask, span = _random_case(6)
    with pytest.raises(ValueError, match=r"dominant \+ contextual must be in 1..12, got 10 \+ 3"):
        visiondrop.visiondrop_plan_reference(x, q, k, mask, span, 0.5, 0.0, True, 10, 3, 12)
    with pytest.raises(ValueError, match="sparsevlm counts out of range: keep 4 of 12, 4 recycled"):
        sparsevlm.sparsevlm_plan_reference(x, q, k, mask, x, span, None, span, 0.5, 0.0, True, 4, 12, 4, 5)


# ------------------------------------------------------------------------------------------- LLaVA
@pytest.mark.parametrize("method", ["sparsevlm", "visiondrop"])
def test_llava_matches_reference(llava, llava_prompt, method):
    """Two stages (blocks 1 and 3): 16 image tokens -> 8 -> 4 per row, each stage from the previous block's
    attention; merged hidden states carried into the kept tokens; generate() continues from the pruned cache."""
    ids, mask, px = llava_prompt
    n = ids.shape[1]
    opts = dict(recycle_ratio=0.5) if method == "sparsevlm" else dict(contextual_ratio=0.25)
    dec = tokenreduce.reduce_decoder(llava, method, layers=[1, 3], keep_ratio=0.25, **opts)
    pre = dec.prefill(ids, mask, pixel_values=px)
    assert dec.report.tokens_per_block == [n, n - 8, n - 8, n - 12]
    embeds, _ = embeds_of(llava, ids, mask, pixel_values=px)
    span = ids == IMG_ID
    stages = sparsevlm_stages(embeds, span, [1, 3], [8, 4], N_IMG, 0.5) if method == "sparsevlm" else \
        visiondrop_stages([1, 3], [8, 4], 0.25)
    ref = RefDecoder(llava)
    ref_logits, ref_cache = staged_prefill(ref, embeds, mask, span, stages)
    check_prefill(dec, pre, ref_logits, ref_cache, mask)
    out = dec.generate(ids, mask, pixel_values=px, max_new_tokens=4)
    want = ref.decode(ref_logits, ref_cache, mask, 4, llava.model.language_model.embed_tokens)
    assert torch.equal(out[:, :n], ids) and torch.equal(out[:, n:], want)


@pytest.mark.parametrize("method", ["sparsevlm", "visiondrop"])
def test_rows_are_selected_alone_and_keep_everything_is_the_plain_model(llava, llava_prompt, method):
    """A prompt pruned alone gives its row of the batch (the padded row, unpadded: positions shift by the two
    padding tokens the batch keeps); keep_ratio=1 keeps and merges nothing: the model's own logits and tokens."""
    ids, mask, px = llava_prompt
    dec = tokenreduce.reduce_decoder(llava, method, layers=[1, 3], keep_ratio=0.25)
    both = dec.prefill(ids, mask, pixel_values=px)
    alone = dec.prefill(ids[1:, 2:], mask[1:, 2:], pixel_values=px[1:])
    torch.testing.assert_close(alone.logits[0], both.logits[1], atol=1e-4, rtol=1e-4)
    assert torch.equal(alone.kept[-1][0] + 2, both.kept[-1][1][2:])
    same = tokenreduce.reduce_decoder(llava, method, layers=[1, 3], keep_ratio=1.0)
    with torch.no_grad():
        full = llava(input_ids=ids, attention_mask=mask, pixel_values=px).logits[:, -1]
        want = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(same.prefill(ids, mask, pixel_values=px).logits, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(same.generate(ids, mask, pixel_values=px, max_new_tokens=4), want)


# ------------------------------------------------------------------------------------------- Qwen2-VL
@pytest.mark.parametrize("method", ["sparsevlm", "visiondrop"])
def test_qwen2_vl_keeps_3_axis_positions(method):
    """Qwen2-VL with an image and a video (24 span tokens per row): two stages on the embeddings the model
    builds; kept and merged tokens keep their original mRoPE positions; decoding continues after the offset."""
    case = qwen_case()
    model, ids, mask, media, embeds, positions, span, _ = case
    keeps = _keeps(24, 0.25, 2)
    if method == "sparsevlm":
        dec = tokenreduce.reduce_decoder(model, method, layers=[1, 2], keep_ratio=0.25)
        stages = sparsevlm_stages(embeds, span, [1, 2], keeps, 24, 0.3)
    else:
        dec = tokenreduce.reduce_decoder(model, method, layers=[1, 2], keep_ratio=0.25, contextual_ratio=0.3)
        stages = visiondrop_stages([1, 2], keeps, 0.3)
    pre = dec.prefill(ids, mask, **media)
    ref = RefDecoder(model)
    ref_logits, ref_cache = staged_prefill(ref, embeds, mask, span, stages, position_ids=positions)
    check_qwen_prefill_and_decode(dec, pre, ref, ref_logits, ref_cache, case)


# ------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("method, opts, setting, match", [
    ("sparsevlm", dict(keep_ratio=0.0), "keep_ratio", r"keep_ratio must be in \(0, 1\]"),
    ("sparsevlm", dict(recycle_ratio=1.5), "recycle_ratio", r"recycle_ratio must be a number in \[0, 1\]"),
    ("visiondrop", dict(contextual_ratio=-0.1), "contextual_ratio", r"contextual_ratio must be a number in \[0, 1\]"),
    ("visiondrop", dict(layers="2"), "layers", "layers must be an int or a list of ints"),
    ("visiondrop", dict(pivot_text_tokens=2), "pivot_text_tokens", "pivot_text_tokens is a dart setting"),
])
def test_settings_are_checked(method, opts, setting, match):
    with pytest.raises(TokenReduceError, match=match) as e:
        tokenreduce.reduce_decoder(torch.nn.Linear(1, 1), method, **opts)
    assert e.value.setting == setting


@pytest.mark.parametrize("method", [sparsevlm.METHOD, visiondrop.METHOD])
def test_stages_refuse_layer_0_and_unordered_layers(method):
    opts = method.options({"layers": [0, 2]})
    with pytest.raises(TokenReduceError, match=r"layers must be >= 1, got \[0, 2\]") as e:
        method.stages(opts, 4, 16)
    assert e.value.setting == "layers"
    with pytest.raises(TokenReduceError, match=r"strictly increasing, got \[3, 1\]"):
        method.stages(method.options({"layers": [3, 1]}), 4, 16)
    with pytest.raises(TokenReduceError, match=r"valid layers 0..3"):
        method.stages(method.options({"layers": [1, 4]}), 4, 16)
    assert [s.first_reduced_block for s in method.stages(method.options({}), 32, 576)] == \
        ([3, 7, 16] if method.name == "sparsevlm" else [8, 16, 24])


# ------------------------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("method", ["sparsevlm", "visiondrop"])
def test_prefill_exports_to_onnx(tmp_path, method):
    """The pruned prefill (two stages, recycling / merging included) exports and onnxruntime reproduces the eager
    graph, on a Llama with a marked context span (LLaVA's whole prefill: test_vlm_export.py)."""
    pytest.importorskip("onnxruntime")
    import types

    from tokenreduce.targets.onnx import export_onnx

    torch.manual_seed(1)
    ids = torch.randint(3, 128, (1, 24))
    dec = tokenreduce.reduce_decoder(build("llama"), method, layers=[1, 3], keep_ratio=0.25)
    compiled, flat = dec.compiled_for(ids, None, (2, 18))
    op = tr.sparsevlm_plan.default if method == "sparsevlm" else tr.visiondrop_plan.default
    assert sum(n.target is op for n in compiled.gm.graph.nodes) == 2
    shim = types.SimpleNamespace(graph_module=compiled.gm, example_args=tuple(flat), example_kwargs={},
                                 dynamic_batch=False)
    written = export_onnx(shim, tmp_path / f"llama_{method}.onnx", verify=True, atol=1e-4)
    assert written.verified and written.max_abs_diff < 1e-4
