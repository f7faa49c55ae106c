"""`reduce_decoder` on the decoder families beyond Llama (tiny random configs from `families.py`), each
checked against the independent reference in tests/decoder_reference.py: prefill logits, every layer's
cached keys/values and kept original positions, and the greedy tokens `generate()` produces after the
pruned prefill. Left padding in one row and spans at different offsets per row, as the Llama test.

What each family exercises: Qwen3 and Gemma 3 per-head q/k norms, OLMo2 whole-projection q/k norms and
post-norms, Phi-3 fused qkv with partial rotary, GPT-NeoX fused per-head qkv with rotary_pct and a
parallel residual, Gemma 2 tanh soft-capped logits (FastV must rank with the capped logits) and final
logit soft-cap, Gemma 2/3 alternating sliding-window layers and Mistral's sliding window on every layer
(window 6 over 24 tokens: pruning keeps the window in original positions, in the prefill and in decoding),
Gemma (1) `(1 + w)` norms and embedding scale, Phi-2 partial rotary with a parallel attention/MLP block,
OPT learned positions and its MLP on flattened `[B*N, C]`, GPT-2 learned positions and Conv1D projections (`view(-1, C)` -> addmm -> view back to `[B, N, 3C]`)."""

from __future__ import annotations

import pytest
import torch
from decoder_reference import RefDecoder, check_prefill
from decoders.families import build

import tokenreduce

N, PAD1 = 24, 3
FAMILIES = ["qwen3", "gemma2", "gemma3", "phi3", "olmo2", "gpt_neox", "mistral", "gpt2", "gemma", "phi", "opt"]
CASES = {
    "fastv": (dict(layers=[2], keep_ratio=0.5), [(1, 2, 8)]),
    "pyramiddrop": (dict(layers=[1, 3], keep_ratio=0.5), [(0, 1, 8), (2, 3, 4)]),
    "gemfilter": (dict(layers=[2], keep_tokens=5), [(2, 0, 5)]),
}


@pytest.fixture(scope="module")
def prompt():
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (2, N))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, :PAD1] = 0
    span = torch.zeros(2, N, dtype=torch.bool)
    span[0, 2:18] = True
    span[1, 5:21] = True
    return ids, mask, span


def check_against_reference(model, prompt, method, steps=5):  # type: ignore[no-untyped-def]
    ids, mask, span = prompt
    kw, stages = CASES[method]
    dec = tokenreduce.reduce_decoder(model, method, **kw)
    pre = dec.prefill(ids, mask, span)
    ref = RefDecoder(model)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    ref_logits, ref_cache = ref.prefill(ref.embed(ids, pos), mask, span, stages)
    check_prefill(dec, pre, ref_logits, ref_cache, mask)
    out = dec.generate(ids, mask, span, max_new_tokens=steps)
    want = ref.decode(ref_logits, ref_cache, mask, steps)
    assert torch.equal(out[:, :N], ids)
    assert torch.equal(out[:, N:], want)
    return dec


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_matches_reference(family, prompt):
    check_against_reference(build(family), prompt, "fastv")


@pytest.mark.parametrize("family, method", [("gemma2", "pyramiddrop"), ("gemma2", "gemfilter"),
                                            ("gemma3", "gemfilter"), ("qwen3", "pyramiddrop"),
                                            ("phi3", "gemfilter"), ("gpt_neox", "pyramiddrop"),
                                            ("gpt2", "gemfilter")])
def test_other_methods_match_reference(family, method, prompt):
    check_against_reference(build(family), prompt, method)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen3"])
def test_keep_everything_is_the_plain_model(family, prompt):
    """keep_ratio=1: the rewritten prefill and the cached decode are the model's own logits and tokens."""
    ids, mask, span = prompt
    model = build(family)
    dec = tokenreduce.reduce_decoder(model, "fastv", layers=[2], keep_ratio=1.0)
    pre = dec.prefill(ids, mask, span)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(pre.logits, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(dec.generate(ids, mask, span, max_new_tokens=5), want)


def test_soft_capped_prefill_exports_to_onnx(prompt, tmp_path):
    """Gemma 2's FastV graph ranks with `tokenreduce::capped_row_scores`; ONNX export inlines its reference
    (through the decoder methods' `references()`) and onnxruntime reproduces the eager graph."""
    import types

    pytest.importorskip("onnxruntime")
    from tokenreduce.targets.onnx import export_onnx

    ids = prompt[0][:1]
    dec = tokenreduce.reduce_decoder(build("gemma2"), "fastv", layers=[2])
    compiled, flat = dec.compiled_for(ids, None, (2, 18))
    assert any(n.target is torch.ops.tokenreduce.capped_row_scores.default for n in compiled.gm.graph.nodes)
    shim = types.SimpleNamespace(graph_module=compiled.gm, example_args=tuple(flat), example_kwargs={},
                                 dynamic_batch=False)
    written = export_onnx(shim, tmp_path / "gemma2_fastv.onnx", verify=True, atol=1e-4)
    assert written.verified and written.max_abs_diff < 1e-4
