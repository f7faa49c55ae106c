"""Token maps: the picture's content, not just a file. Per panel, the number of distinct colours (grey aside)
must be the number of tokens the report gives for that block (less the protected CLS, and EViT's fused
token; for DyMU, whose count follows the input, the count DyMU itself recorded for the image), each patch cell
must be one flat colour, and the grouping must agree with an independent one: the model's own `unmerge=True`
outputs, where the patches of one token get identical rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tokenreduce
from tokenreduce.errors import TokenReduceError
from tokenreduce.tuning.tokenmap import GREY, imagenet_input, token_map


def _vit(tokens_out: bool = False):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    if tokens_out:  # no pooling, no head: the model returns every token [B, N, C]
        return VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=0,
                                 global_pool="").eval()
    return VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=5).eval()


@pytest.fixture(scope="module")
def photo():
    """A smooth synthetic photo (gradients + a disc), so similar neighbouring patches exist to merge."""
    yy, xx = np.mgrid[0:64, 0:64]
    img = np.stack([xx * 4, yy * 4, 255 - (xx + yy) * 2], axis=-1)
    img[(xx - 40) ** 2 + (yy - 24) ** 2 < 150] = (250, 20, 20)
    return img.clip(0, 255).astype(np.uint8)


def _panel_cells(png: np.ndarray, box: tuple[int, int, int, int], grid: tuple[int, int], cell: int) -> np.ndarray:
    """[gh, gw, 3] colours read back from the PNG; asserts each patch cell is one flat colour."""
    left, top, right, bottom = box
    pic = png[top:bottom, left:right]
    gh, gw = grid
    cells = pic.reshape(gh, cell, gw, cell, 3)
    assert (cells == cells[:, :1, :, :1]).all(), "a patch cell is not one flat colour"
    return cells[:, 0, :, 0]


@pytest.mark.parametrize("settings, fused", [
    ({"method": "tome", "r": 6}, 0),
    ({"method": "pitome", "r": [10, 6, 4, 2]}, 0),
    ({"method": "evit", "keep_ratio": 0.5, "layers": [1]}, 1),
    ({"method": "token_transforming", "r": 6, "topk": 3}, 0),  # each patch shown in the slot with its largest share
    ({"method": "zero_tprune", "keep_ratio": 0.5, "layers": [1]}, 0),
    ({"method": "dymu", "thresholds": [0.5, 0.5, 0.5, 0.5]}, 0),  # batch 1: the image's own count per block
])
def test_colour_groups_match_reported_tokens(photo, tmp_path, settings, fused):
    from tokenreduce.methods.dymu import recording

    with recording() as rec:  # DyMU's own per-input counts (other methods record nothing)
        tm = token_map(_vit(), photo, image_size=64, **settings)
    path = tm.save(tmp_path / "map.png")
    png = np.asarray(Image.open(path).convert("RGB"))
    reducing = [b for b in tm.report.blocks if b.tokens_out < b.tokens_in]
    assert [p.block for p in tm.panels] == [b.index for b in reducing]
    for panel, blk in zip(tm.panels, reducing):
        if settings["method"] == "dymu":  # data-dependent: the count DyMU recorded for this image, which the
            assert panel.tokens == rec.counts[0][blk.index]  # report's calibrated nominal one is not
            assert panel.tokens < blk.tokens_out
        else:
            assert panel.tokens == blk.tokens_out
        cells = _panel_cells(png, panel.box, tm.grid, tm.cell)
        colours = {tuple(c) for c in cells.reshape(-1, 3)}
        grey = (cells == GREY).all(axis=-1)
        expected = panel.tokens - tm.num_protected - fused
        assert len(colours - {GREY}) == expected
        assert grey.sum() == (panel.groups < 0).sum()
        if settings["method"] in ("evit", "zero_tprune"):  # the pruned patches are the candidates not kept
            assert grey.sum() == 64 - expected
        else:
            assert grey.sum() == 0
        # one colour per group and one group per colour
        for g in np.unique(panel.groups[panel.groups >= 0]):
            assert len({tuple(c) for c in cells[panel.groups == g]}) == 1


@pytest.mark.parametrize("settings, tokens", [
    ({"method": "tome", "r": [8, 8, 8, 8]}, 65 - 32),
    ({"method": "pitome", "r": [8, 8, 8, 8]}, 65 - 32),
    ({"method": "token_transforming", "r": [8, 8, 8, 8], "topk": 1}, 65 - 32),  # topk=1: hard merges, unmergeable
    ({"method": "dymu", "thresholds": [0.5, 0.5, 0.5, 0.5]}, None),
])
def test_groups_agree_with_unmerged_outputs(photo, settings, tokens):
    model = _vit(tokens_out=True)
    tm = token_map(model, photo, image_size=64, **settings)
    x = imagenet_input(photo)
    red = tokenreduce.compile(model, (x,), **settings, unmerge=True, inner="eager", dynamic_batch=False,
                              count_model_flops=False)
    with torch.inference_mode():
        rows = red(x)[0, 1:]  # [64, C], each original patch gets its token's row
    same = (rows[:, None, :] == rows[None, :, :]).all(-1).numpy()
    groups = tm.panels[-1].groups.reshape(-1)
    assert (same == (groups[:, None] == groups[None, :])).all()
    assert len(set(groups.tolist())) == tm.panels[-1].tokens - 1
    if tokens is not None:
        assert tm.panels[-1].tokens == tokens


def test_refusals(photo, tmp_path):
    with pytest.raises(TokenReduceError, match="reduces no token"):
        token_map(_vit(), photo, image_size=64, method="tome", r=0)
    with pytest.raises(TokenReduceError, match=r"block\(s\) \[0\] do not reduce"):
        token_map(_vit(), photo, image_size=64, method="evit", keep_ratio=0.5, layers=[1], blocks=[0])
    with pytest.raises(TokenReduceError, match="not found"):
        token_map(_vit(), tmp_path / "missing.png", image_size=64, method="tome", r=2)
