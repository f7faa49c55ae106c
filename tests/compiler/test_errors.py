"""Every refusal is a TokenReduceError whose message says what is valid or what to do instead; nothing is
clamped silently (clamp_r reports each clamped block)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import images

import tokenreduce
from tokenreduce import TokenReduceError


def _compile(model, x, **settings):
    return tokenreduce.compile(model, x, inner="eager", count_model_flops=False, dynamic_batch=False, **settings)


def _largest_constant_r(n, p, depth):
    """Largest r with r <= (n_i - p) // 2 at every block, n_{i+1} = n_i - r (docs/methods.md limits)."""
    best = 0
    for r in range(1, n):
        m, ok = n, True
        for _ in range(depth):
            if r > (m - p) // 2:
                ok = False
                break
            m -= r
        if not ok:
            break
        best = r
    return best


def test_r_too_large_names_largest_valid_r(timm_vit):
    # 17 tokens, 1 protected: block 0 allows (17 - 1) // 2 = 8
    with pytest.raises(TokenReduceError) as info:
        _compile(timm_vit, (images(2),), method="tome", r=9)
    msg = str(info.value)
    assert "8" in re.findall(r"\d+", msg)
    assert "largest" in msg
    assert str(_largest_constant_r(17, 1, 4)) in re.findall(r"\d+", msg)  # = 3 for four blocks


def test_r_too_large_at_a_later_block(timm_vit):
    # block 0: 17 -> 9; block 1 has 9 tokens, allows (9 - 1) // 2 = 4
    with pytest.raises(TokenReduceError, match=r"largest valid r there is 4"):
        _compile(timm_vit, (images(2),), method="tome", r=[8, 5])


def test_r_list_longer_than_model(timm_vit):
    with pytest.raises(TokenReduceError, match="4"):
        _compile(timm_vit, (images(2),), method="tome", r=[1, 1, 1, 1, 1])


def test_clamp_r_reports_clamped_blocks(timm_vit):
    red = _compile(timm_vit, (images(2),), method="tome", r=6, clamp_r=True)
    blocks = red.report.blocks
    # 17 -> 11 (r=6 ok) -> 6 (asked 6, max (11-1)//2 = 5) -> 4 (max (6-1)//2 = 2) -> 3 (max 1)
    assert [(b.tokens_in, b.tokens_out) for b in blocks] == [(17, 11), (11, 6), (6, 4), (4, 3)]
    assert blocks[0].reason == ""
    for b, merged in zip(blocks[1:], (5, 2, 1)):
        assert "clamp" in b.reason and "6" in b.reason and str(merged) in b.reason
    with torch.no_grad():
        x = images(2)
        from reference import timm_vit_forward

        torch.testing.assert_close(red(x), timm_vit_forward(timm_vit, x, tome_r=[6, 5, 2, 1]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layers", [[4], [0, 7], [-1]])
def test_layer_out_of_range_names_valid_range(timm_vit, layers):
    with pytest.raises(TokenReduceError) as info:
        _compile(timm_vit, (images(2),), method="evit", keep_ratio=0.5, layers=layers)
    msg = str(info.value)
    assert re.search(r"0\s*(\.\.|-|to)\s*3", msg), msg


def test_unknown_method_lists_valid_ones(timm_vit):
    with pytest.raises(TokenReduceError) as info:
        _compile(timm_vit, (images(2),), method="tomme", r=2)
    msg = str(info.value)
    assert "tomme" in msg and all(m in msg for m in ("tome", "evit", "none"))


def test_unknown_setting_lists_valid_ones(timm_vit):
    with pytest.raises(TokenReduceError) as info:
        _compile(timm_vit, (images(2),), method="tome", r=2, keep_ration=0.5)
    msg = str(info.value)
    assert "keep_ration" in msg and "keep_ratio" in msg and "layers" in msg


def test_unknown_setting_in_backend_options(timm_vit):
    from tokenreduce.methods.settings import Settings

    with pytest.raises(TokenReduceError, match="valid settings"):
        Settings.from_options({"method": "tome", "rr": 3})


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_keep_ratio_out_of_range(timm_vit, ratio):
    with pytest.raises(TokenReduceError, match=r"keep_ratio.*\(0, 1\]"):
        _compile(timm_vit, (images(2),), method="evit", keep_ratio=ratio)


@pytest.mark.parametrize("bad", [42, "pixels", (42,)])
def test_unsupported_example_inputs(timm_vit, bad):
    with pytest.raises(TokenReduceError) as info:
        _compile(timm_vit, bad, method="tome", r=2)
    assert "tensor" in str(info.value)


def test_negative_r(timm_vit):
    with pytest.raises(TokenReduceError, match=">= 0"):
        _compile(timm_vit, (images(2),), method="tome", r=-1)


def test_evit_without_cls_suggests_alternatives(timm_vit_nocls):
    # score="cls" asks for the CLS row; the default "auto" ranks a CLS-free model by received attention
    with pytest.raises(TokenReduceError) as info:
        _compile(timm_vit_nocls, (images(2, 64),), method="evit", keep_ratio=0.5, score="cls")
    msg = str(info.value)
    assert "CLS" in msg and "protected_tokens" in msg and "tome" in msg and "score='received'" in msg


def test_evit_unmerge_without_fuse_is_refused(timm_vit):
    with pytest.raises(TokenReduceError, match="fuse"):
        _compile(timm_vit, (images(2),), method="evit", keep_ratio=0.5, fuse=False, unmerge=True)
