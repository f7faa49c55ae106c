"""LLaVA-NeXT (AnyRes: a thumbnail plus the crops of a grid chosen from `image_sizes`, unpadded, a newline
token after each row of patches) through `reduce_decoder`, on a tiny random-init model, checked against the
independent reference in tests/decoder_reference.py (a hand-written eager prefill from the language model's
input embeddings as the model itself builds them, which drops what the papers' rules drop).

`image_sizes` decides the image token count by python arithmetic (grid choice, unpadding), so the prefill
graph is specialised on its values: batch 2 with *different* image sizes whose token counts are equal
works, each row with its own AnyRes layout; rows whose counts differ are refused with the counts. FastV,
DivPrune and DART match the reference (logits, every layer's cache and kept positions, greedy generate());
`keep_ratio=1` is the plain model and `model.generate`; a second call with other image sizes recompiles
rather than reusing a graph specialised on the first. ONNX export of the whole prefill: test_vlm_export.py."""

from __future__ import annotations

import math

import pytest
import torch
from decoder_reference import RefDecoder, check_prefill, dart_select, divprune_select, embeds_of, select_prefill

import tokenreduce
from tokenreduce import TokenReduceError

transformers = pytest.importorskip("transformers")

IMG = 150  # image token id
SIZES = [[32, 64], [30, 64]]  # both: a 1 x 2 grid of 32 px crops; 16 thumbnail + 4 rows x (8 + newline) = 52 tokens
N_IMG = 52


def tiny_llava_next():  # type: ignore[no-untyped-def]
    """Random-init LLaVA-NeXT: CLIP tower (2 layers, 32 px, patch 8: 16 patches + CLS), Llama LM (4 layers, GQA),
    grid pinpoints 32x64 / 64x32 / 64x64; language-model q/k sharpened x4 and vision q/k x3 so a wrong
    selection changes the tokens."""
    torch.manual_seed(0)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8)
    tc = transformers.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg = transformers.LlavaNextConfig(vision_config=vc, text_config=tc, image_token_id=IMG, vision_feature_layer=-2,
                                       vision_feature_select_strategy="default",
                                       image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    cfg._attn_implementation = "sdpa"
    model = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight *= 4
            layer.self_attn.k_proj.weight *= 4
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight *= 3
            layer.self_attn.k_proj.weight *= 3
    return model


def next_prompt(sizes=SIZES, n_img=N_IMG):  # type: ignore[no-untyped-def]
    """Two rows: 3 text tokens, the image's tokens, 5 text tokens; row 1 left-padded by two.
    (ids, mask, media) with pixel_values `[B, 3 patches, 3, 32, 32]` and image_sizes."""
    torch.manual_seed(1)
    ids = torch.cat([torch.randint(3, 100, (2, 3)), torch.full((2, n_img), IMG), torch.randint(3, 100, (2, 5))], 1)
    ids[1, :2] = 0
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask, dict(pixel_values=torch.randn(2, 3, 3, 32, 32), image_sizes=torch.tensor(sizes))


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return tiny_llava_next()


@pytest.fixture(scope="module")
def case(model):  # type: ignore[no-untyped-def]
    ids, mask, media = next_prompt()
    embeds, _ = embeds_of(model, ids, mask, **media)
    return ids, mask, media, embeds


def test_tiny_model_has_the_anyres_layout_this_file_assumes(model, case):
    """Both image sizes give 52 image tokens (thumbnail 16, 1 x 2 crops unpadded to 4 x 8, 4 newlines)."""
    ids, mask, media, embeds = case
    feats = model.model.get_image_features(media["pixel_values"], media["image_sizes"]).pooler_output
    assert [f.shape[0] for f in feats] == [N_IMG, N_IMG]
    newline = model.model.image_newline
    assert all(int((f == newline).all(-1).sum()) == 4 for f in feats)


@pytest.mark.parametrize("method", ["fastv", "divprune", "dart"])
def test_keep_everything_is_the_plain_model(model, case, method):
    ids, mask, media, _ = case
    dec = tokenreduce.reduce_decoder(model, method, keep_ratio=1.0)
    pre = dec.prefill(ids, mask, **media)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, **media).logits[:, -1]
    torch.testing.assert_close(pre.logits, want, atol=1e-5, rtol=1e-5)
    assert dec.report.span_tokens == N_IMG
    out = dec.generate(ids, mask, max_new_tokens=4, **media)
    assert torch.equal(out, model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                           **media))


def test_fastv_matches_reference_and_generates(model, case):
    ids, mask, media, embeds = case
    n, keep = ids.shape[1], math.ceil(0.5 * N_IMG)
    dec = tokenreduce.reduce_decoder(model, "fastv", layers=[2], keep_ratio=0.5)
    pre = dec.prefill(ids, mask, **media)
    assert dec.report.tokens_per_block == [n, n, n - N_IMG + keep, n - N_IMG + keep]
    ref = RefDecoder(model)
    ref_logits, ref_cache = ref.prefill(embeds, mask, ids == IMG, [(1, 2, keep)])
    check_prefill(dec, pre, ref_logits, ref_cache, mask)
    out = dec.generate(ids, mask, max_new_tokens=4, **media)
    want = ref.decode(ref_logits, ref_cache, mask, 4, model.model.language_model.embed_tokens)
    assert torch.equal(out[:, :n], ids) and torch.equal(out[:, n:], want)


