"""VLM visual-token selection methods (DivPrune, DART) on tiny random-init LLaVA and Qwen2-VL models, checked
against the independent reference in tests/decoder_reference.py: a pure-python selection on the hidden
states (greedy k-center for DivPrune; pivots + least-similar tokens for DART) feeding a hand-written eager
prefill that drops the same tokens. Compared: prefill logits, every layer's cached keys/values and kept
original positions, and the greedy tokens `generate()` produces after the pruned prefill. Also: each row
of a batch is selected alone (a prompt pruned alone = its row of the batch), `keep_ratio=1` is the plain
model, the ops against the pure-python selections, and the pruned prefill through ONNX export."""

from __future__ import annotations

import pytest
import torch
from decoder_reference import (
    IMG_ID,
    N_IMG,
    RefDecoder,
    check_prefill,
    check_qwen_prefill_and_decode,
    dart_select,
    divprune_select,
    embeds_of,
    qwen_case,
    select_prefill,
)
from decoders.families import build

import tokenreduce
from tokenreduce import TokenReduceError
from tokenreduce.kernels import decoder_ops

transformers = pytest.importorskip("transformers")
tr = torch.ops.tokenreduce


def _divprune_choose(span: torch.Tensor, keep: int):  # type: ignore[no-untyped-def]
    def choose(r, x, keys, real):  # type: ignore[no-untyped-def]
        pos = torch.nonzero(span[r]).flatten().tolist()
        feats = x[pos].double().tolist()
        return [pos[i] for i in divprune_select(feats, keep)]
    return choose


def _dart_choose(span: torch.Tensor, keep: int, pivot_image: int, pivot_text: int):  # type: ignore[no-untyped-def]
    def choose(r, x, keys, real):  # type: ignore[no-untyped-def]
        l1 = keys.float().abs().sum((0, 2)).tolist()
        kept = dart_select(x.double().tolist(), l1, span[r].tolist(), real.tolist(), keep, pivot_image, pivot_text)
        return kept
    return choose


# ------------------------------------------------------------------------------------------- the ops
def test_kcenter_scores_select_the_greedy_max_min_order():
    """The op's selection order (scores keep, keep-1, ...) is the pure-python greedy max-min on each row's
    own span tokens; rows with spans at different places select independently."""
    torch.manual_seed(0)
    x = torch.randn(3, 20, 8)
    span = torch.zeros(3, 20, dtype=torch.bool)
    span[0, 2:14], span[1, 5:17] = True, True
    span[2, [0, 1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 19]] = True  # not contiguous
    got = tr.kcenter_scores(x, span, 5, 12)
    for r in range(3):
        pos = torch.nonzero(span[r]).flatten().tolist()
        order = divprune_select(x[r, pos].double().tolist(), 5)
        want = torch.zeros(20)
        for i, j in enumerate(order):
            want[pos[j]] = 5 - i
        assert torch.equal(got[r], want), (r, got[r], want)
    # keep = the whole span: every span token gets a distinct rank
    full = tr.kcenter_scores(x, span, 12, 12)
    assert sorted(full[0][span[0]].tolist()) == list(range(1, 13)) and not full[0][~span[0]].any()


def test_kcenter_never_selects_a_token_twice():
    """Exact duplicates: after one of two identical tokens is chosen, the other is at distance 0 and is
    chosen only once every farther token is (the official code could pick the same index again)."""
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    span = torch.ones(1, 4, dtype=torch.bool)
    got = tr.kcenter_scores(x, span, 4, 4)
    assert sorted(got[0].tolist()) == [1.0, 2.0, 3.0, 4.0]
    assert got[0, 1] == 1.0 or got[0, 0] == 1.0  # one duplicate last


def test_dart_scores_match_the_pure_python_selection():
    torch.manual_seed(3)
    n, s = 24, 14
    x, keys = torch.randn(2, n, 16), torch.randn(2, 2, n, 4)
    span = torch.zeros(2, n, dtype=torch.bool)
    span[0, 3:3 + s], span[1, 6:6 + s] = True, True
    mask = torch.ones(2, 1, n, n, dtype=torch.bool).tril()
    mask[1, ..., :2] = False  # row 1: two padding keys
    for keep, pi, pt in [(7, 2, 2), (14, 4, 4), (3, 3, 1), (5, 0, 2)]:
        got = tr.dart_scores(x, keys, span, mask, keep, s, pi, pt)
        for r in range(2):
            l1 = keys[r].abs().sum((0, 2)).tolist()
            want = dart_select(x[r].double().tolist(), l1, span[r].tolist(), mask[r, 0, -1].tolist(), keep, pi, pt)
            assert torch.nonzero(got[r]).flatten().tolist() == want, (keep, pi, pt, r)


