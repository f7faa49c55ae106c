"""Decoder prefill pruning (FastV, PyramidDrop, GemFilter) on small random Llama and LLaVA models, checked
against the independent eager reference in tests/decoder_reference.py (prefill logits, per-layer caches
and kept positions, and greedy tokens after the pruned prefill)."""

from __future__ import annotations

import pytest
import torch
from decoder_reference import RefLlama

import tokenreduce
from tokenreduce import TokenReduceError
from tokenreduce.analysis.decoder import analyse_decoder
from tokenreduce.analysis.encoder import analyse
from tokenreduce.compiler.capture import export_graph
from tokenreduce.compiler.decoder_api import _Prefill

transformers = pytest.importorskip("transformers")

N, SPAN0, SPAN1, PAD1 = 24, (2, 18), (5, 21), 3


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def prompt():
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, N))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, :PAD1] = 0  # left padding in row 1
    span = torch.zeros(2, N, dtype=torch.bool)
    span[0, SPAN0[0]:SPAN0[1]] = True
    span[1, SPAN1[0]:SPAN1[1]] = True
    return ids, mask, span


CASES = {
    "fastv": (dict(layers=[2], keep_ratio=0.5), [(1, 2, 8)]),
    "pyramiddrop": (dict(layers=[1, 2, 3], keep_ratio=0.5), [(0, 1, 8), (1, 2, 4), (2, 3, 2)]),
    "gemfilter": (dict(layers=[2], keep_tokens=6), [(2, 0, 6)]),
    "gemfilter-pooled": (dict(layers=[2], keep_tokens=6, score_pool=3), [(2, 0, 6)]),
    "pyramiddrop-pooled": (dict(layers=[1, 3], keep_ratio=0.5, score_pool=5), [(0, 1, 8), (2, 3, 4)]),
}


def test_analysis_finds_decoder_blocks_caches_and_rotary(llama, prompt):
    ids, mask, _ = prompt
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    gm = export_graph(_Prefill(llama), (ids, mask, pos), {}, dynamic_batch=False).gm
    a = analyse_decoder(gm)
    assert len(a.blocks) == 4 and a.num_tokens == N
    for db in a.blocks:
        k, v = db.kv
        assert tuple(k.meta["val"].shape) == (2, 2, N, 16) and tuple(v.meta["val"].shape) == (2, 2, N, 16)
        # rotary cos and sin, [B, 1, N, d], read by the q and k paths
        assert len(db.per_token) == 2
        assert all(tuple(t.meta["val"].shape) == (2, 1, N, 16) for t in db.per_token)
        assert db.attention.mask is not None


def test_encoder_analysis_skips_causal_blocks(llama, prompt):
    """HF builds the causal mask in the graph (no is_causal flag): the encoder analysis still sees it."""
    ids, mask, _ = prompt
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    gm = export_graph(_Prefill(llama), (ids, mask, pos), {}, dynamic_batch=False).gm
    blocks = analyse(gm).blocks
    assert len(blocks) == 4 and all(b.skip_reason and "causal" in b.skip_reason for b in blocks)


@pytest.mark.parametrize("method", list(CASES))
def test_prefill_and_generate_match_reference(llama, prompt, method):
    ids, mask, span = prompt
    kw, stages = CASES[method]
    dec = tokenreduce.reduce_decoder(llama, method.split("-")[0], **kw)
    pre = dec.prefill(ids, mask, span)
    ref = RefLlama(llama)
    embeds = llama.model.embed_tokens(ids)
    pool = kw.get("score_pool", 1)
    ref_logits, ref_cache = ref.prefill(embeds, mask, span, stages, pool)
    torch.testing.assert_close(pre.logits, ref_logits, atol=1e-4, rtol=1e-4)
    for layer, (k, v, idx) in zip(pre.cache.layers, ref_cache):
        assert torch.equal(layer.positions, idx)
        valid = mask.bool().gather(1, idx)[:, None, :, None]  # padding keys hold don't-care values
        torch.testing.assert_close(layer.keys * valid, k * valid, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.values * valid, v * valid, atol=1e-4, rtol=1e-4)
    # the report's per-block token counts are what the cache holds
    assert dec.report.tokens_per_block == [c[2].shape[1] for c in ref_cache]

    steps = 6
    out = dec.generate(ids, mask, span, max_new_tokens=steps)
    _, ref_cache = ref.prefill(embeds, mask, span, stages, pool)
    want = ref.decode(ref_logits, ref_cache, mask, steps, llama.model.embed_tokens)
    assert torch.equal(out[:, :N], ids)
    assert torch.equal(out[:, N:], want)


