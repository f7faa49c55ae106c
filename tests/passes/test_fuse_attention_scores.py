"""Structural and numerical tests of `fuse_attention_scores`.

- CPU graphs: the pipeline leaves SDPA + `query_row_scores` alone (the pass's note says why).
- CUDA graphs (the same reduced graph with every `meta["val"]` moved to a fake CUDA device): every EViT
  block's pair becomes one `attention_with_scores` whose arguments are the SDPA's q, k, v, mask and
  scale and the score's row, with the SDPA's and the score's users rewired and fake values set.
- Forced on CPU (the op's CPU implementation is the reference): the fused graph computes exactly what the
  unfused one does, with and without a `log(size)` bias; ONNX's inlining maps the fused op back to
  standard ops with the same numbers.
- Where it must not fire: explicit (non-SDPA) attention, a scale or bias that differs from the
  attention's, dropout, a causal attention scored at a row other than the last (the causal last row does
  fuse, and matches).
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from conftest import images
from graph_utils import SDPA, block_index, nodes_of, tr_op
from torch._guards import detect_fake_mode
from torch.utils import _pytree as pytree

import tokenreduce
from tokenreduce.passes.fuse_attention_scores import fuse_attention_scores
from tokenreduce.passes.inline_reference_ops import inline_reference_ops

FUSED = torch.ops.tokenreduce.attention_with_scores.default
tr = torch.ops.tokenreduce


def _evit(model, size=64, **settings):
    kw = dict(method="evit", keep_ratio=0.5, layers=[1, 2], inner="eager", count_model_flops=False)
    kw.update(settings)
    return tokenreduce.compile(model, (images(2, size),), **kw)


def _on_cuda(gm):
    """The same graph as if captured on a GPU: every fake value moved to a (fake) CUDA device."""
    vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    mode = detect_fake_mode(vals)
    assert mode is not None
    with mode:
        for n in gm.graph.nodes:
            if "val" in n.meta:
                n.meta["val"] = pytree.tree_map(lambda t: t.to("cuda") if isinstance(t, torch.Tensor) else t,
                                                n.meta["val"])
    return gm


@pytest.fixture(scope="module")
def evit_red(timm_vit64):
    return _evit(timm_vit64)


def test_does_not_fire_on_cpu_graphs(evit_red):
    gm = evit_red.graph_module
    assert len(nodes_of(gm, tr_op("query_row_scores"))) == 2 and not nodes_of(gm, FUSED)
    assert "fuse_attention_scores: 0 rewrites" in evit_red.report.passes
    res = fuse_attention_scores(copy.deepcopy(gm), None)
    assert not res.changed and res.rewrites == 0
    assert len(res.notes) == 2 and all("graph on cpu" in n for n in res.notes)


def test_fires_on_cuda_graphs(evit_red):
    gm = _on_cuda(copy.deepcopy(evit_red.graph_module))
    sdpas = {block_index(n): n for n in nodes_of(gm, SDPA)}
    scores = {block_index(n): n for n in nodes_of(gm, tr_op("query_row_scores"))}
    expect = {b: (s.args[0], s.args[1], s.args[2], scores[b].args[3]) for b, s in sdpas.items() if b in scores}
    assert sorted(expect) == [1, 2]
    res = fuse_attention_scores(gm, None)
    assert res.changed and res.rewrites == 2, res.notes
    fused = nodes_of(gm, FUSED)
    assert [block_index(n) for n in fused] == [1, 2]
    assert [block_index(n) for n in nodes_of(gm, SDPA)] == [0, 3]  # blocks without a score keep SDPA
    assert not nodes_of(gm, tr_op("query_row_scores"))
    for node in fused:
        q, k, v, bias, scale, causal, row = node.args
        assert (q, k, v, scale) == expect[block_index(node)]
        assert bias is None and causal is False and row == 0
        outs = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        assert set(outs) == {0, 1}
        assert {u.target for u in outs[1].users} == {tr_op("topk_plan")}  # the plan reads the fused scores
        assert all(u.target is not FUSED for u in outs[0].users)  # the attention output's old users
        val_out, val_scores = outs[0].meta["val"], outs[1].meta["val"]
        assert val_out.device.type == "cuda" and tuple(val_out.shape[1:]) == tuple(q.meta["val"].shape[1:])
        assert tuple(val_scores.shape[1:]) == (k.meta["val"].shape[-2],) and val_scores.dtype == q.meta["val"].dtype


@pytest.mark.parametrize("prop_attn", [False, True])
def test_forced_fusion_is_numerically_the_unfused_graph(timm_vit64, prop_attn):
    red = _evit(timm_vit64, prop_attn=prop_attn)
    gm = copy.deepcopy(red.graph_module)
    res = fuse_attention_scores(gm, None, force=True)
    assert res.rewrites == 2, res.notes
    fused = nodes_of(gm, FUSED)
    if prop_attn:  # the second EViT block attends with log(size): the fused op carries that bias
        assert fused[0].args[3] is None and fused[1].args[3] is not None
    x = images(3, 64, seed=7)
    torch.testing.assert_close(gm(x), red.graph_module(x), atol=1e-6, rtol=1e-5)  # SDPA: explicit vs default scale
    # ONNX / CPU-inductor inlining turns the fused op back into SDPA + the reference row
    inline_reference_ops(gm)
    assert not any(str(n.target).startswith("tokenreduce.") for n in gm.graph.nodes if n.op == "call_function")
    torch.testing.assert_close(gm(x), red.graph_module(x), atol=1e-6, rtol=1e-5)  # SDPA: explicit vs default scale
    ep = torch.export.export(gm, (x,))
    assert not any("tokenreduce" in str(n.target) for n in ep.graph.nodes)


def test_does_not_fire_on_explicit_attention(timm_vit_explicit):
    red = _evit(timm_vit_explicit)
    gm = copy.deepcopy(red.graph_module)
    assert nodes_of(gm, tr_op("query_row_scores")) and not nodes_of(gm, SDPA)
    res = fuse_attention_scores(gm, None, force=True)
    assert res.rewrites == 0 and not res.changed
    assert all("feed 0 scaled_dot_product_attention" in n for n in res.notes)


@pytest.mark.parametrize("edit,reason", [
    (lambda qrs, sdpa: qrs.update_arg(3, qrs.args[3] * 2), "differs from the attention's"),
    (lambda qrs, sdpa: qrs.update_arg(2, sdpa), "is not the attention mask"),
])
def test_does_not_fire_when_score_is_another_attention(evit_red, edit, reason):
    gm = copy.deepcopy(evit_red.graph_module)
    qrs = nodes_of(gm, tr_op("query_row_scores"))[0]
    sdpa = next(n for n in nodes_of(gm, SDPA) if n.args[0] is qrs.args[0])
    edit(qrs, sdpa)
    res = fuse_attention_scores(gm, None, force=True)
    assert res.rewrites == 1  # only the untouched block
    assert any(reason in n for n in res.notes), res.notes
    assert qrs in gm.graph.nodes and sdpa in gm.graph.nodes


class _Pair(torch.nn.Module):
    """An SDPA and a one-row score of it, as a decoder (FastV: last row) or with dropout would have."""

    def __init__(self, causal: bool, row: int, dropout: float = 0.0):
        super().__init__()
        self.causal, self.row, self.dropout = causal, row, dropout

    def forward(self, q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, is_causal=self.causal)
        scores = tr.query_row_scores(q, k, None, q.shape[-1] ** -0.5, self.row)
        return out, scores


def _pair_graph(causal, row, dropout=0.0):
    q, k, v = (torch.randn(2, 3, 9, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    gm = torch.export.export(_Pair(causal, row, dropout), (q, k, v)).module()
    assert len(nodes_of(gm, SDPA)) == 1
    return gm, (q, k, v)


@pytest.mark.parametrize("causal,row,dropout,reason", [
    (True, 0, 0.0, "is causal and row 0 is not the last"),
    (False, 0, 0.1, "dropout_p=0.1"),
])
def test_does_not_fire_on_causal_first_row_or_dropout(causal, row, dropout, reason):
    gm, _ = _pair_graph(causal, row, dropout)
    res = fuse_attention_scores(gm, None, force=True)
    assert res.rewrites == 0 and any(reason in n for n in res.notes), res.notes


@pytest.mark.parametrize("row", [-1, 8])
def test_causal_last_row_fuses_and_matches(row):
    gm, inputs = _pair_graph(True, row)
    expected = gm(*inputs)
    res = fuse_attention_scores(gm, None, force=True)
    assert res.rewrites == 1, res.notes
    (node,) = nodes_of(gm, FUSED)
    assert node.args[3] is None and node.args[5] is True and node.args[6] == row
    assert not nodes_of(gm, SDPA)
    got = gm(*inputs)
    torch.testing.assert_close(got[0], expected[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-7, rtol=1e-6)