def _divprune(span, keep):  # type: ignore[no-untyped-def]
    def choose(r, x, keys, real):  # type: ignore[no-untyped-def]
        pos = torch.nonzero(span[r]).flatten().tolist()
        return [pos[i] for i in divprune_select(x[pos].double().tolist(), keep)]
    return choose


def _dart(span, keep):  # type: ignore[no-untyped-def]
    def choose(r, x, keys, real):  # type: ignore[no-untyped-def]
        l1 = keys.float().abs().sum((0, 2)).tolist()
        return dart_select(x.double().tolist(), l1, span[r].tolist(), real.tolist(), keep, 4, 4)
    return choose


@pytest.mark.parametrize("method,layer,ratio,chooser", [("divprune", 0, 0.25, _divprune), ("dart", 2, 0.3, _dart)])
def test_selection_methods_match_reference_and_generate(model, case, method, layer, ratio, chooser):
    """Each row selects among its own 52 image tokens (thumbnail, crops and newline tokens alike)."""
    ids, mask, media, embeds = case
    n, keep, span = ids.shape[1], math.ceil(ratio * N_IMG), ids == IMG
    dec = tokenreduce.reduce_decoder(model, method, keep_ratio=ratio, layers=[layer])
    pre = dec.prefill(ids, mask, **media)
    ref = RefDecoder(model)
    ref_logits, ref_cache = select_prefill(ref, embeds, mask, span, layer, chooser(span, keep))
    check_prefill(dec, pre, ref_logits, ref_cache, mask)
    out = dec.generate(ids, mask, max_new_tokens=4, **media)
    _, ref_cache = select_prefill(ref, embeds, mask, span, layer, chooser(span, keep))
    want = ref.decode(ref_logits, ref_cache, mask, 4, model.model.language_model.embed_tokens)
    assert torch.equal(out[:, :n], ids) and torch.equal(out[:, n:], want)


def test_a_row_alone_is_its_row_of_the_batch(model, case):
    """Row 0 pruned alone with its own image size gives its row of the batch (rows with different image sizes
    do not see each other's layout)."""
    ids, mask, media, _ = case
    dec = tokenreduce.reduce_decoder(model, "divprune", keep_ratio=0.25)
    both = dec.prefill(ids, mask, **media)
    one = dec.prefill(ids[:1], mask[:1], pixel_values=media["pixel_values"][:1], image_sizes=media["image_sizes"][:1])
    torch.testing.assert_close(one.logits, both.logits[:1], atol=1e-5, rtol=1e-5)
    assert torch.equal(one.kept[0], both.kept[0][:1])


def test_other_image_sizes_recompile(model):
    """The graph is specialised on image_sizes values: other sizes (20 x 64 and 16 x 64 unpad to 2 patch rows:
    16 + 2 x 9 = 34 tokens) get their own graph, and each matches the model."""
    dec = tokenreduce.reduce_decoder(model, "fastv", keep_ratio=1.0)
    for sizes, n_img in ([[32, 64], [32, 64]], N_IMG), ([[20, 64], [16, 64]], 34), (SIZES, N_IMG):
        ids, mask, media = next_prompt(sizes, n_img)
        pre = dec.prefill(ids, mask, **media)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, **media).logits[:, -1]
        torch.testing.assert_close(pre.logits, want, atol=1e-5, rtol=1e-5)
        assert dec.report.span_tokens == n_img


def test_rows_with_different_image_token_counts_are_refused(model):
    """32 x 64 (1 x 2 grid: 52 tokens) and 64 x 32 (2 x 1 grid: 16 + 8 rows x (4 + newline) = 56) in one batch:
    the span sizes differ, so the static keep count cannot serve both; refused with the counts."""
    ids, mask, media = next_prompt()
    ids = torch.cat([torch.cat([ids[:1, :3], torch.full((1, 4), 7), ids[:1, 3:]], 1),
                     torch.cat([ids[1:, :3], torch.full((1, 4), IMG), ids[1:, 3:]], 1)])
    mask = torch.cat([torch.ones(1, ids.shape[1], dtype=torch.long), torch.ones(1, ids.shape[1], dtype=torch.long)])
    media["image_sizes"] = torch.tensor([[32, 64], [64, 32]])
    dec = tokenreduce.reduce_decoder(model, "fastv", keep_ratio=0.5)
    with pytest.raises(TokenReduceError, match=r"same number of span tokens.*\[52, 56\]"):
        dec.prefill(ids, mask, **media)