def test_keep_everything_is_the_plain_model(llama, prompt):
    ids, mask, span = prompt
    dec = tokenreduce.reduce_decoder(llama, "fastv", layers=[2], keep_ratio=1.0)
    pre = dec.prefill(ids, mask, span)
    with torch.no_grad():
        full = llama(input_ids=ids, attention_mask=mask).logits[:, -1]
        want = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(pre.logits, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(dec.generate(ids, mask, span, max_new_tokens=5), want)


def test_none_baseline_is_the_plain_model(llama, prompt):
    """method="none" (the benchmarks' baseline) captures the same prefill without pruning, with or without
    a span."""
    ids, mask, span = prompt
    dec = tokenreduce.reduce_decoder(llama, "none")
    with torch.no_grad():
        full = llama(input_ids=ids, attention_mask=mask).logits[:, -1]
    for s in (span, None):
        pre = dec.prefill(ids, mask, s)
        torch.testing.assert_close(pre.logits, full, atol=1e-5, rtol=1e-5)
    assert dec.report.stages == [] and dec.report.settings["layers"] == []
    assert dec.report.tokens_per_block == [N] * len(dec.report.blocks)


def test_continuation_logits_follow_the_pruned_cache(llama, prompt):
    """Teacher-forced continuation after a pruned prefill equals greedy decoding's own logits."""
    ids, mask, span = prompt
    dec = tokenreduce.reduce_decoder(llama, "fastv", layers=[2], keep_ratio=0.5)
    out = dec.generate(ids, mask, span, max_new_tokens=4)
    logits = dec.continuation_logits(ids, out[:, N:], mask, span)
    assert logits.shape[1] == 4 and torch.equal(logits.argmax(-1), out[:, N:])


def test_inductor_matches_eager(llama, prompt):
    ids, mask, span = prompt
    eager = tokenreduce.reduce_decoder(llama, "pyramiddrop", layers=[1, 3])
    ind = tokenreduce.reduce_decoder(llama, "pyramiddrop", layers=[1, 3], inner="inductor")
    a, b = eager.prefill(ids, mask, span), ind.prefill(ids, mask, span)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    for la, lb in zip(a.cache.layers, b.cache.layers):
        assert torch.equal(la.positions, lb.positions)


def test_flops_report(llama, prompt):
    ids, mask, span = prompt
    dec = tokenreduce.reduce_decoder(llama, "gemfilter", layers=[1], keep_tokens=4, count_model_flops=True)
    dec.prefill(ids, mask, span)
    rep = dec.report
    assert rep.tokens_per_block == [N - 16 + 4] * 4
    assert 0 < rep.flops_ratio < 1
    assert "gemfilter" in str(rep)


@pytest.mark.parametrize("kwargs, span_arg, match", [
    (dict(method="fastv"), None, "no span given"),
    (dict(method="gemfilter", layers=[1], keep_tokens=99), "span", "keep_tokens=99"),
    (dict(method="fastv", layers=[7]), "span", "out of range"),
    (dict(method="fastv", layers=[0]), "span", "layers must be >= 1"),
    (dict(method="pyramiddrop", layers=[3, 1]), "span", "strictly increasing"),
    (dict(method="fastv", keep_tokens=3), "span", "keep_tokens is a gemfilter setting"),
])
def test_errors(llama, prompt, kwargs, span_arg, match):
    ids, mask, span = prompt
    with pytest.raises(TokenReduceError, match=match):  # refused when built (options) or at the first prefill
        dec = tokenreduce.reduce_decoder(llama, **kwargs)
        dec.prefill(ids, mask, span if span_arg else None)


def test_bad_score_pool_is_refused(llama):
    with pytest.raises(TokenReduceError, match="score_pool must be an odd int"):
        tokenreduce.reduce_decoder(llama, "fastv", score_pool=4)


def test_unequal_spans_are_refused(llama, prompt):
    ids, mask, span = prompt
    bad = span.clone()
    bad[0, 2] = False
    with pytest.raises(TokenReduceError, match=r"same number of span tokens.*\[15, 16\]"):
        tokenreduce.reduce_decoder(llama, "fastv").prefill(ids, mask, bad)


def test_encoder_entry_point_points_to_reduce_decoder(llama, prompt):
    ids, mask, _ = prompt
    with pytest.raises(TokenReduceError, match="reduce_decoder"):
        tokenreduce.compile(llama, (ids,), method="fastv", inner="eager", count_model_flops=False)


def test_llava_image_span_found_from_the_image_token(prompt):
    torch.manual_seed(0)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8)
    tc = transformers.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=150, vision_feature_layer=-2,
                                   vision_feature_select_strategy="default")
    cfg._attn_implementation = "sdpa"
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    n_img = 16
    ids = torch.cat([torch.randint(0, 100, (2, 3)), torch.full((2, n_img), 150), torch.randint(0, 100, (2, 5))], 1)
    ids[1, :2] = 0
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    px = torch.randn(2, 3, 32, 32)
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=px)
    handle.remove()
    dec = tokenreduce.reduce_decoder(model, "fastv", layers=[2], keep_ratio=0.25)
    pre = dec.prefill(ids, mask, pixel_values=px)
    assert dec.report.span_tokens == n_img
    assert any("bidirectional" in why for _, why in dec.report.skipped)  # the vision tower is reported
    ref = RefLlama(model)
    span = ids == 150
    ref_logits, ref_cache = ref.prefill(captured["embeds"], mask, span, [(1, 2, 4)])
    torch.testing.assert_close(pre.logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(pre.cache.layers[3].positions, ref_cache[3][2])
    out = dec.generate(ids, mask, pixel_values=px, max_new_tokens=4)
    _, ref_cache = ref.prefill(captured["embeds"], mask, span, [(1, 2, 4)])
    want = ref.decode(ref_logits, ref_cache, mask, 4, model.model.language_model.embed_tokens)
    assert torch.equal(out[:, ids.shape[1]:], want)


def test_keep_plan_ties_zeros_and_protected_tokens():
    """Exact expectations: non-span tokens always kept, best span scores kept, equal scores (as after
    pooling) and zero scores resolved to the earlier token, output ascending."""
    from tokenreduce.kernels.plans import keep_plan, pool_scores

    scores = torch.tensor([[0.9, 0.1, 0.3, 0.3, 0.0, 0.0, 0.3, 0.2]])
    span = torch.tensor([[False, True, True, True, True, True, True, False]])
    assert keep_plan(scores, span, 2, 6).tolist() == [[0, 2, 3, 7]]  # 0.3 ties: positions 2, 3 before 6
    assert keep_plan(scores, span, 4, 6).tolist() == [[0, 1, 2, 3, 6, 7]]
    assert keep_plan(scores, span, 5, 6).tolist() == [[0, 1, 2, 3, 4, 6, 7]]  # zero scores: earlier first
    # scores that differ by one fp32 ulp keep their order whatever their positions
    s = torch.tensor([[0.5, torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)).item()]])
    assert keep_plan(s, torch.ones(1, 2, dtype=torch.bool), 1, 2).tolist() == [[1]]
    assert pool_scores(torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.5]]), 3).tolist() == [[1.0, 1.0, 1.0, 0.5, 0.5]]


def test_score_fusion_on_the_decoder_graph_keeps_the_results(llama, prompt):
    """The GPU fusion pass (forced here on CPU, where the fused op runs its reference) merges FastV's score
    with block K-1's causal SDPA without changing any output."""
    import copy

    from tokenreduce.passes.fuse_attention_scores import fuse_attention_scores

    ids, mask, span = prompt
    dec = tokenreduce.reduce_decoder(llama, "fastv", layers=[2])
    compiled, flat = dec.compiled_for(ids, mask, span)
    fused = copy.deepcopy(compiled.gm)
    res = fuse_attention_scores(fused, None, force=True)
    assert res.rewrites == 1, res.notes
    assert any(n.target is torch.ops.tokenreduce.attention_with_scores.default for n in fused.graph.nodes)
    with torch.no_grad():
        want, got = compiled.gm(*flat), fused(*flat)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[1] + got[2], want[1] + want[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