def test_dart_repeats_the_best_text_pivot_when_the_question_is_short():
    torch.manual_seed(4)
    x, keys = torch.randn(1, 10, 8), torch.randn(1, 1, 10, 4)
    span = torch.zeros(1, 10, dtype=torch.bool)
    span[0, 1:9] = True  # one token after the span
    got = tr.dart_scores(x, keys, span, None, 5, 8, 1, 3)
    want = dart_select(x[0].double().tolist(), keys[0].abs().sum((0, 2)).tolist(), span[0].tolist(), [True] * 10,
                       5, 1, 3)
    assert torch.nonzero(got[0]).flatten().tolist() == want and len(want) == 5


def test_ops_refuse_counts_outside_the_span():
    x, span = torch.randn(1, 6, 4), torch.ones(1, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"keep must be in 1..6, got 7"):
        decoder_ops.kcenter_scores_reference(x, span, 7, 6)
    with pytest.raises(ValueError, match=r"keep must be in 4..6 \(at least the 4 image pivots\), got 3"):
        decoder_ops.dart_scores_reference(x, torch.randn(1, 1, 6, 2), span, None, 3, 6, 4, 4)


# ------------------------------------------------------------------------------------------- DivPrune
def test_divprune_llava_matches_reference(llava, llava_prompt):
    ids, mask, px = llava_prompt
    n = ids.shape[1]
    dec = tokenreduce.reduce_decoder(llava, "divprune", keep_ratio=0.25)
    pre = dec.prefill(ids, mask, pixel_values=px)
    assert dec.report.span_tokens == N_IMG
    assert dec.report.tokens_per_block == [n - N_IMG + 4] * 4  # pruned before the first layer
    embeds, _ = embeds_of(llava, ids, mask, pixel_values=px)
    ref, span = RefDecoder(llava), ids == IMG_ID
    ref_logits, ref_cache = select_prefill(ref, embeds, mask, span, 0, _divprune_choose(span, 4))
    check_prefill(dec, pre, ref_logits, ref_cache, mask)
    out = dec.generate(ids, mask, pixel_values=px, max_new_tokens=4)
    _, ref_cache = select_prefill(ref, embeds, mask, span, 0, _divprune_choose(span, 4))
    want = ref.decode(ref_logits, ref_cache, mask, 4, llava.model.language_model.embed_tokens)
    assert torch.equal(out[:, :n], ids) and torch.equal(out[:, n:], want)


def test_divprune_rows_are_selected_alone(llava, llava_prompt):
    """A prompt pruned alone gives its row of the batch: same logits, same kept positions (row 1 alone has
    no padding, so its positions shift by the two padding tokens, which the batch keeps; row 0 selects on
    its own too, or row 1's selection would have seen it)."""
    ids, mask, px = llava_prompt
    dec = tokenreduce.reduce_decoder(llava, "divprune", keep_ratio=0.25)
    both = dec.prefill(ids, mask, pixel_values=px)
    alone = dec.prefill(ids[1:, 2:], mask[1:, 2:], pixel_values=px[1:])  # the padded row, unpadded
    torch.testing.assert_close(alone.logits[0], both.logits[1], atol=1e-4, rtol=1e-4)
    assert torch.equal(alone.kept[0][0] + 2, both.kept[0][1][2:])  # padding is never dropped


