"""Token Transforming (`method="token_transforming"`) against an independent reference written here.

The reference (`ref_plan`) builds the many-to-many matrix one row at a time with Python lists, from the rules
the method file states: ToMe's bipartite matching picks the `r` removed tokens (A = even, B = odd positions,
protected leading tokens left out, each A's most similar B by cosine of the head-averaged keys, the r best
edges); the kept tokens keep ToMe's output order (protected, unmerged A -- by index when tokens are protected,
else by edge order -- then B); each removed token is shared among its `topk` most similar non-protected kept
tokens with `softmax(cos / tau)` shares. It never imports `tokenreduce.methods.token_transforming`; the apply
(`ref_apply`) is the size-weighted matrix product written with einsum.

Checked: the plan (matrix, dominant slots, representatives) against the reference on random keys; the apply
against a by-hand loop; the tiny timm ViT compiled with `method="token_transforming"` against a hand-written
forward that reduces with the reference (proportional attention with fractional sizes, an r list, topk=1; traced
at batch 2, run at batch 3);
column sums and that shares never cross real/padding on a padded BERT batch, whose unpadded row equals that row
run alone; refusals (unmerge with topk > 1, too-large r, option ranges); FLOPs reported; ONNX export verified in
onnxruntime and export-safe.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from conftest import TOL, bert_batch, images, make_timm_vit, output_tensor
from torch import Tensor

import tokenreduce
from tokenreduce import TokenReduceError
from tokenreduce.kernels.reference import apply_matrix
from tokenreduce.targets.onnx import check_static, export_onnx


# ------------------------------------------------------------------------------------------------ reference
def ref_plan_row(metric: Tensor, r: int, p: int, topk: int, tau: float) -> tuple[Tensor, list[int], list[int]]:
    """One row: `metric [N, d]` head-averaged keys -> (matrix [N - r, N], dominant slot per token, rep per slot)."""
    n = metric.shape[0]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    cos = (unit @ unit.T).tolist()
    a_side = [i for i in range(0, n, 2) if i >= p]
    b_side = [i for i in range(1, n, 2) if i >= p]
    best = {a: max(b_side, key=lambda b: cos[a][b]) for a in a_side}
    by_edge = sorted(a_side, key=lambda a: -cos[a][best[a]])
    sources = by_edge[:r]
    unmerged = sorted(by_edge[r:]) if p > 0 else by_edge[r:]
    rep = list(range(p)) + unmerged + b_side
    n_out = len(rep)
    assert n_out == n - r
    matrix = torch.zeros(n_out, n)
    dominant = [0] * n
    for s, i in enumerate(rep):
        matrix[s, i] = 1.0
        dominant[i] = s
    for i in sources:
        ranked = sorted(range(p, n_out), key=lambda s: -cos[i][rep[s]])[:topk]
        weights = [math.exp((cos[i][rep[s]] - cos[i][rep[ranked[0]]]) / tau) for s in ranked]
        for s, w in zip(ranked, weights):
            matrix[s, i] = w / sum(weights)
        dominant[i] = ranked[0]
    return matrix, dominant, rep


def ref_plan(keys: Tensor, r: int, p: int, topk: int, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """`keys [B, H, N, d]` -> matrix [B, N - r, N], slot [B, N], rep [B, N - r], row by row."""
    rows = [ref_plan_row(keys[b].mean(dim=0), r, p, topk, tau) for b in range(keys.shape[0])]
    return (torch.stack([m for m, _, _ in rows]), torch.tensor([d for _, d, _ in rows]),
            torch.tensor([rp for _, _, rp in rows]))


def ref_apply(x: Tensor, size: Tensor, matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Size-weighted shares: x' = (M * size) @ x / (M @ size), size' = M @ size."""
    w = matrix * size[:, None, :]
    new_size = torch.einsum("bsn->bs", w)
    return torch.einsum("bsn,bnc->bsc", w, x) / new_size[:, :, None], new_size


