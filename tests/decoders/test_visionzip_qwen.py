"""VisionZip on Qwen2-VL / Qwen2.5-VL (tiny random configs): the vision tower runs eagerly (its token count
depends on `image_grid_thw` values), so the merged visual tokens are scored and merged there by hooks, and the
LLM's prefill is pruned at layer 0 in the captured graph.

The reference here is written from the paper's arithmetic with what the model itself computes, grabbed by
hooks on the vision tower: the scoring block's `qkv` output, rotated by hand; each patch's attention received
(softmax by hand per frame, column mean over queries and heads), summed over each 2x2 merger group; the
groups' order found by matching the merger's rows with the tower's output (Qwen2.5-VL runs the tower in window
order); the selection and merge in python lists; the merged features through the model's own merger; then the
hand-written pruned prefill (`select_prefill`) on the model's own 3-axis positions. Checked: logits, every
layer's cache and kept positions, greedy `generate()`, `keep_ratio=1` against the plain model, ONNX export of
the pruned prefill, and the refusals.
"""

from __future__ import annotations

import math

import pytest
import torch
from decoder_reference import RefDecoder, check_prefill, embeds_of, select_prefill, sharpened
from decoders.families import IMAGE, VIDEO, VISION_END, VISION_START, build

import tokenreduce
from tokenreduce.errors import TokenReduceError

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


def _prompt():  # type: ignore[no-untyped-def]
    """Row 0: one image of grid [1, 8, 8] (16 tokens), then a video [2, 4, 4] (2 frames of 4 tokens); row 1:
    two images [1, 4, 8] (8 tokens each, a different size and count), then the same-size video. Row 0 is
    left-padded by one so both rows have 38 tokens and 24 vision tokens. (ids, mask, media, mm_token_type_ids)"""
    torch.manual_seed(2)

    def text(k: int) -> torch.Tensor:
        return torch.randint(3, 100, (k,))

    def media(tok: int, n: int) -> list[torch.Tensor]:
        return [torch.tensor([VISION_START]), torch.full((n,), tok), torch.tensor([VISION_END])]

    row0 = torch.cat([torch.zeros(1, dtype=torch.long), text(3), *media(IMAGE, 16), text(2), *media(VIDEO, 8),
                      text(4)])
    row1 = torch.cat([text(3), *media(IMAGE, 8), text(1), *media(IMAGE, 8), *media(VIDEO, 8), text(4)])
    ids = torch.stack([row0, row1])
    mask = torch.ones_like(ids)
    mask[0, :1] = 0
    grids = torch.tensor([[1, 8, 8], [1, 4, 8], [1, 4, 8]])
    media_in = dict(pixel_values=torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14), image_grid_thw=grids,
                    pixel_values_videos=torch.randn(2 * 32, 3 * 2 * 14 * 14),
                    video_grid_thw=torch.tensor([[2, 4, 4]] * 2))
    types = torch.zeros_like(ids, dtype=torch.int).masked_fill(ids == IMAGE, 1).masked_fill(ids == VIDEO, 2)
    return ids, mask, media_in, types


