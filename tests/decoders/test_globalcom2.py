"""GlobalCom2 on a tiny random-init LLaVA-NeXT, against an independent reference written here from the paper
and the official code's arithmetic (xuyang-liu16/GlobalCom2, `llava_arch.py`):

* the AnyRes layout by hand (thumbnail patches in order; then the crop grid's rows, unpadded as transformers'
  `unpad_image` does, each followed by a newline token);
* each image's CLS attention computed by hand from the CLIP layer the projector reads (layer norm, q/k
  projections, softmax over CLS + patches, mean over heads);
* crop retentions `min(1, r * (1 + softmax(region sums / 10) - mean))` from the thumbnail's attention summed
  over each crop's region; crop token scores = L2-normalised own attention + L2-normalised thumbnail
  attention bilinearly interpolated (`F.interpolate`, as the official code) to the unpadded grid;
* the exact total budget apportioned seat by seat (highest average `w / (seats + 0.5)`), newlines first;

fed to the hand-written eager prefill of tests/decoder_reference.py that drops the same tokens. Compared:
logits, every layer's cache and kept positions, greedy `generate()`; batch 2 with different image sizes;
`keep_ratio=1` is the plain model; refusals (non-AnyRes models with the methods that work there, settings);
the op through ONNX export verified in onnxruntime (the whole pruned prefill: test_vlm_export.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from decoder_reference import RefDecoder, check_prefill, embeds_of, select_prefill, tiny_llava
from decoders.test_llava_next import IMG, N_IMG, next_prompt, tiny_llava_next

import tokenreduce
from tokenreduce import TokenReduceError

transformers = pytest.importorskip("transformers")
tr = torch.ops.tokenreduce
SIDE, P = 4, 16  # the tiny CLIP's patch grid (32 px / 8)


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return tiny_llava_next()


@pytest.fixture(scope="module")
def case(model):  # type: ignore[no-untyped-def]
    ids, mask, media = next_prompt()
    embeds, _ = embeds_of(model, ids, mask, **media)
    return ids, mask, media, embeds


# ------------------------------------------------------------------------------------------- reference
def _unpadded(rows: int, cols: int, size: list[int]) -> tuple[range, range]:
    """Rows / columns of the padded crop grid transformers' `unpad_image` keeps (size = original (h, w))."""
    h, w = size
    if w / h > cols / rows:
        new = int(round(h * (cols / w), 7))
        pad = (rows - new) // 2
        return range(pad, rows - pad), range(cols)
    new = int(round(w * (rows / h), 7))
    pad = (cols - new) // 2
    return range(rows), range(pad, cols - pad)


