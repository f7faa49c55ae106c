"""Qwen2-VL / Qwen2.5-VL with an image and a video (tiny random configs), left padding in one row.

* Every model input reaches the model (`pixel_values`, `image_grid_thw`, `pixel_values_videos`,
  `video_grid_thw`; `mm_token_type_ids` built from the config's token ids when not given).
* The span is found from the config's `image_token_id` / `video_token_id`.
* `keep_ratio=1` reproduces the model's own logits and `model.generate` tokens exactly.
* FastV against the independent reference (tests/decoder_reference.py, mRoPE arithmetic), fed the
  embeddings and 3-axis position ids the model itself builds (grabbed here by a hook): prefill logits,
  caches, kept positions, and greedy tokens, where decoding continues at `real tokens + rope delta`.
  Kept tokens keep their original 3-axis positions (the cached keys are rotated by them).
"""

from __future__ import annotations

import pytest
import torch
from decoder_reference import RefDecoder
from decoders.families import IMAGE, VIDEO, VISION_END, VISION_START, build

import tokenreduce

N_IMAGE, N_VIDEO = 16, 8  # grids [1, 8, 8] and [2, 4, 4] with spatial merge 2


def _prompt():  # type: ignore[no-untyped-def]
    torch.manual_seed(2)

    def row(pad: int) -> torch.Tensor:
        def text(k: int) -> torch.Tensor:
            return torch.randint(3, 100, (k,))

        return torch.cat([torch.zeros(pad, dtype=torch.long), text(5 - pad), torch.tensor([VISION_START]),
                          torch.full((N_IMAGE,), IMAGE), torch.tensor([VISION_END]), text(2),
                          torch.tensor([VISION_START]), torch.full((N_VIDEO,), VIDEO), torch.tensor([VISION_END]),
                          text(4)])

    ids = torch.stack([row(0), row(2)])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    media = dict(pixel_values=torch.randn(2 * 64, 3 * 2 * 14 * 14), image_grid_thw=torch.tensor([[1, 8, 8]] * 2),
                 pixel_values_videos=torch.randn(2 * 32, 3 * 2 * 14 * 14),
                 video_grid_thw=torch.tensor([[2, 4, 4]] * 2))
    return ids, mask, media


def _sharpen(model):  # type: ignore[no-untyped-def]
    """Sharper attention than random init's near-uniform one, so a wrong position changes the tokens."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight *= 8
            layer.self_attn.k_proj.weight *= 8
    return model


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vl_image_and_video(family):
    model = _sharpen(build(family))
    ids, mask, media = _prompt()
    n = ids.shape[1]
    types = torch.zeros_like(ids, dtype=torch.int).masked_fill(ids == IMAGE, 1).masked_fill(ids == VIDEO, 2)
    grabbed: dict = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, k: grabbed.update(k), with_kwargs=True)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, **media).logits[:, -1]
    hook.remove()
    deltas = model.model.rope_deltas
    assert grabbed["position_ids"].shape[0] == 3 and int(deltas.abs().max()) > 0  # real mRoPE offsets
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, max_new_tokens=5,
                              do_sample=False, **media)

    same = tokenreduce.reduce_decoder(model, "fastv", layers=[2], keep_ratio=1.0)
    torch.testing.assert_close(same.prefill(ids, mask, **media).logits, full, atol=1e-5, rtol=1e-5)
    assert same.report.span_tokens == N_IMAGE + N_VIDEO
    assert torch.equal(same.generate(ids, mask, max_new_tokens=5, **media), want)

    dec = tokenreduce.reduce_decoder(model, "fastv", layers=[2], keep_ratio=0.25)
    pre = dec.prefill(ids, mask, **media)
    assert any("ran eagerly" in note for note in dec.report.notes)
    ref = RefDecoder(model)
    span = (ids == IMAGE) | (ids == VIDEO)
    stages = [(1, 2, 6)]
    ref_logits, ref_cache = ref.prefill(grabbed["inputs_embeds"], mask, span, stages,
                                        position_ids=grabbed["position_ids"])
    torch.testing.assert_close(pre.logits, ref_logits, atol=1e-4, rtol=1e-4)
    for layer, (k, v, idx) in zip(pre.cache.layers, ref_cache, strict=True):
        assert torch.equal(layer.positions, idx)
        valid = mask.bool().gather(1, idx)[:, None, :, None]
        torch.testing.assert_close(layer.keys * valid, k * valid, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.values * valid, v * valid, atol=1e-4, rtol=1e-4)
    assert pre.cache.kept_tokens[-1] == n - (N_IMAGE + N_VIDEO) + 6
    out = dec.generate(ids, mask, max_new_tokens=5, **media)
    steps = ref.decode(ref_logits, ref_cache, mask, 5, next_pos=mask.sum(-1) + deltas[:, 0])
    assert torch.equal(out[:, :n], ids) and torch.equal(out[:, n:], steps)


def test_text_only_prompt_after_an_image_prompt():
    """A text-only prompt on an mRoPE model decodes without the previous prompt's vision offset (the model's
    own generate resets `rope_deltas` to zero for it; so does the pruned prefill)."""
    model = _sharpen(build("qwen2_vl"))
    stale = torch.tensor([[100], [100]])  # left over from an earlier image prompt
    model.model.rope_deltas = stale
    torch.manual_seed(3)
    ids = torch.randint(3, 100, (2, 20))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    model.model.rope_deltas = stale
    dec = tokenreduce.reduce_decoder(model, "fastv", layers=[2], keep_ratio=1.0)
    assert torch.equal(dec.generate(ids, mask, (2, 15), max_new_tokens=8), want)
