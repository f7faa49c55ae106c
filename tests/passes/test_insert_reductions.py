"""Structural tests of `insert_reductions`: which tokenreduce ops land in which blocks, what they read,
how attention masks change after the first reduction, and the settings where the pass must not fire."""

from __future__ import annotations

import operator

import pytest
import torch
from conftest import BERT_LEN, images
from graph_utils import SDPA, block_index, nodes_of, sdpa_mask, tr_nodes, tr_op

import tokenreduce

aten = torch.ops.aten


def _compile(model, x, kwargs=None, **settings):
    return tokenreduce.compile(model, x, kwargs, inner="eager", count_model_flops=False, **settings)


@pytest.mark.parametrize("r,expected_blocks", [(2, [0, 1, 2, 3]), ([0, 3, 0, 2], [1, 3]), ([4], [0])])
def test_tome_ops_at_expected_blocks(timm_vit, r, expected_blocks):
    red = _compile(timm_vit, (images(2),), method="tome", r=r)
    gm = red.graph_module
    plans = nodes_of(gm, tr_op("tome_plan"))
    applies = nodes_of(gm, tr_op("apply_plan"))
    assert [block_index(n) for n in plans] == expected_blocks
    assert [block_index(n) for n in applies] == expected_blocks
    assert not nodes_of(gm, tr_op("topk_plan")) and not nodes_of(gm, tr_op("query_row_scores"))
    # constant arguments: r of that block, 1 protected (CLS); apply_plan's n_out = tokens after the block
    rs = r if isinstance(r, list) else [r] * 4
    n = 17
    for i, (plan, apply) in zip(expected_blocks, zip(plans, applies)):
        n_in = 17 - sum(rs[:i])
        assert plan.args[1] == rs[i] and plan.args[2] == 1
        assert apply.args[4] == n_in - rs[i]
        n = n_in - rs[i]
    assert red.report.blocks[-1].tokens_out == n


def test_tome_reduces_the_residual_and_reads_attention_keys(timm_vit):
    gm = _compile(timm_vit, (images(2),), method="tome", r=3).graph_module
    sdpas = nodes_of(gm, SDPA)
    for plan, apply, sdpa in zip(nodes_of(gm, tr_op("tome_plan")), nodes_of(gm, tr_op("apply_plan")), sdpas):
        assert plan.args[0] is sdpa.args[1]  # keys as fed to this block's attention
        h = apply.args[0]  # pre-LN: h = x + attn(norm1(x)), before norm2
        assert h.target is aten.add.Tensor and block_index(h) == block_index(sdpa)
        x_new = [u for u in apply.users if u.target is operator.getitem and u.args[1] == 0]
        assert len(x_new) == 1
        users = {u.target for u in x_new[0].users}
        assert aten.layer_norm.default in users  # norm2 now reads the merged tokens
        # nothing except the inserted nodes still reads the unreduced h
        assert all(u.meta.get("tokenreduce") for u in h.users)


def test_tome_prop_attn_masks_only_after_first_merge(timm_vit):
    gm = _compile(timm_vit, (images(2),), method="tome", r=[0, 3, 3, 3]).graph_module
    sdpas = nodes_of(gm, SDPA)
    assert [block_index(n) for n in sdpas] == [0, 1, 2, 3]
    masks = [sdpa_mask(n) for n in sdpas]
    # blocks 0 and 1 run before the first merge (it happens after block 1's attention)
    assert masks[0] is None and masks[1] is None
    for m, n_tokens in zip(masks[2:], (14, 11)):
        assert isinstance(m, torch.fx.Node)
        val = m.meta["val"]
        assert val.dtype == torch.float32
        assert tuple(val.shape[1:]) == (1, 1, n_tokens)  # [B, 1, 1, N] additive log(size)


def test_tome_without_prop_attn_leaves_image_attention_unmasked(timm_vit):
    gm = _compile(timm_vit, (images(2),), method="tome", r=3, prop_attn=False).graph_module
    assert len(nodes_of(gm, tr_op("tome_plan"))) == 4
    assert all(sdpa_mask(n) is None for n in nodes_of(gm, SDPA))


