"""Blocks whose token count cannot change (a later reshape into a token grid) are skipped with the reason,
and a too-large r names a largest valid r that itself compiles (PVT-v2 suggested one that failed).

The two-stage model below is the hierarchical pattern in miniature: stage 1's tokens are reshaped into an
H x W grid and downsampled by a strided convolution (so stage 1 cannot be reduced), stage 2 is plain
attention blocks over the downsampled tokens (which can)."""

from __future__ import annotations

import re

import pytest
import torch
from timm.models.vision_transformer import Block

import tokenreduce
from tokenreduce.errors import TokenReduceError


class TwoStage(torch.nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(3, dim, 4, 4)  # 32x32 -> 8x8 = 64 tokens
        self.stage1 = torch.nn.Sequential(Block(dim, 2), Block(dim, 2))
        self.down = torch.nn.Conv2d(dim, dim, 2, 2)  # 8x8 -> 4x4 = 16 tokens
        self.stage2 = torch.nn.Sequential(Block(dim, 2), Block(dim, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, c, h, w = x.shape
        x = self.stage1(x.flatten(2).transpose(1, 2))
        x = self.down(x.transpose(1, 2).reshape(b, c, h, w))
        return self.stage2(x.flatten(2).transpose(1, 2))


@pytest.fixture(scope="module")
def two_stage():
    torch.manual_seed(0)
    return TwoStage().eval()


def _compile(model, x, **settings):
    return tokenreduce.compile(model, (x,), inner="eager", count_model_flops=False, **settings)


def test_blocks_before_a_token_grid_are_skipped_with_the_reason(two_stage):
    x = torch.randn(2, 3, 32, 32)
    red = _compile(two_stage, x, method="tome", r=2)
    blocks = red.report.blocks
    for b in blocks[:2]:
        assert b.tokens_out == b.tokens_in
        assert "its token count cannot change" in b.reason and "reshapes a token dimension" in b.reason
    assert [(b.tokens_in, b.tokens_out) for b in blocks[2:]] == [(16, 14), (14, 12)]
    out = red(x)
    assert out.shape == (2, 12, 16) and torch.isfinite(out).all()


def test_too_large_r_suggests_an_r_that_compiles(two_stage):
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(TokenReduceError) as info:
        _compile(two_stage, x, method="tome", r=7)
    # stage 2 only: 16 tokens, two blocks: r=5 (16 -> 11 -> 6) is the largest one both can take
    best = int(re.search(r"the largest constant r for this model is (\d+)", str(info.value)).group(1))
    assert best == 5
    red = _compile(two_stage, x, method="tome", r=best)
    assert red.report.tokens_per_block[2:] == [16, 11]
    assert red(x).shape == (2, 6, 16)


def test_pvt_v2_blocks_are_skipped_not_failed():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=0, depths=(1, 1, 1, 2),
                              embed_dims=(16, 16, 32, 32), num_heads=(1, 1, 1, 2)).eval()
    x = torch.randn(2, 3, 64, 64)
    for r in (1, 20):  # one that plans and one that is too large: both end in the same skips
        red = _compile(model, x, method="tome", r=r)
        grid = [b for b in red.report.blocks if "its token count cannot change" in b.reason]
        assert len(grid) == 2 and all("token grid" in b.reason for b in grid)
        assert not red.report.reduced_blocks
        torch.testing.assert_close(red(x), model(x), atol=1e-5, rtol=1e-5)