def _layout(nh: int, nw: int, size: list[int]) -> list[tuple[int, int, int, int]]:
    """Per image token, in order: (group, patch, global row, global col); group 0 = thumbnail, c >= 1 = crop c
    (row-major in the nh x nw grid), -1 = newline."""
    out = [(0, p, -1, -1) for p in range(P)]
    rows, cols = _unpadded(nh * SIDE, nw * SIDE, size)
    for r in rows:
        for c in cols:
            out.append((1 + (r // SIDE) * nw + c // SIDE, (r % SIDE) * SIDE + c % SIDE, r, c))
        out.append((-1, -1, r, -1))
    return out


def _cls_attention(model, pixels):  # type: ignore[no-untyped-def]
    """[V, P] CLS attention of the vision layer the projector reads (vision_feature_layer -2 of 2: layer 0)."""
    tower = model.model.vision_tower
    with torch.no_grad():
        x = tower(pixels, output_hidden_states=True).hidden_states[0]
        att = tower.encoder.layers[0].self_attn
        xn = tower.encoder.layers[0].layer_norm1(x)
        v, n, _ = xn.shape
        q = att.q_proj(xn).view(v, n, 2, -1).transpose(1, 2)
        k = att.k_proj(xn).view(v, n, 2, -1).transpose(1, 2)
        probs = ((q[:, :, :1] @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1).mean(1)
    return probs[:, 0, 1:].double()


def globalcom2_select(cls: torch.Tensor, layout, keep: int, ratio: float, nh: int, nw: int,  # type: ignore[no-untyped-def]
                      temperature: float = 10.0) -> list[int]:
    """Indices into the image's tokens kept by GlobalCom2. `cls [1 + crops, P]` (thumbnail first)."""
    thumb = cls[0].tolist()
    # crop budgets: the thumbnail's attention summed over each crop's region (official partition)
    ph, pw = max(SIDE // nh, 1), max(SIDE // nw, 1)
    sums = [0.0] * (nh * nw)
    for p, s in enumerate(thumb):
        i, j = divmod(p, SIDE)
        sums[min(i // ph, nh - 1) * nw + min(j // pw, nw - 1)] += s
    e = [math.exp((s - max(sums)) / temperature) for s in sums]
    sm = [x / (sum(e) + 1e-8) for x in e]
    scales = [min(1.0, ratio * (1 + x - sum(sm) / len(sm))) for x in sm]
    # crop token scores: own attention and the interpolated thumbnail attention, each L2-normalised per crop
    crop_cells = [(g, p, r, c) for g, p, r, c in layout if g >= 1]
    r0, c0 = min(t[2] for t in crop_cells), min(t[3] for t in crop_cells)
    hu, wu = max(t[2] for t in crop_cells) - r0 + 1, max(t[3] for t in crop_cells) - c0 + 1
    interp = F.interpolate(cls[0].view(1, 1, SIDE, SIDE), size=(hu, wu), mode="bilinear", align_corners=False)[0, 0]
    score: dict[int, float] = {}
    groups: dict[int, list[int]] = {}
    for t, (g, *_) in enumerate(layout):
        if g >= 0:
            groups.setdefault(g, []).append(t)
    for g, members in groups.items():
        own = [float(cls[g, layout[t][1]]) for t in members]
        if g == 0:
            score.update(zip(members, own))
            continue
        glob = [float(interp[layout[t][2] - r0, layout[t][3] - c0]) for t in members]
        no, ng = math.sqrt(sum(v * v for v in own)), math.sqrt(sum(v * v for v in glob))
        for t, a, b in zip(members, own, glob):
            score[t] = a / max(no, 1e-12) + b / max(ng, 1e-12)
    weight = {g: len(m) * (ratio if g == 0 else scales[g - 1]) for g, m in groups.items()}
    ranked = {g: sorted(m, key=lambda t: (-score[t], t)) for g, m in groups.items()}
    kept = [t for t, (g, *_) in enumerate(layout) if g == -1][:keep]  # newlines first
    seats = dict.fromkeys(groups, 0)
    while len(kept) < keep:  # highest average w / (seats + 0.5); ties to the group whose next token is earlier
        open_ = [g for g in groups if seats[g] < len(groups[g])]
        g = min(open_, key=lambda g: ((seats[g] + 0.5) / weight[g], ranked[g][seats[g]]))
        kept.append(ranked[g][seats[g]])
        seats[g] += 1
    return sorted(kept)


def _choose(model, ids, media, ratio, grids, temperature=10.0):  # type: ignore[no-untyped-def]
    """`select_prefill`'s chooser: per row, the positions GlobalCom2 keeps among its image tokens."""
    cls_all = _cls_attention(model, media["pixel_values"].flatten(0, 1))  # every row has 3 patches (1 x 2 grid)
    sizes = media["image_sizes"].tolist()

    def choose(r, x, keys, real):  # type: ignore[no-untyped-def]
        pos = torch.nonzero(ids[r] == IMG).flatten().tolist()
        nh, nw = grids[r]
        layout = _layout(nh, nw, sizes[r])
        assert len(layout) == len(pos)
        keep = math.ceil(ratio * len(pos))
        cls = cls_all[r * 3:(r + 1) * 3]
        return [pos[i] for i in globalcom2_select(cls, layout, keep, ratio, nh, nw, temperature)]
    return choose


# ------------------------------------------------------------------------------------------- tests
def test_layout_by_hand_is_the_models(model, case):
    """The hand layout above places the newline tokens where the model's packed features have image_newline."""
    ids, mask, media, embeds = case
    newline = model.model.image_newline
    for r, size in enumerate(media["image_sizes"].tolist()):
        img = embeds[r][ids[r] == IMG]
        got = [i for i in range(N_IMG) if bool((img[i] == newline).all())]
        assert got == [i for i, t in enumerate(_layout(1, 2, size)) if t[0] == -1]


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_globalcom2_matches_reference_and_generates(model, case, ratio):
    ids, mask, media, embeds = case
    n, keep = ids.shape[1], math.ceil(ratio * N_IMG)
    dec = tokenreduce.reduce_decoder(model, "globalcom2", keep_ratio=ratio)
    pre = dec.prefill(ids, mask, **media)
    assert dec.report.tokens_per_block == [n - N_IMG + keep] * 4
    ref, span = RefDecoder(model), ids == IMG
    choose = _choose(model, ids, media, ratio, [(1, 2), (1, 2)])
    ref_logits, ref_cache = select_prefill(ref, embeds, mask, span, 0, choose)
    check_prefill(dec, pre, ref_logits, ref_cache, mask)
    out = dec.generate(ids, mask, max_new_tokens=4, **media)
    _, ref_cache = select_prefill(ref, embeds, mask, span, 0, choose)
    want = ref.decode(ref_logits, ref_cache, mask, 4, model.model.language_model.embed_tokens)
    assert torch.equal(out[:, :n], ids) and torch.equal(out[:, n:], want)


def test_crop_budgets_follow_the_thumbnail(model, case):
    """At the official temperature (10) the softmax over region sums in [0, 1] is nearly uniform; at 0.01 it is
    nearly one-hot, so the crop whose region the thumbnail attends to more keeps about three times as many
    tokens (retention 1.5 r vs 0.5 r). The kept tokens are the reference's either way; newlines are all kept."""
    ids, mask, media, _ = case
    dec = tokenreduce.reduce_decoder(model, "globalcom2", keep_ratio=0.3, temperature=0.01)
    pre = dec.prefill(ids, mask, **media)
    choose = _choose(model, ids, media, 0.3, [(1, 2), (1, 2)], temperature=0.01)
    for r, size in enumerate(media["image_sizes"].tolist()):
        pos = torch.nonzero(ids[r] == IMG).flatten().tolist()
        kept = [p for p in pre.kept[0][r].tolist() if p in pos]
        assert kept == sorted(choose(r, None, None, None))
        layout = _layout(1, 2, size)
        newline, thumb, crop1, crop2 = (sum(1 for t, p in zip(layout, pos) if t[0] == g and p in kept)
                                        for g in (-1, 0, 1, 2))
        assert newline == 4 and newline + thumb + crop1 + crop2 == math.ceil(0.3 * N_IMG)
        assert max(crop1, crop2) >= 2 * min(crop1, crop2), (crop1, crop2)


def test_keep_everything_is_the_plain_model(model, case):
    ids, mask, media, _ = case
    dec = tokenreduce.reduce_decoder(model, "globalcom2", keep_ratio=1.0)
    pre = dec.prefill(ids, mask, **media)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, **media).logits[:, -1]
    torch.testing.assert_close(pre.logits, want, atol=1e-5, rtol=1e-5)
    out = dec.generate(ids, mask, max_new_tokens=4, **media)
    assert torch.equal(out, model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                           **media))


def test_refuses_models_that_are_not_anyres():
    """LLaVA-1.5 (one image at the tower's resolution, no image_sizes): refused with the methods that work there."""
    llava = tiny_llava()
    ids = torch.cat([torch.randint(3, 100, (1, 3)), torch.full((1, 16), 150), torch.randint(3, 100, (1, 5))], 1)
    with pytest.raises(TokenReduceError, match=r"needs an AnyRes VLM.*Methods that work there: fastv.*divprune") as e:
        tokenreduce.reduce_decoder(llava, "globalcom2").prefill(ids, pixel_values=torch.randn(1, 3, 32, 32))
    assert e.value.setting == "method"


@pytest.mark.parametrize("opts,setting", [(dict(keep_ratio=0.0), "keep_ratio"), (dict(keep_ratio=1.5), "keep_ratio"),
                                          (dict(temperature=0.0), "temperature")])
def test_settings_are_checked(opts, setting):
    with pytest.raises(TokenReduceError) as e:
        tokenreduce.reduce_decoder(torch.nn.Linear(1, 1), "globalcom2", **opts)
    assert e.value.setting == setting


def test_op_exports_to_onnx(model, case, tmp_path):
    """The scoring op alone, with a real layout: ONNX export inlines its reference and onnxruntime selects the
    same tokens."""
    pytest.importorskip("onnxruntime")
    from tokenreduce.methods.globalcom2 import anyres_side_inputs
    from tokenreduce.targets.onnx import export_graph

    ids, mask, media, _ = case
    side = anyres_side_inputs(model, ids, media["image_sizes"].tolist())

    class Scores(torch.nn.Module):
        def forward(self, q, k, layout, guide, span):  # type: ignore[no-untyped-def]
            return tr.globalcom2_scores(q, k, 0.5, layout, guide, span, 20, N_IMG, 0.3, 10.0)

    torch.manual_seed(6)
    args = (torch.randn(6, 2, 17, 16), torch.randn(6, 2, 17, 16), side["anyres_layout"], side["anyres_guide"],
            ids == IMG)
    gm = torch.export.export(Scores(), args).module()
    written = export_graph(gm, args, {}, tmp_path / "globalcom2.onnx", verify=True, atol=1e-5, dynamic_batch=False)
    assert written.verified and written.max_abs_diff < 1e-5