def test_divprune_keep_everything_is_the_plain_model(llava, llava_prompt):
    ids, mask, px = llava_prompt
    dec = tokenreduce.reduce_decoder(llava, "divprune", keep_ratio=1.0)
    with torch.no_grad():
        full = llava(input_ids=ids, attention_mask=mask, pixel_values=px).logits[:, -1]
        want = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(dec.prefill(ids, mask, pixel_values=px).logits, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(dec.generate(ids, mask, pixel_values=px, max_new_tokens=4), want)


def test_divprune_qwen2_vl_keeps_3_axis_positions():
    """Qwen2-VL with an image and a video: DivPrune selects among the 24 vision tokens of each row on the
    embeddings the model builds; kept tokens keep their original mRoPE positions (the reference rotates the
    cached keys by them) and decoding continues after the vision offset."""
    case = qwen_case()
    model, ids, mask, media, embeds, positions, span, _ = case
    dec = tokenreduce.reduce_decoder(model, "divprune", keep_ratio=0.25)
    pre = dec.prefill(ids, mask, **media)
    ref = RefDecoder(model)
    ref_logits, ref_cache = select_prefill(ref, embeds, mask, span, 0, _divprune_choose(span, 6),
                                           position_ids=positions)
    check_qwen_prefill_and_decode(dec, pre, ref, ref_logits, ref_cache, case)


def test_divprune_settings_are_checked():
    with pytest.raises(TokenReduceError, match="give one layer") as e:
        tokenreduce.reduce_decoder(torch.nn.Linear(1, 1), "divprune", layers=[0, 2])
    assert e.value.setting == "layers"
    with pytest.raises(TokenReduceError, match=r"keep_ratio must be in \(0, 1\]"):
        tokenreduce.reduce_decoder(torch.nn.Linear(1, 1), "divprune", keep_ratio=0.0)


def test_divprune_prefill_exports_to_onnx(tmp_path):
    """The pruned prefill (k-center loop unrolled, constant k) exports and onnxruntime reproduces the eager
    graph, on a Llama with a marked context span (LLaVA's whole prefill: test_vlm_export.py)."""
    pytest.importorskip("onnxruntime")
    import types

    from tokenreduce.targets.onnx import export_onnx

    torch.manual_seed(1)
    ids = torch.randint(3, 128, (1, 24))
    dec = tokenreduce.reduce_decoder(build("llama"), "divprune", keep_ratio=0.25)
    compiled, flat = dec.compiled_for(ids, None, (2, 18))
    assert any(n.target is tr.kcenter_scores.default for n in compiled.gm.graph.nodes)
    shim = types.SimpleNamespace(graph_module=compiled.gm, example_args=tuple(flat), example_kwargs={},
                                 dynamic_batch=False)
    written = export_onnx(shim, tmp_path / "llama_divprune.onnx", verify=True, atol=1e-4)
    assert written.verified and written.max_abs_diff < 1e-4


# ------------------------------------------------------------------------------------------- DART
def test_dart_llava_matches_reference(llava, llava_prompt):
    """Layer 2: pivots from block 1's keys (2 from the image, 2 from the question), the other 6 kept image
    tokens the least similar to them on the hidden states entering block 2."""
    ids, mask, px = llava_prompt
    n = ids.shape[1]
    dec = tokenreduce.reduce_decoder(llava, "dart", layers=[2], keep_ratio=0.5, pivot_image_tokens=2,
                                     pivot_text_tokens=2)
    pre = dec.prefill(ids, mask, pixel_values=px)
    assert dec.report.tokens_per_block == [n, n, n - N_IMG + 8, n - N_IMG + 8]
    embeds, _ = embeds_of(llava, ids, mask, pixel_values=px)
    ref, span = RefDecoder(llava), ids == IMG_ID
    choose = _dart_choose(span, 8, 2, 2)
    ref_logits, ref_cache = select_prefill(ref, embeds, mask, span, 2, choose)
    check_prefill(dec, pre, ref_logits, ref_cache, mask)
    out = dec.generate(ids, mask, pixel_values=px, max_new_tokens=4)
    _, ref_cache = select_prefill(ref, embeds, mask, span, 2, choose)
    want = ref.decode(ref_logits, ref_cache, mask, 4, llava.model.language_model.embed_tokens)
    assert torch.equal(out[:, :n], ids) and torch.equal(out[:, n:], want)


def test_dart_rows_are_selected_alone(llava, llava_prompt):
    ids, mask, px = llava_prompt
    dec = tokenreduce.reduce_decoder(llava, "dart", layers=[2], keep_ratio=0.5, pivot_image_tokens=2,
                                     pivot_text_tokens=2)
    both = dec.prefill(ids, mask, pixel_values=px)
    alone = dec.prefill(ids[1:, 2:], mask[1:, 2:], pixel_values=px[1:])
    torch.testing.assert_close(alone.logits[0], both.logits[1], atol=1e-4, rtol=1e-4)
    assert torch.equal(alone.kept[-1][0] + 2, both.kept[-1][1][2:])


def test_dart_qwen2_vl_matches_reference():
    case = qwen_case()
    model, ids, mask, media, embeds, positions, span, _ = case
    dec = tokenreduce.reduce_decoder(model, "dart", keep_ratio=0.25, pivot_image_tokens=2, pivot_text_tokens=3)
    pre = dec.prefill(ids, mask, **media)
    ref = RefDecoder(model)
    ref_logits, ref_cache = select_prefill(ref, embeds, mask, span, 2, _dart_choose(span, 6, 2, 3),
                                           position_ids=positions)
    check_qwen_prefill_and_decode(dec, pre, ref, ref_logits, ref_cache, case)


@pytest.mark.parametrize("opts, setting, match", [
    (dict(layers=[0]), "layers", r"layers must be >= 1, got \[0\]"),
    (dict(keep_ratio=0.1, pivot_image_tokens=4), "keep_ratio", "keeps 2 of 16 span tokens, fewer than the 4 image"),
    (dict(pivot_image_tokens=0, pivot_text_tokens=0), "pivot_image_tokens", "at least one pivot"),
    (dict(pivot_text_tokens=-1), "pivot_text_tokens", "pivot_text_tokens must be >= 0"),
])
def test_dart_settings_are_checked(llava, llava_prompt, opts, setting, match):
    ids, mask, px = llava_prompt
    with pytest.raises(TokenReduceError, match=match) as e:
        tokenreduce.reduce_decoder(llava, "dart", **opts).prefill(ids, mask, pixel_values=px)
    assert e.value.setting == setting


def test_dart_prefill_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    import types

    from tokenreduce.targets.onnx import export_onnx

    torch.manual_seed(1)
    ids = torch.randint(3, 128, (1, 24))
    dec = tokenreduce.reduce_decoder(build("llama"), "dart", keep_ratio=0.5, pivot_image_tokens=2, pivot_text_tokens=2)
    compiled, flat = dec.compiled_for(ids, None, (2, 18))
    assert any(n.target is tr.dart_scores.default for n in compiled.gm.graph.nodes)
    shim = types.SimpleNamespace(graph_module=compiled.gm, example_args=tuple(flat), example_kwargs={},
                                 dynamic_batch=False)
    written = export_onnx(shim, tmp_path / "llama_dart.onnx", verify=True, atol=1e-4)
    assert written.verified and written.max_abs_diff < 1e-4


# ------------------------------------------------------------------------------------------- VisionZip
def _visionzip_reference(model, px, dominant, contextual):  # type: ignore[no-untyped-def]
    """Per image: the projected features the LLM receives after VisionZip's merge `[B, P, C]`, and the kept
    patch indices. CLS attention and keys of the feature layer computed by hand from its weights."""
    vt, cfg = model.model.vision_tower, model.config
    with torch.no_grad():
        hs = vt(px, output_hidden_states=True).hidden_states
        f = len(hs) + cfg.vision_feature_layer  # hidden_states[f] is layer f-1's output: layer f-1 is read
        layer = (getattr(vt, "vision_model", None) or vt).encoder.layers[f - 1]
        a, h = layer.self_attn, cfg.vision_config.num_attention_heads
        x = torch.nn.functional.layer_norm(hs[f - 1], (hs[f - 1].shape[-1],), layer.layer_norm1.weight,
                                           layer.layer_norm1.bias, layer.layer_norm1.eps)
        b, t, c = x.shape
        q = (x @ a.q_proj.weight.T + a.q_proj.bias).view(b, t, h, -1).transpose(1, 2)
        k = (x @ a.k_proj.weight.T + a.k_proj.bias).view(b, t, h, -1).transpose(1, 2)
        cls = torch.softmax(q[:, :, 0:1] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1).sum(1)[:, 0, 1:]
        metric = k.mean(1)[:, 1:].double()
        feats = hs[f][:, 1:].clone()
        kept_rows = []
        for r in range(b):
            p = feats.shape[1]
            dom = sorted(range(p), key=lambda i: -float(cls[r, i]))[:dominant]
            rest = [i for i in range(p) if i not in dom]
            targets = rest[::max(1, len(rest) // contextual)][:contextual] if contextual else []
            joined: dict[int, list[int]] = {t_: [] for t_ in targets}
            for o in (i for i in rest if i not in targets):
                sims = [float(torch.nn.functional.cosine_similarity(metric[r, o], metric[r, t_], dim=0))
                        for t_ in targets]
                joined[targets[max(range(len(targets)), key=lambda j: (sims[j], -j))]].append(o)
            new = feats[r].clone()
            for t_, group in joined.items():
                if group:
                    new[t_] = feats[r, t_] + feats[r, group].mean(0)
            feats[r] = new
            kept_rows.append(sorted(dom + targets))
        return model.model.multi_modal_projector(feats), kept_rows


def test_visionzip_llava_matches_reference(llava, llava_prompt):
    """keep 8 of 16 image tokens, 2 of them contextual: the vision features are merged before the
    projector, the LLM runs on the dominant patches and the merged targets from layer 0."""
    ids, mask, px = llava_prompt
    n = ids.shape[1]
    dec = tokenreduce.reduce_decoder(llava, "visionzip", keep_ratio=0.5, contextual_ratio=0.25)
    pre = dec.prefill(ids, mask, pixel_values=px)
    assert dec.report.tokens_per_block == [n - N_IMG + 8] * 4
    embeds, _ = embeds_of(llava, ids, mask, pixel_values=px)
    span = ids == IMG_ID
    proj, kept_rows = _visionzip_reference(llava, px, 6, 2)
    embeds = embeds.clone()
    embeds[span] = proj.reshape(-1, proj.shape[-1]).to(embeds.dtype)  # row-major, as the model scatters them

    def choose(r, x, keys, real):  # type: ignore[no-untyped-def]
        pos = torch.nonzero(span[r]).flatten().tolist()
        return [pos[i] for i in kept_rows[r]]

    ref = RefDecoder(llava)
    ref_logits, ref_cache = select_prefill(ref, embeds, mask, span, 0, choose)
    check_prefill(dec, pre, ref_logits, ref_cache, mask)
    out = dec.generate(ids, mask, pixel_values=px, max_new_tokens=4)
    _, ref_cache = select_prefill(ref, embeds, mask, span, 0, choose)
    want = ref.decode(ref_logits, ref_cache, mask, 4, llava.model.language_model.embed_tokens)
    assert torch.equal(out[:, :n], ids) and torch.equal(out[:, n:], want)


def test_visionzip_rows_are_selected_alone_and_keep_everything_is_the_plain_model(llava, llava_prompt):
    ids, mask, px = llava_prompt
    dec = tokenreduce.reduce_decoder(llava, "visionzip", keep_ratio=0.5, contextual_ratio=0.25)
    both = dec.prefill(ids, mask, pixel_values=px)
    alone = dec.prefill(ids[1:, 2:], mask[1:, 2:], pixel_values=px[1:])
    torch.testing.assert_close(alone.logits[0], both.logits[1], atol=1e-4, rtol=1e-4)
    assert torch.equal(alone.kept[0][0] + 2, both.kept[0][1][2:])
    same = tokenreduce.reduce_decoder(llava, "visionzip", keep_ratio=1.0)  # every patch a target: nothing merged
    with torch.no_grad():
        full = llava(input_ids=ids, attention_mask=mask, pixel_values=px).logits[:, -1]
    torch.testing.assert_close(same.prefill(ids, mask, pixel_values=px).logits, full, atol=1e-5, rtol=1e-5)


def test_visionzip_refuses_a_text_model():
    """No vision tower in the graph and none run eagerly (Qwen2-VL's: tests/decoders/test_visionzip_qwen.py)."""
    with pytest.raises(TokenReduceError, match="no bidirectional attention in the captured prefill") as e:
        tokenreduce.reduce_decoder(build("llama"), "visionzip").prefill(torch.randint(3, 100, (1, 12)), span=(2, 8))
    assert e.value.setting == "method"


def test_visionzip_plan_exports_to_onnx(tmp_path):
    """The VisionZip plan op alone (LLaVA's whole prefill: test_vlm_export.py): ONNX export inlines its
    reference and onnxruntime gives the same merged features and kept patches."""
    pytest.importorskip("onnxruntime")
    from tokenreduce.targets.onnx import export_graph

    class Plan(torch.nn.Module):
        def forward(self, feats, q, k):  # type: ignore[no-untyped-def]
            merged, kept = tr.visionzip_plan(feats, q, k, None, 0.25, 5, 3)
            return merged, kept

    torch.manual_seed(5)
    args = (torch.randn(2, 17, 8), torch.randn(2, 2, 17, 4), torch.randn(2, 2, 17, 4))
    gm = torch.export.export(Plan(), args).module()
    written = export_graph(gm, args, {}, tmp_path / "visionzip_plan.onnx", verify=True, atol=1e-5, dynamic_batch=False)
    assert written.verified and written.max_abs_diff < 1e-5