@pytest.mark.parametrize("layers", [[1], [0, 2]])
def test_evit_ops_at_expected_blocks(timm_vit64, layers):
    gm = _compile(timm_vit64, (images(2, 64),), method="evit", keep_ratio=0.5, layers=layers).graph_module
    for name in ("query_row_scores", "topk_plan", "apply_plan"):
        assert [block_index(n) for n in nodes_of(gm, tr_op(name))] == layers, name
    assert not nodes_of(gm, tr_op("tome_plan"))
    sdpas = nodes_of(gm, SDPA)
    for scores in nodes_of(gm, tr_op("query_row_scores")):
        sdpa = sdpas[block_index(scores)]
        assert scores.args[0] is sdpa.args[0] and scores.args[1] is sdpa.args[1]  # q and k of that block
        assert scores.args[4] == 0  # CLS row
        assert scores.args[3] == pytest.approx(32 ** -0.5)
    # keep = ceil(0.5 * (N - 1)), n_out = 1 + keep + 1 (fused)
    n = 65
    for topk, apply in zip(nodes_of(gm, tr_op("topk_plan")), nodes_of(gm, tr_op("apply_plan"))):
        keep = -(-(n - 1) // 2)
        assert topk.args[1] == keep and topk.args[2] == 1 and topk.args[3] is True
        assert apply.args[4] == 1 + keep + 1
        n = 1 + keep + 1
    # EViT has no proportional attention by default: image attention stays unmasked
    assert all(sdpa_mask(s) is None for s in sdpas)


def test_evit_with_prop_attn_masks_later_blocks(timm_vit64):
    gm = _compile(timm_vit64, (images(2, 64),), method="evit", keep_ratio=0.5, layers=[1],
                  prop_attn=True).graph_module
    masks = [sdpa_mask(s) for s in nodes_of(gm, SDPA)]
    assert masks[0] is None and masks[1] is None
    assert all(isinstance(m, torch.fx.Node) for m in masks[2:])


def test_evit_second_score_uses_the_bias_of_its_block(timm_vit64):
    """With prop_attn, block 2's CLS-row scores must see the same log(size) bias as its attention."""
    gm = _compile(timm_vit64, (images(2, 64),), method="evit", keep_ratio=0.5, layers=[0, 2],
                  prop_attn=True).graph_module
    scores = nodes_of(gm, tr_op("query_row_scores"))
    sdpas = nodes_of(gm, SDPA)
    assert scores[0].args[2] is None
    assert scores[1].args[2] is sdpa_mask(sdpas[2]) and scores[1].args[2] is not None


@pytest.mark.parametrize("settings", [
    dict(method="tome", r=0),
    dict(method="tome", r=[0, 0, 0, 0]),
    dict(method="tome", r=4, layers=[]),
    dict(method="evit", keep_ratio=1.0),
    dict(method="evit", keep_ratio=1.0, layers=[0, 1, 2, 3]),
    dict(method="none"),
])
def test_pass_does_not_fire_when_nothing_is_removed(timm_vit, settings):
    red = _compile(timm_vit, (images(2),), **settings)
    gm = red.graph_module
    assert tr_nodes(gm) == []
    assert not any(n.meta.get("tokenreduce") for n in gm.graph.nodes)
    assert all(sdpa_mask(s) is None for s in nodes_of(gm, SDPA))
    assert all(b.tokens_in == b.tokens_out == 17 for b in red.report.blocks)


def test_bert_padding_mask_is_reduced_along_with_tokens(bert, bert_inputs):
    ids, am = bert_inputs
    red = _compile(bert, (ids,), {"attention_mask": am}, method="tome", r=[2, 2])
    gm = red.graph_module
    plans = nodes_of(gm, tr_op("tome_plan"))
    assert [block_index(n) for n in plans] == [0, 1]
    # the first plan gets the key validity derived from the model's mask; merges then carry it on
    assert all(isinstance(p.args[3], torch.fx.Node) for p in plans)
    # post-LN: the reduced tensor is norm1(x + attn(x)), a layer_norm output
    for apply in nodes_of(gm, tr_op("apply_plan")):
        assert apply.args[0].target is aten.layer_norm.default
    sdpas = nodes_of(gm, SDPA)
    masks = [sdpa_mask(s) for s in sdpas]
    assert all(isinstance(m, torch.fx.Node) for m in masks)  # BERT always passes its padding mask
    assert masks[0].meta["val"].shape[-1] == BERT_LEN
    for m, n in zip(masks[1:], (14, 12, 12)):
        assert m.meta["val"].shape[-1] == n  # the mask is gathered down to the reduced keys
