"""PiToMe (`method="pitome"`) against an independent reference written here from the paper and the official code.

The reference (`ref_step`) follows Tran et al., "Accelerating Transformers with Spectrum-Preserving Token
Merging" (NeurIPS 2024) and the arithmetic of the official `pitome_vision`, `pitome` and `pitome_bsm` functions
(hchautran/PiToMe `algo/pitome/merge.py`) step by step, one row at a time with Python lists: ELU written out,
`argsort` for the energy order, A/B split by alternate ranks, each A token's best B (protect-and-merge: every A
of the 2r highest energies; energy-ordered matching: the r best edges over all candidates), size-weighted
average, the official output orders. It never imports `tokenreduce.methods.pitome`. Padding follows the rule
docs/methods.md states (padding candidates first, then the real ones by energy; same-kind partners before
cross-padding ones; a cross-padding source dropped).

Checked: the plan (slots, representatives, merged tokens and sizes) against the reference on random keys,
with and without padding, for both merge kinds; the tiny timm ViT compiled with `method="pitome"` against a
hand-written forward that merges with the reference (the defaults, an r list with protect-and-merge only, a
constant margin without proportional attention and other `bsm_layers`); r=0 is the identity; a graph traced
at batch 2 runs at batch 3; in a padded text batch, padding goes before any real token; ONNX export verifies
in onnxruntime and stays export-safe; a too-large r names the largest valid r; options are checked.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import TOL, bert_batch, images, make_timm_vit, output_tensor
from torch import Tensor

import tokenreduce
from tokenreduce import TokenReduceError
from tokenreduce.kernels.reference import apply_plan
from tokenreduce.targets.onnx import check_static, export_onnx

OFFICIAL_MARGIN = 0.75  # official ViT schedule: block l of L uses 0.75 - 0.75 * l / L


# ------------------------------------------------------------------------------------------------ reference
def elu(z: Tensor, alpha: float) -> Tensor:
    """ELU: z for z > 0, alpha * (exp(z) - 1) otherwise."""
    return torch.where(z > 0, z, alpha * torch.expm1(z))


@torch.no_grad()
def ref_step(x: Tensor, size: Tensor, metric: Tensor, r: int, num_protected: int, margin: float,
             alpha: float = 1.0, valid: Tensor | None = None, bsm: bool = False
             ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """One PiToMe merge on a batch, row by row (`bsm`: the official `pitome_bsm` matching, else `pitome`).

    x [B, N, C], size [B, N], metric [B, N, d] head-averaged keys (not normalised), valid [B, N] or None.
    Returns x' [B, N-r, C], size' [B, N-r], valid' (or None), slot [B, N] (output slot of each input token)
    and rep [B, N-r] (input token each output slot stands for).
    """
    outs = [_ref_row(x[b], size[b], metric[b], r, num_protected, margin, alpha,
                     None if valid is None else valid[b].tolist(), bsm) for b in range(x.shape[0])]
    new_x, new_size, slot, rep = (torch.stack([o[i] for o in outs]) for i in range(4))
    new_valid = None if valid is None else valid.gather(1, rep)
    return new_x, new_size, new_valid, slot, rep


def _ref_row(x: Tensor, size: Tensor, metric: Tensor, r: int, p: int, margin: float, alpha: float,
             valid: list[bool] | None, bsm: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n = x.shape[0]
    real = [j for j in range(p, n) if valid is None or valid[j]]
    pad = [j for j in range(p, n) if valid is not None and not valid[j]]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    sim = unit @ unit.T                                                   # cosine graph of the keys
    # energy: mean over the (real) candidates j of elu(cos(i, j) - m), j = i included (official)
    energy = elu(sim[:, real] - margin, alpha).mean(dim=1)
    by_energy = [real[i] for i in torch.argsort(energy[real], descending=True).tolist()]
    order = pad + by_energy                                               # padding first, by index

    def ok(j: int) -> bool:
        return valid is None or valid[j]

    def best_b(a: int, b_set: list[int]) -> tuple[int, float]:
        """Most similar B of the same kind; else the first B at -2 (padding A) / -3 (real A)."""
        same = [b for b in b_set if ok(b) == ok(a)]
        if same:
            dst = max(same, key=lambda b: float(sim[a, b]))
            return dst, float(sim[a, dst])
        return b_set[0], -2.0 if not ok(a) else -3.0

    weight = {t: float(size[t]) for t in range(n)}
    if bsm:  # all candidates split A/B by energy rank; ToMe's matching: the r best edges merge
        a_set, b_set = order[0::2], order[1::2]
        best = [best_b(a, b_set) for a in a_set]
        edge_score = [s - 1e-6 * i if s < -1.5 else s for i, (_, s) in enumerate(best)]  # sentinel ties by index
        edges = sorted(range(len(a_set)), key=lambda i: -edge_score[i])
        merged = [(a_set[i], best[i][0]) for i in edges[:r]]
        out = list(range(p)) + [a_set[i] for i in edges[r:]] + b_set      # official pitome_bsm order
    else:  # protect the lowest energies, every A of the 2r highest merges
        a_set, b_set, kept = order[:2 * r:2], order[1:2 * r:2], order[2 * r:]
        merged = [(a, best_b(a, b_set)[0]) for a in a_set]
        assert all(not ok(a) or ok(b) for a, b in merged), "a real token must always find a real partner"
        out = list(range(p)) + kept + b_set                               # official pitome order
    slot = {t: i for i, t in enumerate(out)}
    for a, dst in merged:
        slot[a] = slot[dst]
        if ok(a) != ok(dst):
            weight[a] = 0.0                                               # across padding: dropped
    new_x = torch.zeros(len(out), x.shape[1], dtype=x.dtype)
    wsum = torch.zeros(len(out), dtype=x.dtype)
    new_size = torch.zeros(len(out), dtype=size.dtype)
    for t in range(n):
        new_x[slot[t]] += weight[t] * x[t]
        wsum[slot[t]] += weight[t]
        new_size[slot[t]] += size[t] if weight[t] > 0 else 0.0
    return (new_x / wsum[:, None], new_size, torch.tensor([slot[t] for t in range(n)]), torch.tensor(out))


@torch.no_grad()
def ref_vit_forward(model: torch.nn.Module, x: Tensor, rs: list[int], margins: list[float], alpha: float = 1.0,
                    prop_attn: bool = True, bsm_blocks: tuple[int, ...] = (0, 1)) -> Tensor:
    """timm VisionTransformer (CLS pooling) by hand, with `ref_step` between each attention residual and MLP.
    `bsm_blocks` default: the official timm patch's first ceil(L / 2) blocks of the 4-block test models."""
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
            logits = logits + size.log()[:, None, None, :]                # proportional attention
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(bsz, n, c)
        h = x + blk.ls1(att.proj(att.norm(out)))
        if rs[i] > 0:
            h, size, _, _, _ = ref_step(h, size, k.mean(dim=1), rs[i], p, margins[i], alpha, bsm=i in bsm_blocks)
        x = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return model.head(model.fc_norm(model.norm(x)[:, 0]))