def _rot_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def _hamilton(keep: int, sizes: list[int]) -> list[int]:
    """Largest-remainder apportionment of `keep` over `sizes` (ties to the earlier), with fractions."""
    from fractions import Fraction

    exact = [Fraction(keep * s, sum(sizes)) for s in sizes]
    out = [int(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: (-(exact[i] - int(exact[i])), i))[:keep - sum(out)]:
        out[i] += 1
    return out


def _grab_vision(model, ids, mask, media, types):  # type: ignore[no-untyped-def]
    """Run the model; per vision-tower call (images, then videos) what the reference needs."""
    visual = model.model.visual
    attn = visual.blocks[-1].attn  # the last block (full attention in both tiny towers) feeds the merger
    calls: list[dict] = []
    hooks = [visual.register_forward_pre_hook(lambda m, a, k: calls.append({}), with_kwargs=True),
             attn.register_forward_pre_hook(lambda m, a, k: calls[-1].update(cu=k["cu_seqlens"],
                                                                             cs=k["position_embeddings"]),
                                            with_kwargs=True),
             attn.qkv.register_forward_hook(lambda m, a, o: calls[-1].update(qkv=o)),
             visual.merger.register_forward_hook(lambda m, a, o: calls[-1].update(x=a[0], out=o)),
             visual.register_forward_hook(lambda m, a, o: calls[-1].update(pooled=o.pooler_output))]
    embeds, positions = embeds_of(model, ids, mask, mm_token_type_ids=types, **media)
    for h in hooks:
        h.remove()
    return embeds, positions, calls, attn.num_heads


def _reference_features(model, call, heads, segments):  # type: ignore[no-untyped-def]
    """The merged visual tokens (raster order) and kept group indices, for segments [(start, groups, keep)]."""
    x, qkv, (cos, sin), cu = call["x"], call["qkv"], call["cs"], call["cu"].tolist()
    p, c = x.shape
    q, k, _ = qkv.view(p, 3, heads, -1).float().unbind(1)  # [P, H, d]
    q = q * cos[:, None].float() + _rot_half(q) * sin[:, None].float()
    k = k * cos[:, None].float() + _rot_half(k) * sin[:, None].float()
    received = torch.zeros(p)
    for a, b in zip(cu[:-1], cu[1:]):
        probs = torch.softmax((q[a:b].transpose(0, 1) @ k[a:b].permute(1, 2, 0)) * q.shape[-1] ** -0.5, -1)
        received[a:b] = probs.mean(0).mean(0)
    g = p // 4
    # raster group j is window-order group order[j]: the merger's row that the tower's output row j equals
    out, pooled = call["out"], call["pooled"]
    order = [next(i for i in range(g) if torch.equal(out[i], pooled[j])) for j in range(g)]
    score = received.view(g, 4).sum(-1)[order]
    key = k.mean(1).view(g, 4, -1).mean(1)[order]
    feats = x.view(g, 4, c)[order].clone()
    new, kept = feats.clone(), []
    for start, groups, keep in segments:
        contextual = min(keep, round(0.25 * keep))
        dominant = keep - contextual
        idx = list(range(start, start + groups))
        dom = sorted(idx, key=lambda i: (-float(score[i]), i))[:dominant]
        rest = [i for i in idx if i not in dom]
        targets = rest[::max(1, len(rest) // contextual)][:contextual] if contextual else []
        joined: dict[int, list[int]] = {t: [] for t in targets}
        for o in [i for i in rest if i not in targets] if targets else []:  # no target: the rest is dropped
            sims = [float(torch.nn.functional.cosine_similarity(key[o], key[t], dim=0)) for t in targets]
            joined[targets[max(range(len(targets)), key=lambda j: (sims[j], -j))]].append(o)
        for t, group in joined.items():
            if group:
                new[t] = feats[t] + feats[group].mean(0)
        kept += dom + targets
    window_order = torch.empty(g, dtype=torch.long)
    window_order[torch.tensor(order)] = torch.arange(g)
    with torch.no_grad():
        merged = model.model.visual.merger(new[window_order].reshape(p, c))
    return merged[torch.tensor(order)], sorted(kept)


def _reference(model, ids, mask, media, types, keep_ratio):  # type: ignore[no-untyped-def]
    """(embeds with merged visual tokens, 3-axis positions, span, kept span positions per row)."""
    embeds, positions, calls, heads = _grab_vision(model, ids, mask, media, types)
    # segments: each image, each video frame; per row, `ceil(keep_ratio * 24)` split in proportion to their sizes
    image_sizes = [int(h * w) // 4 for _, h, w in media["image_grid_thw"].tolist()]
    frames = [(int(t), int(h * w) // 4) for t, h, w in media["video_grid_thw"].tolist()]
    span = (ids == IMAGE) | (ids == VIDEO)
    per_row: list[list[tuple[str, int, int, int]]] = [[], []]  # (kind, start in its call, groups, first position)
    for kind, sizes in (("image", image_sizes), ("video", [g for t, g in frames for _ in range(t)])):
        where = (ids == (IMAGE if kind == "image" else VIDEO)).nonzero().tolist()
        start = 0
        for g in sizes:
            per_row[where[start][0]].append((kind, start, g, where[start][1]))
            start += g
    keep_of: dict[tuple[str, int], int] = {}
    for segs in per_row:
        segs.sort(key=lambda s: s[3])
        total = sum(s[2] for s in segs)
        for s, kp in zip(segs, _hamilton(math.ceil(keep_ratio * total), [s[2] for s in segs])):
            keep_of[(s[0], s[1])] = kp
    embeds = embeds.clone()
    kept_pos: list[list[int]] = [[], []]
    for kind, call, tok in (("image", calls[0], IMAGE), ("video", calls[1], VIDEO)):
        segments = sorted((s, g, keep_of[(kind, s)]) for r in per_row for (kd, s, g, _) in r if kd == kind)
        feats, kept = _reference_features(model, call, heads, segments)
        where = (ids == tok).nonzero().tolist()
        embeds[ids == tok] = feats.to(embeds.dtype)
        for i in kept:
            kept_pos[where[i][0]].append(where[i][1])
    return embeds, positions, span, [sorted(r) for r in kept_pos]


@pytest.mark.parametrize("family", FAMILIES)
def test_visionzip_qwen_matches_reference(family):
    """keep 12 of each row's 24 vision tokens, a quarter of them contextual: per row, the image(s) and video
    frames each keep their share; logits, caches, original 3-axis positions and greedy tokens as the reference."""
    model = sharpened(build(family))
    ids, mask, media, types = _prompt()
    n = ids.shape[1]
    dec = tokenreduce.reduce_decoder(model, "visionzip", keep_ratio=0.5, contextual_ratio=0.25)
    pre = dec.prefill(ids, mask, **media)
    assert dec.report.tokens_per_block == [n - 24 + 12] * 4
    embeds, positions, span, kept = _reference(model, ids, mask, media, types, 0.5)
    deltas = model.model.rope_deltas
    ref = RefDecoder(model)
    ref_logits, ref_cache = select_prefill(ref, embeds, mask, span, 0, lambda r, x, keys, real: kept[r],
                                           position_ids=positions)
    check_prefill(dec, pre, ref_logits, ref_cache, mask)
    out = dec.generate(ids, mask, max_new_tokens=4, **media)
    steps = ref.decode(ref_logits, ref_cache, mask, 4, next_pos=mask.sum(-1) + deltas[:, 0])
    assert torch.equal(out[:, :n], ids) and torch.equal(out[:, n:], steps)
    assert torch.equal(media["image_grid_thw"], torch.tensor([[1, 8, 8], [1, 4, 8], [1, 4, 8]]))  # untouched


@pytest.mark.parametrize("family", FAMILIES)
def test_visionzip_qwen_keep_everything_is_the_plain_model(family):
    model = sharpened(build(family))
    ids, mask, media, types = _prompt()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, **media).logits[:, -1]
        want = model.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, max_new_tokens=4,
                              do_sample=False, **media)
    same = tokenreduce.reduce_decoder(model, "visionzip", keep_ratio=1.0)
    torch.testing.assert_close(same.prefill(ids, mask, **media).logits, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(same.generate(ids, mask, max_new_tokens=4, **media), want)


def test_visionzip_qwen_prefill_exports_to_onnx(tmp_path):
    """The pruned prefill (from the language model's embeddings, with the eager vision scores as a graph input)
    exports, and onnxruntime reproduces the eager graph on the left-padded prompt: logits, kept positions and
    the cache at real tokens (the exporter's own all-outputs check is off: a padding query row attends to
    nothing, so its keys/values in later layers are don't-care values that the two runtimes fill differently,
    as for FastV's Qwen prefill; unpadded, every output agrees to 2e-7)."""
    pytest.importorskip("onnxruntime")
    from tokenreduce.targets.onnx import export_graph, run_onnx

    model = build("qwen2_vl")
    ids, mask, media, _ = _prompt()
    dec = tokenreduce.reduce_decoder(model, "visionzip", keep_ratio=0.5)
    compiled, flat = dec.compiled_for(ids, mask, **media)
    assert "vision_scores" in compiled.names
    export_graph(compiled.gm, tuple(flat), {}, tmp_path / "padded.onnx", verify=False, dynamic_batch=False)
    got = run_onnx(tmp_path / "padded.onnx", tuple(flat), {})
    with torch.no_grad():
        logits, ks, vs, kept = compiled.gm(*flat)
    layers = len(ks)
    torch.testing.assert_close(got[0], logits, atol=1e-4, rtol=1e-4)
    for i, idx in enumerate(kept):
        assert torch.equal(got[1 + 2 * layers + i], idx)
        real = mask.bool().gather(1, idx)[:, None, :, None]
        for j, want in ((1 + i, ks[i]), (1 + layers + i, vs[i])):
            torch.testing.assert_close(got[j] * real, want * real, atol=1e-4, rtol=1e-4)


def test_visionzip_qwen_refusals():
    model = build("qwen2_vl")
    ids, mask, media, _ = _prompt()
    dec = tokenreduce.reduce_decoder(model, "visionzip", keep_ratio=0.5)
    with pytest.raises(TokenReduceError, match="selects among the image/video tokens") as e:
        dec.prefill(ids, mask, span=(5, 30), **media)  # a span that is not the vision tokens
    assert e.value.setting == "span"
    bad = dict(media, image_grid_thw=torch.tensor([[1, 8, 8], [1, 4, 8], [1, 4, 4]]))
    with pytest.raises(TokenReduceError, match="image_grid_thw gives 28 image tokens but the prompt has 32"):
        dec.prefill(ids, mask, **bad)
    with pytest.raises(TokenReduceError, match=r"visionzip selects before the LLM \(layer 0\)"):
        tokenreduce.reduce_decoder(model, "visionzip", layers=[2])
