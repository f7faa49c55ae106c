"""The report: FLOPs before/after, per-block token chain, and the printed table."""

from __future__ import annotations

import json

import pytest
from conftest import images

import tokenreduce


@pytest.fixture(scope="module")
def tome_report(timm_vit64):
    return tokenreduce.compile(timm_vit64, (images(2, 64),), method="tome", r=8, inner="eager",
                               dynamic_batch=False).report


def test_flops_drop_for_reducing_setting(tome_report):
    rep = tome_report
    assert rep.flops_before > 0 and rep.flops_after > 0
    assert rep.flops_after < rep.flops_before
    # token-linear layers dominate: 65 -> 57 -> 49 -> 41 tokens through 4 blocks should save well over 10%
    assert rep.flops_ratio < 0.9


def test_flops_equal_when_nothing_removed(timm_vit64):
    rep = tokenreduce.compile(timm_vit64, (images(2, 64),), method="tome", r=0, inner="eager",
                              dynamic_batch=False).report
    assert rep.flops_before > 0
    assert abs(rep.flops_after - rep.flops_before) <= 0.01 * rep.flops_before


def test_tokens_chain(tome_report):
    blocks = tome_report.blocks
    assert [b.index for b in blocks] == [0, 1, 2, 3]
    assert [(b.tokens_in, b.tokens_out) for b in blocks] == [(65, 57), (57, 49), (49, 41), (41, 33)]
    for prev, nxt in zip(blocks, blocks[1:]):
        assert nxt.tokens_in == prev.tokens_out
    assert all(b.action == "tome r=8" for b in blocks)
    assert tome_report.num_protected == 1
    assert len(tome_report.reduced_blocks) == 4


def test_evit_tokens_chain_and_unreduced_blocks(timm_vit64):
    rep = tokenreduce.compile(timm_vit64, (images(2, 64),), method="evit", keep_ratio=0.5, layers=[1, 3],
                              inner="eager", dynamic_batch=False, count_model_flops=False).report
    # block 1: keep ceil(0.5 * 64) = 32 -> 1 + 32 + 1 = 34; block 3: keep ceil(0.5 * 33) = 17 -> 19
    assert [(b.tokens_in, b.tokens_out) for b in rep.blocks] == [(65, 65), (65, 34), (34, 34), (34, 19)]
    assert rep.blocks[0].action == "-" and rep.blocks[2].action == "-"
    assert "32" in rep.blocks[1].action and "17" in rep.blocks[3].action


def test_str_contains_block_names(tome_report):
    text = str(tome_report)
    for i in range(4):
        assert f"blocks.{i}" in text
    assert "65->57" in text and "tome" in text and "FLOPs" in text


def test_report_serialises(tome_report):
    d = json.loads(tome_report.to_json())
    assert d["method"] == "tome" and len(d["blocks"]) == 4
    assert d["blocks"][0]["tokens_out"] == 57