def official_margins(depth: int) -> list[float]:
    return [OFFICIAL_MARGIN - OFFICIAL_MARGIN * i / depth for i in range(depth)]


def compile_pitome(model, x, **settings):
    return tokenreduce.compile(model, (x,), method="pitome", inner="eager", count_model_flops=False, **settings)


# ------------------------------------------------------------------------------------------------ the plan
def _keys(bsz: int, n: int, heads: int = 2, d: int = 8, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bsz, heads, n, d, generator=g)


def _plan(*args, **kwargs):
    from tokenreduce.methods.pitome import pitome_plan  # the method under test

    return pitome_plan(*args, **kwargs)


@pytest.mark.parametrize("bsm", [False, True])
@pytest.mark.parametrize("n, p, r, margin", [(17, 1, 8, 0.75), (17, 1, 3, 0.3), (16, 0, 5, 0.0),
                                             (20, 2, 9, 0.5), (11, 1, 1, -0.2), (65, 1, 16, 0.5625)])
def test_plan_matches_reference(n, p, r, margin, bsm):
    k = _keys(3, n, seed=n + r)
    x = torch.randn(3, n, 6, generator=torch.Generator().manual_seed(7))
    size = torch.rand(3, n, generator=torch.Generator().manual_seed(8)) + 0.5
    slot, rep, keep = _plan(k, r, p, margin, 1.0, bsm=bsm)
    exp_x, exp_size, _, exp_slot, exp_rep = ref_step(x, size, k.mean(dim=1), r, p, margin, bsm=bsm)
    assert slot.shape == (3, n) and rep.shape == (3, n - r)
    assert torch.equal(slot, exp_slot) and torch.equal(rep, exp_rep)
    assert torch.equal(keep, torch.ones(3, n))
    got_x, got_size = apply_plan(x, slot, size * keep, size, n - r)
    torch.testing.assert_close(got_x, exp_x, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_size, exp_size)