@torch.no_grad()
def ref_vit_forward(model: torch.nn.Module, x: Tensor, rs: list[int], topk: int, tau: float,
                    prop_attn: bool = True) -> Tensor:
    """timm VisionTransformer (CLS pooling) by hand, reducing with the reference between attention and MLP."""
    p = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    size = torch.ones(x.shape[0], x.shape[1])
    for i, blk in enumerate(model.blocks):
        att = blk.attn
        bsz, n, c = x.shape
        qkv = att.qkv(blk.norm1(x)).reshape(bsz, n, 3, att.num_heads, c // att.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = att.q_norm(q), att.k_norm(k)
        logits = (q @ k.transpose(-2, -1)) * att.scale
        if prop_attn:
            logits = logits + size.log()[:, None, None, :]
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(bsz, n, c)
        h = x + blk.ls1(att.proj(att.norm(out)))
        if rs[i] > 0:
            matrix, _, _ = ref_plan(k, rs[i], p, topk, tau)
            h, size = ref_apply(h, size, matrix)
        x = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return model.head(model.fc_norm(model.norm(x)[:, 0]))


def _keys(bsz: int, n: int, heads: int = 2, d: int = 8, seed: int = 0) -> Tensor:
    return torch.randn(bsz, heads, n, d, generator=torch.Generator().manual_seed(seed))


def _plan(*args, **kwargs):
    from tokenreduce.methods.token_transforming import transform_plan  # the method under test

    return transform_plan(*args, **kwargs)


def compile_tt(model, x, **settings):
    return tokenreduce.compile(model, (x,), method="token_transforming", inner="eager", **settings)


# ------------------------------------------------------------------------------------------------ the plan
@pytest.mark.parametrize("n, p, r, topk, tau", [(17, 1, 8, 4, 0.1), (17, 1, 3, 2, 1.0), (16, 0, 5, 3, 0.05),
                                                (20, 2, 9, 1, 0.1), (11, 1, 1, 20, 0.3), (65, 1, 16, 4, 0.1)])
def test_plan_matches_reference(n, p, r, topk, tau):
    k = _keys(3, n, seed=n + r)
    matrix, slot, rep = _plan(k, r, p, topk, tau)
    exp_matrix, exp_slot, exp_rep = ref_plan(k, r, p, topk, tau)
    assert matrix.shape == (3, n - r, n)
    assert torch.equal(rep, exp_rep) and torch.equal(slot, exp_slot)
    torch.testing.assert_close(matrix, exp_matrix, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(3, n))            # every token's mass is kept
    for s in range(p):  # protected slots stay pure: their own token, nothing else
        assert torch.equal(matrix[:, s], torch.eye(n)[s].expand(3, n))
    spread = (matrix > 0).sum(dim=1)
    assert int(spread.max()) == min(topk, n - r - p) and int(spread.min()) == 1


def test_r0_is_the_identity_and_too_large_r_names_the_limit():
    k = _keys(2, 17)
    matrix, slot, rep = _plan(k, 0, 1, 4, 0.1)
    assert torch.equal(matrix, torch.eye(17).expand(2, 17, 17)) and torch.equal(slot, rep)
    with pytest.raises(TokenReduceError, match="largest valid r is 8"):
        _plan(k, 9, 1, 4, 0.1)


def test_apply_matrix_is_the_size_weighted_share():
    g = torch.Generator().manual_seed(3)
    x, size = torch.randn(2, 6, 5, generator=g), torch.rand(2, 6, generator=g) + 0.5
    matrix = torch.rand(2, 4, 6, generator=g)
    matrix[0, :, 5] = 0.0  # a dropped token: its NaN must not reach any slot
    x[0, 5] = float("nan")
    got_x, got_size = apply_matrix(x, matrix, size)
    for b in range(2):
        for s in range(4):
            w = [float(matrix[b, s, i] * size[b, i]) for i in range(6)]
            want = sum(w[i] * x[b, i] for i in range(6) if w[i] > 0) / sum(w)
            torch.testing.assert_close(got_x[b, s], want, atol=1e-6, rtol=1e-6)
            assert abs(float(got_size[b, s]) - sum(w)) < 1e-5


# ------------------------------------------------------------------------------------------------ compiled models
@pytest.fixture(scope="module")
def vit64():
    return make_timm_vit(img_size=64)  # 64 patches + CLS = 65 tokens, 4 blocks


@pytest.mark.parametrize("settings, rs, topk, tau, prop_attn", [
    (dict(r=8), [8] * 4, 4, 0.1, True),                                           # the defaults
    (dict(r=[12, 0, 6, 3], topk=2, tau=0.5), [12, 0, 6, 3], 2, 0.5, True),
    (dict(r=5, topk=1, prop_attn=False), [5] * 4, 1, 0.1, False),                 # hard merging
])
def test_compiled_vit_matches_reference_forward(vit64, settings, rs, topk, tau, prop_attn):
    red = compile_tt(vit64, images(2, 64), **settings)
    for x in (images(2, 64), images(3, 64, seed=9)):  # traced at batch 2, runs at batch 3 too
        with torch.no_grad():
            got = red(x)
        want = ref_vit_forward(vit64, x, rs, topk, tau, prop_attn)
        assert float((got - want).abs().max()) <= TOL
    assert red.report.blocks[-1].tokens_out == 65 - sum(rs)
    assert red.report.flops_ratio is not None and red.report.flops_ratio < 0.95


def test_padding_never_shares_across_real_and_padding(bert):
    ids, mask = bert_batch()
    red = tokenreduce.compile(bert, (ids,), {"attention_mask": mask}, method="token_transforming", r=3,
                              inner="eager", count_model_flops=False)
    seen: list[tuple[Tensor, Tensor]] = []
    interp = _Recorder(red.graph_module, seen)
    with torch.no_grad():
        interp.run(ids, mask)
    assert len(seen) == 4
    valid = mask.bool()
    for matrix, rep in seen:
        slot_valid = valid.gather(1, rep)
        cross = matrix * (slot_valid[:, :, None] != valid[:, None, :])
        assert float(cross.abs().max()) == 0.0
        mass = matrix.sum(dim=1)  # a real token keeps all its mass; a padding one may be dropped (no padding slot)
        torch.testing.assert_close(mass[valid], torch.ones_like(mass[valid]))
        assert bool(((mass[~valid] - 1).abs() < 1e-6).logical_or(mass[~valid] == 0).all())
        valid = slot_valid
    # the unpadded row of the padded batch is that row run alone
    with torch.no_grad():
        full = output_tensor(red(ids, attention_mask=mask))
        alone = output_tensor(red(ids[:1], attention_mask=mask[:1]))
    assert float((full[:1] - alone).abs().max()) <= TOL


class _Recorder(torch.fx.Interpreter):
    """Runs a reduced graph and keeps (matrix, rep) of every Token Transforming plan node, in order."""

    def __init__(self, gm: torch.fx.GraphModule, seen: list[tuple[Tensor, Tensor]]) -> None:
        super().__init__(gm)
        self.seen = seen

    def run_node(self, n: torch.fx.Node):  # type: ignore[no-untyped-def]
        out = super().run_node(n)
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "transform_plan":
            self.seen.append((out[0], out[2]))
        return out


# ------------------------------------------------------------------------------------------------ refusals
def test_unmerge_with_shares_is_refused_and_topk1_unmerges(bert):
    ids, mask = bert_batch()
    with pytest.raises(TokenReduceError, match="topk=1") as info:
        tokenreduce.compile(bert, (ids,), {"attention_mask": mask}, method="token_transforming", r=2,
                            unmerge=True, inner="eager", count_model_flops=False)
    assert info.value.setting == "unmerge"
    red = tokenreduce.compile(bert, (ids,), {"attention_mask": mask}, method="token_transforming", r=2, topk=1,
                              unmerge=True, inner="eager", count_model_flops=False)
    with torch.no_grad():
        out = output_tensor(red(ids, attention_mask=mask))
    assert out.shape == (4, 16, 64)
    # hard merging unmerges as ToMe: each original position gets its slot's row, so the unpadded row 0 (16 tokens,
    # 2 merged away at each of 4 blocks) has exactly 8 distinct rows
    assert red.report.blocks[-1].tokens_out == 8
    assert torch.unique(out[0], dim=0).shape[0] == 8


def test_too_large_r_names_the_largest_valid_r(vit64):
    with pytest.raises(TokenReduceError, match="largest constant r for this model is"):
        compile_tt(vit64, images(2, 64), r=20, count_model_flops=False)


@pytest.mark.parametrize("opts, setting, match", [
    (dict(topk=0), "topk", ">= 1"), (dict(topk=2.0), "topk", "must be an int"),
    (dict(tau=0.0), "tau", "> 0"), (dict(tau=float("nan")), "tau", "finite"), (dict(tau="0.1"), "tau", "finite"),
])
def test_options_are_checked(opts, setting, match):
    from tokenreduce.methods.settings import Settings

    with pytest.raises(TokenReduceError, match=match) as info:
        Settings.from_options({"method": "token_transforming", "r": 2, **opts})
    assert info.value.setting == setting


# ------------------------------------------------------------------------------------------------ ONNX
@pytest.fixture(scope="module")
def exported(vit64, tmp_path_factory):
    red = compile_tt(vit64, images(4, 64), r=[12, 8, 6, 4], count_model_flops=False)
    path = tmp_path_factory.mktemp("token_transforming") / "tt.onnx"
    return red, path, export_onnx(red, path)


def test_onnx_export_verifies_and_is_export_safe(exported):
    red, path, res = exported
    assert res.problems == [] and res.verified and res.max_abs_diff is not None and res.max_abs_diff <= TOL
    model = onnx.load(str(path))
    consts = {i.name for i in model.graph.initializer} | {o for nd in model.graph.node if nd.op_type == "Constant"
                                                          for o in nd.output}
    ops = [nd.op_type for nd in model.graph.node]
    assert not {"ScatterND", "NonZero", "Loop", "If"} & set(ops)
    assert not any(op.startswith("tokenreduce") for op in ops)
    topk = [nd for nd in model.graph.node if nd.op_type == "TopK"]
    assert topk and all(nd.input[1] in consts for nd in topk), "every TopK k must be a constant"
    assert check_static(model) == []


@pytest.mark.parametrize("batch", [1, 4])
def test_onnx_runs_like_the_reference(exported, vit64, batch):
    import onnxruntime as ort

    red, path, res = exported
    x = images(batch, 64, seed=40 + batch)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {res.input_names[0]: x.numpy()})
    want = ref_vit_forward(vit64, x, [12, 8, 6, 4], 4, 0.1)
    assert got[0].shape == (batch, 5)
    assert float(np.abs(got[0] - want.numpy()).max()) <= TOL
