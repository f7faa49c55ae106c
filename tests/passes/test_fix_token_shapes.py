"""Structural and numerical tests of `fix_token_shapes`: after a reduction no shape argument downstream
still bakes in the old token count, every `meta["val"]` equals the shape the graph really computes, and
token counts that coincide with other sizes (embed dim, head dim, head count, the qkv "3") are followed
through reshapes by dimension, not by value."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, images, make_timm_vit
from graph_utils import SDPA, downstream, nodes_of, tr_op
from reference import timm_vit_forward

import tokenreduce

aten = torch.ops.aten
SHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


def _ints(arg) -> list[int]:
    return [a for a in arg if isinstance(a, int) and not isinstance(a, bool)] if isinstance(arg, (list, tuple)) else []


@pytest.mark.parametrize("method,settings", [("tome", dict(r=8)), ("evit", dict(keep_ratio=0.5, layers=[1, 2]))])
def test_no_old_token_count_in_shape_args_after_reduction(timm_vit64, method, settings):
    # 65 tokens; 65 is not the batch, embed dim (64), head dim (32), heads (2) or 3*64.
    red = tokenreduce.compile(timm_vit64, (images(2, 64),), method=method, inner="eager",
                              count_model_flops=False, **settings)
    gm = red.graph_module
    first_apply = nodes_of(gm, tr_op("apply_plan"))[0]
    after = [n for n in downstream(gm, first_apply) if n.op == "call_function" and n.target in SHAPE_OPS]
    assert after, "expected reshapes of q/k/v downstream of the first reduction"
    stale = [(n.name, n.args[1]) for n in after if 65 in _ints(n.args[1])]
    assert stale == []
    # and the captured graph did have the constant before (the test can fail)
    before = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SHAPE_OPS
              and 65 in _ints(n.args[1])]
    assert before


def test_meta_val_matches_real_shapes(timm_vit):
    """Run the rewritten graph node by node; every tensor's shape equals its meta['val'] shape."""
    x = images(2)
    red = tokenreduce.compile(timm_vit, (x,), method="tome", r=[3, 2, 0, 2], inner="eager",
                              count_model_flops=False, dynamic_batch=False)
    gm = red.graph_module
    seen: list[tuple[str, tuple, tuple]] = []

    class Check(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            v = n.meta.get("val")
            if isinstance(out, torch.Tensor) and isinstance(v, torch.Tensor):
                seen.append((n.name, tuple(out.shape), tuple(v.shape)))
            return out

    with torch.no_grad():
        Check(gm).run(x)
    assert len(seen) > 50
    bad = [s for s in seen if s[1] != s[2]]
    assert bad == []
    # attention sees the planned token counts
    sdpas = nodes_of(gm, SDPA)
    assert [s.meta["val"].shape[-2] for s in sdpas] == [b.tokens_in for b in red.report.blocks] == [17, 14, 12, 12]


def test_meta_val_keeps_symbolic_batch(timm_vit):
    red = tokenreduce.compile(timm_vit, (images(2),), method="tome", r=3, inner="eager", count_model_flops=False)
    gm = red.graph_module
    apply = nodes_of(gm, tr_op("apply_plan"))[0]
    x_val = apply.meta["val"][0]
    assert isinstance(x_val.shape[0], torch.SymInt)  # batch stays dynamic
    assert tuple(x_val.shape[1:]) == (14, 64)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = [a for a in torch.utils._pytree.tree_leaves(out.args) if isinstance(a, torch.fx.Node)]
    assert tuple(leaves[0].meta["val"].shape[1:]) == (5,)


def test_captured_shapes_are_kept_for_reference(timm_vit):
    gm = tokenreduce.compile(timm_vit, (images(2),), method="tome", r=3, inner="eager",
                             count_model_flops=False).graph_module
    sdpa = nodes_of(gm, SDPA)[1]
    assert tuple(sdpa.meta["val"].shape[1:]) == (2, 14, 32)
    assert tuple(sdpa.meta["tokenreduce_orig_val"].shape[1:]) == (2, 17, 32)


# Token counts that collide with other sizes somewhere in the model. Each case: model kwargs, image
# size, r schedule, and what collides.
COLLISIONS = {
    # 64 patches, no CLS, embed 64: N == C at block 0, then 64-16-16 = 32 == head_dim at block 2
    "N==C,N==head_dim": (dict(img_size=64, class_token=False, global_pool="avg"), 64, [16, 16, 8]),
    # 17 -> 9 -> 5 -> 3: block 3 attends over 3 tokens, the size of qkv's "3" axis
    "N==3(qkv)": (dict(), 32, [8, 4, 2]),
    # 4 heads: 17 -> 9 -> 5 -> 4: block 3 has N == num_heads
    "N==heads": (dict(num_heads=4), 32, [8, 4, 1]),
}


@pytest.mark.parametrize("case", list(COLLISIONS))
def test_token_count_colliding_with_other_sizes(case):
    kw, img, r = COLLISIONS[case]
    model = make_timm_vit(**kw)
    x = images(2, img)
    red = tokenreduce.compile(model, (x,), method="tome", r=r, inner="eager", count_model_flops=False)
    with torch.no_grad():
        got = red(x)
    exp = timm_vit_forward(model, x, tome_r=r)
    assert got.shape == exp.shape
    torch.testing.assert_close(got, exp, atol=TOL, rtol=TOL)
    # one more batch size through the same (dynamic) graph
    x3 = images(3, img, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(red(x3), timm_vit_forward(model, x3, tome_r=r), atol=TOL, rtol=TOL)