def test_plan_protects_the_most_isolated_tokens():
    """Eight near-identical keys and four far-apart ones: r=4 merges inside the cluster only."""
    g = torch.Generator().manual_seed(3)
    base = torch.cat([torch.zeros(4), torch.rand(4, generator=g) + 0.5])     # lives in dims 4..7
    cluster = base + 0.01 * torch.randn(8, 8, generator=g)
    loners = torch.eye(8)[:4] * 5                                           # dims 0..3, one each
    k = torch.cat([torch.zeros(1, 8), loners[:2], cluster, loners[2:]])[None, None]  # CLS, 2 loners, 8, 2 loners
    slot, rep, _ = _plan(k, 4, 1, 0.5, bsm=False)
    merged = [t for t in range(13) if t not in rep[0].tolist()]
    assert len(merged) == 4 and all(3 <= t < 11 for t in merged)
    assert {1, 2, 11, 12} <= set(rep[0].tolist())


@pytest.mark.parametrize("bsm", [False, True])
@pytest.mark.parametrize("r", [1, 3, 5, 7])
def test_plan_with_padding_matches_reference(r, bsm):
    n, p = 16, 1
    valid = torch.zeros(4, n, dtype=torch.bool)
    for row, length in enumerate((16, 11, 14, 2)):  # 0, 5, 2 and 14 padding tokens
        valid[row, :length] = True
    k = _keys(4, n, seed=r)
    x = torch.randn(4, n, 6, generator=torch.Generator().manual_seed(9))
    size = torch.rand(4, n, generator=torch.Generator().manual_seed(10)) + 0.5
    slot, rep, keep = _plan(k, r, p, 0.4, 1.0, valid, bsm)
    exp_x, exp_size, exp_valid, exp_slot, exp_rep = ref_step(x, size, k.mean(dim=1), r, p, 0.4, valid=valid,
                                                             bsm=bsm)
    assert torch.equal(slot, exp_slot) and torch.equal(rep, exp_rep)
    got_x, got_size = apply_plan(x, slot, size * keep, size, n - r)
    torch.testing.assert_close(got_x, exp_x, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_size, exp_size)
    assert exp_valid is not None
    # no real token is lost: every real input token lands in a real slot with a nonzero weight
    real_slot_ok = exp_valid.gather(1, slot) & (keep > 0)
    assert bool(real_slot_ok[valid].all())


def test_plan_r0_is_identity_and_too_large_r_names_the_limit():
    k = _keys(2, 17)
    slot, rep, keep = _plan(k, 0, 1, 0.5)
    assert torch.equal(slot, torch.arange(17).expand(2, 17)) and torch.equal(rep, slot)
    assert torch.equal(keep, torch.ones(2, 17))
    with pytest.raises(TokenReduceError, match="largest valid r is 8"):
        _plan(k, 9, 1, 0.5)


# ------------------------------------------------------------------------------------------------ compiled models
@pytest.fixture(scope="module")
def vit64():
    return make_timm_vit(img_size=64)  # 64 patches + CLS = 65 tokens, 4 blocks


@pytest.mark.parametrize("settings, rs, margins, prop_attn, bsm", [
    (dict(r=8), [8, 8, 8, 8], None, True, (0, 1)),                                 # the defaults
    (dict(r=[12, 0, 6, 3], bsm_layers=[]), [12, 0, 6, 3], None, True, ()),         # protect-and-merge only
    (dict(r=5, margin=0.3, alpha=0.5, prop_attn=False, bsm_layers=[1, 3]), [5] * 4, [0.3] * 4, False, (1, 3)),
])
def test_compiled_vit_matches_reference_forward(vit64, settings, rs, margins, prop_attn, bsm):
    x = images(2, 64)
    red = compile_pitome(vit64, x, **settings)
    margins = margins if margins is not None else official_margins(4)
    alpha = settings.get("alpha", 1.0)
    with torch.no_grad():
        got = red(x)
    want = ref_vit_forward(vit64, x, rs, margins, alpha, prop_attn, bsm)
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    n = 65
    for blk, r, m in zip(red.report.blocks, rs, margins):
        assert (blk.tokens_in, blk.tokens_out) == (n, n - r)
        assert blk.action == (f"pitome r={r} m={m:.3g}" + (" bsm" if blk.index in bsm else "") if r else "-")
        n -= r


def test_traced_at_batch_2_runs_at_batch_3(vit64):
    red = compile_pitome(vit64, images(2, 64), r=10)
    x3 = images(3, 64, seed=5)
    with torch.no_grad():
        got = red(x3)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, ref_vit_forward(vit64, x3, [10] * 4, official_margins(4)), atol=TOL, rtol=TOL)


