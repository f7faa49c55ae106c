"""ToMe on a rotary encoder (timm EVA-02) against the hand-written reference (`tests/rotary_reference.py`):
the proof that the rotary tables travel with the tokens (each slot rotated at its representative's
original position). Also EViT on EVA-02: it has a CLS token, and its later blocks' tables follow the
kept tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL
from rotary_reference import eva_features_tome

import tokenreduce


class Features(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def tiny_eva02(depth: int = 3) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, patch_size=7, embed_dim=32,
                              depth=depth, num_heads=2, num_classes=0).eval()
    for p in model.parameters():  # timm's init leaves biases at zero; random ones make the test sharper
        p.data.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def eva():
    return tiny_eva02()


def test_reference_without_merging_is_the_model(eva):
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(eva_features_tome(eva, x, [0, 0, 0]), eva.forward_features(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("r", [[3, 2, 2], [0, 4, 1], [5, 0, 0]])
def test_tome_on_eva02_matches_the_rotary_reference(eva, r):
    x = torch.randn(2, 3, 28, 28)
    red = tokenreduce.compile(Features(eva), (x,), method="tome", r=r, inner="eager", count_model_flops=False)
    assert red.report.tokens_per_block[1:] == [17 - r[0], 17 - r[0] - r[1]]
    expected = eva_features_tome(eva, x, r)
    got = red(x)
    assert got.shape == expected.shape == (2, 17 - sum(r), 32)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL)
    # another batch through the same graph
    x3 = torch.randn(3, 3, 28, 28)
    torch.testing.assert_close(red(x3), eva_features_tome(eva, x3, r), atol=TOL, rtol=TOL)


def test_tables_that_do_not_follow_the_tokens_would_be_caught(eva):
    """The test can fail: rotating merged slots at their slot index (renumbering) is not what EVA-02
    computes, and the reference tells the two apart."""
    import rotary_reference as rr

    x = torch.randn(2, 3, 28, 28)
    red = tokenreduce.compile(Features(eva), (x,), method="tome", r=[4, 4, 0], inner="eager",
                              count_model_flops=False)
    original = rr.tome_step

    def renumbered(x_, size, pos, keys, r):
        x2, s2, _ = original(x_, size, pos, keys, r)
        return x2, s2, torch.arange(x2.shape[1]).expand(x2.shape[0], -1)

    rr.tome_step = renumbered
    try:
        wrong = rr.eva_features_tome(eva, x, [4, 4, 0])
    finally:
        rr.tome_step = original
    assert (red(x) - wrong).abs().max() > 1e-3


def test_evit_on_eva02_sees_the_cls_token_and_runs(eva):
    x = torch.randn(2, 3, 28, 28)
    red = tokenreduce.compile(Features(eva), (x,), method="evit", keep_ratio=0.5, layers=[0, 1], inner="eager",
                              count_model_flops=False)
    rep = red.report
    assert rep.num_protected == 1
    # 16 patches -> keep 8 + CLS + fused = 10; then keep ceil(0.5 * 9) = 5 + CLS + fused = 7
    assert rep.tokens_per_block == [17, 10, 7]
    out = red(x)
    assert out.shape == (2, 7, 32) and torch.isfinite(out).all()
    full = tokenreduce.compile(Features(eva), (x,), method="evit", keep_ratio=1.0, layers=[0, 1], inner="eager",
                               count_model_flops=False)
    torch.testing.assert_close(full(x), eva.forward_features(x), atol=1e-5, rtol=1e-5)