def test_r0_is_the_unreduced_model(timm_vit):
    x = images(2)
    red = compile_pitome(timm_vit, x, r=0)
    with torch.no_grad():
        torch.testing.assert_close(red(x), timm_vit(x), atol=1e-6, rtol=1e-6)
    assert all(b.tokens_in == b.tokens_out == 17 for b in red.report.blocks)


def test_too_large_r_names_the_largest_valid_r(timm_vit):
    # 17 tokens, CLS protected, 4 blocks: r=4 leaves 9 tokens at block 2 and 5 at block 3, where at most
    # (5 - 1) // 2 = 2 can merge; the largest constant r is 3 (17 -> 14 -> 11 -> 8 -> 5).
    with pytest.raises(TokenReduceError, match=r"largest valid r there is 2; the largest constant r for this "
                                               r"model is 3") as e:
        compile_pitome(timm_vit, images(2), r=4)
    assert e.value.setting == "r"
    red = compile_pitome(timm_vit, images(2), r=4, clamp_r=True)
    assert "clamped" in red.report.blocks[3].reason


@pytest.mark.parametrize("opts, setting, match", [
    (dict(margin=1.5), "margin", r"margin must be in \[-1, 1\]"),
    (dict(margin="0.5"), "margin", "margin must be a finite number"),
    (dict(alpha=0.0), "alpha", "alpha must be > 0"),
    (dict(bsm_layers="1"), "bsm_layers", "bsm_layers must be an int or a list of ints"),
    (dict(keep_ratio=0.5), "keep_ratio", "keep_ratio is a evit .* setting, not a pitome one"),
])
def test_options_are_checked(opts, setting, match):
    with pytest.raises(TokenReduceError, match=match) as e:
        tokenreduce.Settings.from_options(method="pitome", **opts)
    assert e.value.setting == setting


def test_bsm_layers_outside_the_model_are_refused(timm_vit):
    with pytest.raises(TokenReduceError, match=r"bsm_layers \[4\] out of range: the model has 4 transformer "
                                               r"blocks \(valid 0..3\)") as e:
        compile_pitome(timm_vit, images(2), r=1, bsm_layers=[0, 4])
    assert e.value.setting == "bsm_layers"


def test_padding_is_merged_before_real_tokens(bert):
    """Protect-and-merge at every block (bsm_layers=[]; the energy-ordered matching handles padding as ToMe),
    r=1 at 4 blocks: rows with >= 4 padding tokens only merge padding (their real tokens come out exactly
    as the unreduced model's), a row with 3 drops its last padding token at block 2 and merges a real pair
    at block 3, and the unpadded row merges real tokens from block 0."""
    ids, mask = bert_batch()  # lengths 16, 11, 7, 13 of 16: 0, 5, 9 and 3 padding tokens
    red = tokenreduce.compile(bert, (ids,), {"attention_mask": mask}, method="pitome", r=1, unmerge=True,
                              bsm_layers=[], inner="eager", count_model_flops=False)
    with torch.no_grad():
        got = output_tensor(red(ids, attention_mask=mask))
        full = output_tensor(bert(ids, attention_mask=mask))
    real = mask.bool()
    diff = (got - full).abs().amax(dim=-1).masked_fill(~real, 0).amax(dim=-1)
    assert float(diff[1]) <= TOL and float(diff[2]) <= TOL
    assert float(diff[0]) > 1e-2 and float(diff[3]) > 1e-2


# ------------------------------------------------------------------------------------------------ ONNX
@pytest.fixture(scope="module")
def exported(vit64, tmp_path_factory):
    red = compile_pitome(vit64, images(4, 64), r=[12, 8, 6, 4])
    path = tmp_path_factory.mktemp("pitome") / "pitome.onnx"
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
    for nd in model.graph.node:
        if nd.op_type == "ScatterElements":
            assert any(a.name == "reduction" and a.s == b"add" for a in nd.attribute), nd.name
    assert check_static(model) == []


@pytest.mark.parametrize("batch", [1, 4])
def test_onnx_runs_like_the_reduced_model(exported, vit64, batch):
    import onnxruntime as ort

    red, path, res = exported
    x = images(batch, 64, seed=40 + batch)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {res.input_names[0]: x.numpy()})
    want = ref_vit_forward(vit64, x, [12, 8, 6, 4], official_margins(4))
    assert got[0].shape == (batch, 5)
    assert float(np.abs(got[0] - want.numpy()).max()) <= TOL
    assert red.report.blocks[-1].tokens_out == 65 - 30
