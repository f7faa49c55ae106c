"""Zero-TPrune (`method="zero_tprune"`) against references written here from the paper and docs/methods.md.

The references never import `tokenreduce.methods.zero_tprune`: weighted PageRank is checked on a hand example
(numbers worked out by hand, and the stationary distribution from numpy's eigenvectors); the plan reference
(`ref_keep`) works one row at a time with Python lists and `sorted` (I-stage: drop the least important; S-stage:
split the survivors by importance into a more important half B and a less important half A, drop the A tokens
most similar to some B token); the tiny timm ViT and the padded BERT are re-written by hand with PageRank by
explicit power iteration and `ref_keep` between attention and MLP.

Checked: PageRank (hand numbers, convergence to the eigenvector, root-mean-square over heads, padding rows and
columns counting for nothing); the plan against `ref_keep` on random scores and keys with 0/1/2 protected
tokens and padding; compiled CLS-free and CLS ViTs and a padded BERT against the hand-written forwards;
keep_ratio=1 is the unreduced model; a graph traced at batch 2 runs at batch 3; the report's action text and
FLOPs ratio; the ONNX export verifies in onnxruntime, is export-safe and matches the reference at another
batch size; every refusal names the setting and its valid range.
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
from tokenreduce.kernels.attention_graph import pagerank_of_probabilities
from tokenreduce.targets.onnx import check_static, export_onnx

tr = torch.ops.tokenreduce
HAND = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], dtype=torch.float64)  # rows: queries


# ------------------------------------------------------------------------------------------------ PageRank
def test_pagerank_by_hand():
    """s0 = 1/3; s1 = P^T s0 = the column means; s2 = P^T s1, worked out by hand."""
    probs = HAND.float()[None, None]
    torch.testing.assert_close(pagerank_of_probabilities(probs, None, 1, False), torch.tensor([[0.3, 0.45, 0.25]]))
    torch.testing.assert_close(pagerank_of_probabilities(probs, None, 2, False), torch.tensor([[0.27, 0.51, 0.22]]))


def test_pagerank_converges_to_the_stationary_distribution():
    vals, vecs = np.linalg.eig(HAND.numpy().T)
    stationary = np.real(vecs[:, np.argmin(np.abs(vals - 1))])
    stationary = stationary / stationary.sum()
    np.testing.assert_allclose(stationary, np.array([3, 7.5, 2.5]) / 13, atol=1e-7)  # solved by hand
    errors = [np.abs(pagerank_of_probabilities(HAND[None, None], None, t, False)[0].numpy() - stationary).max()
              for t in (5, 10, 100)]
    rate = sorted(np.abs(vals))[-2] ** 5  # the error shrinks by |second eigenvalue| per iteration
    assert errors[1] <= errors[0] * rate * 1.5 and errors[1] > errors[0] * rate / 1.5 and errors[2] < 1e-12


def test_pagerank_heads_by_root_mean_square_and_padding_counts_for_nothing():
    second = torch.tensor([[0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [float("nan")] * 3])  # token 2 is padding
    first = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.5, 0.0], [float("nan")] * 3])
    probs = torch.stack([first, second])[None]  # [1, 2, 3, 3]
    valid = torch.tensor([[True, True, False]])

    def by_hand(p: np.ndarray, steps: int) -> np.ndarray:  # the 2-token graph of the real tokens
        s = np.array([0.5, 0.5])
        for _ in range(steps):
            s = p[:2, :2].T @ s
        return s

    h1, h2 = by_hand(first.double().numpy(), 3), by_hand(second.double().numpy(), 3)
    got = pagerank_of_probabilities(probs, valid, 3, True)[0]
    np.testing.assert_allclose(got[:2].numpy(), np.sqrt((h1**2 + h2**2) / 2), rtol=1e-6)
    assert float(got[2]) == 0.0
    np.testing.assert_allclose(pagerank_of_probabilities(probs, valid, 3, False)[0, :2].numpy(), (h1 + h2) / 2,
                               rtol=1e-6)


def test_pagerank_op_recomputes_the_probabilities():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 6, 4, generator=g), torch.randn(2, 3, 6, 4, generator=g)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    bias = torch.zeros(2, 6).masked_fill(~valid, float("-inf"))[:, None, None, :]
    probs = ((q @ k.transpose(-1, -2)) * 0.5 + bias).softmax(dim=-1)
    want = pagerank_of_probabilities(probs, valid, 5, True)
    torch.testing.assert_close(tr.pagerank_scores(q, k, bias, 0.5, valid, 5, True), want, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ plan reference
def ref_keep(scores: Tensor, keys: Tensor, p: int, keep: int, similar: int, valid: Tensor | None) -> list[list[int]]:
    """Kept token indices per row (protected first, then kept candidates in original order).

    scores [B, N] importance; keys [B, N, d] head-averaged keys; `similar` tokens go in the S-stage, the
    other `N - P - keep - similar` removed tokens in the I-stage."""
    out = []
    n = scores.shape[1]
    for b in range(scores.shape[0]):
        ok = [True] * n if valid is None else valid[b].tolist()
        real = [j for j in range(p, n) if ok[j]]
        pad = [j for j in range(p, n) if not ok[j]]
        ranked = sorted(real, key=lambda j: -float(scores[b, j])) + pad          # padding least important
        survivors = ranked[:keep + similar]                                      # I-stage
        n_b = math.ceil(len(survivors) / 2)
        more, less = survivors[:n_b], survivors[n_b:]                            # B (important), A
        unit = keys[b] / keys[b].norm(dim=-1, keepdim=True)
        # padding first (by index), then the A tokens most similar to some B token
        redundancy = {a: (0, float(a)) if not ok[a] else (1, -max(float(unit[a] @ unit[j]) for j in more))
                      for a in less}
        dropped = sorted(less, key=redundancy.__getitem__)[:similar]             # S-stage
        out.append(list(range(p)) + sorted(set(survivors) - set(dropped)))
    return out


def plan(scores, keys, p, keep, similar, valid=None):
    from tokenreduce.methods.zero_tprune import zero_tprune_plan

    return zero_tprune_plan(scores, keys, p, keep, similar, valid)


@pytest.mark.parametrize("n, p, keep, similar", [(12, 0, 6, 3), (13, 1, 5, 5), (10, 2, 4, 0), (9, 0, 1, 1),
                                                 (11, 1, 7, 3)])
def test_plan_matches_the_reference(n, p, keep, similar):
    g = torch.Generator().manual_seed(n * 10 + p)
    scores, keys = torch.rand(3, n, generator=g), torch.randn(3, 2, n, 4, generator=g)
    slot, rep = plan(scores, keys, p, keep, similar)
    assert rep.tolist() == ref_keep(scores, keys.mean(dim=1), p, keep, similar, None)
    n_out = p + keep
    assert rep.shape == (3, n_out) and slot.shape == (3, n)
    for b in range(3):
        for s, j in enumerate(rep[b].tolist()):
            assert int(slot[b, j]) == s
        assert sorted(j for j in range(n) if int(slot[b, j]) == n_out) == sorted(set(range(n)) - set(rep[b].tolist()))


@pytest.mark.parametrize("keep, similar", [(4, 2), (6, 4), (2, 1)])
def test_plan_with_padding_matches_the_reference(keep, similar):
    g = torch.Generator().manual_seed(keep)
    n = 12
    valid = torch.tensor([[True] * 12, [True] * 8 + [False] * 4, [True] * 3 + [False] * 9])
    scores, keys = torch.rand(3, n, generator=g) * valid, torch.randn(3, n, 4, generator=g)
    _, rep = plan(scores, keys, 1, keep, similar, valid)
    assert rep.tolist() == ref_keep(scores, keys, 1, keep, similar, valid)
    # row 1 has 7 real candidates and 4 padding ones: the padding goes before any real token
    real_kept = sum(bool(valid[1, j]) for j in rep[1].tolist()[1:])
    assert real_kept == min(keep, 7)


def test_plan_refuses_an_s_stage_larger_than_its_a_half():
    with pytest.raises(TokenReduceError, match="at most half"):
        plan(torch.rand(1, 10), torch.randn(1, 10, 4), 0, 2, 3)


# ------------------------------------------------------------------------------------------------ end to end
def pagerank(probs: Tensor, valid: Tensor | None, steps: int) -> Tensor:
    """Weighted PageRank per head by explicit power iteration (s <- P^T s from s = 1/#valid), root mean square
    over heads; probs [B, H, N, N] with rows = queries."""
    bsz, heads, n, _ = probs.shape
    w = torch.ones(bsz, n) if valid is None else valid.float()
    s = (w / w.sum(dim=1, keepdim=True))[:, None, :].repeat(1, heads, 1)
    rows = probs if valid is None else torch.where(valid[:, None, :, None], probs, torch.zeros_like(probs))
    for _ in range(steps):
        s = torch.einsum("bhij,bhi->bhj", rows, s)
    return s.pow(2).mean(dim=1).sqrt()


def ref_step(h: Tensor, probs: Tensor, k: Tensor, p: int, keep_ratio: float, share: float, steps: int,
             valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """One Zero-TPrune step on hidden states h [B, N, C] (counts as docs/methods.md step 2)."""
    m = h.shape[1] - p
    keep = math.ceil(keep_ratio * m)
    similar = math.floor(share * (m - keep) + 1e-9)
    kept = torch.tensor(ref_keep(pagerank(probs, valid, steps), k.mean(dim=1), p, keep, similar, valid))
    h = h.gather(1, kept[:, :, None].expand(-1, -1, h.shape[-1]))
    return h, (valid.gather(1, kept) if valid is not None else None)


@torch.no_grad()
def vit_forward(model, x, layers, keep_ratio=0.5, share=0.5, steps=30):
    p = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        bsz, n, c = x.shape
        q, k, v = a.qkv(blk.norm1(x)).reshape(bsz, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k = a.q_norm(q), a.k_norm(k)
        probs = ((q @ k.transpose(-1, -2)) * a.scale).softmax(dim=-1)
        h = x + blk.ls1(a.proj(a.norm((probs @ v).transpose(1, 2).reshape(bsz, n, c))))
        if i in layers:
            h, _ = ref_step(h, probs, k, p, keep_ratio, share, steps)
        x = h + blk.ls2(blk.mlp(blk.norm2(h)))
    x = model.norm(x)
    return model.head(model.fc_norm(x[:, p:].mean(dim=1) if model.global_pool == "avg" else x[:, 0]))


def compile_zt(model, x, **opts):
    opts.setdefault("count_model_flops", False)
    return tokenreduce.compile(model, (x,), method="zero_tprune", inner="eager", **opts)


@pytest.fixture(scope="module")
def vit_nocls():
    return make_timm_vit(img_size=64, class_token=False, global_pool="avg")


@pytest.fixture(scope="module")
def zt_nocls(vit_nocls):
    """keep 0.5 at blocks 1 and 2 (64 -> 32 -> 16 tokens), 10 PageRank iterations (a smaller ONNX graph than
    the default 30, which the CLS test covers), FLOPs counted."""
    return compile_zt(vit_nocls, images(2, 64), keep_ratio=0.5, layers=[1, 2], iterations=10, count_model_flops=True)


def test_cls_free_vit_matches_the_reference(vit_nocls, zt_nocls):
    x = images(2, 64, seed=21)
    with torch.no_grad():
        got, full = zt_nocls(x), vit_nocls(x)
    assert float((got - vit_forward(vit_nocls, x, {1, 2}, steps=10)).abs().max()) <= TOL
    assert float((got - full).abs().max()) > 1e-3
    blocks = zt_nocls.report.blocks
    assert [(b.tokens_in, b.tokens_out) for b in blocks] == [(64, 64), (64, 32), (32, 16), (16, 16)]
    assert blocks[1].action == "zero_tprune keep 32/64 (I -16, S -16)"
    assert zt_nocls.report.flops_ratio is not None and 0.4 < zt_nocls.report.flops_ratio < 0.9


@pytest.mark.parametrize("opts, steps", [(dict(similarity_share=0.0, iterations=3), 3),
                                         (dict(similarity_share=1.0, keep_ratio=0.6), 30)])
def test_cls_vit_with_other_options_matches_the_reference(opts, steps):
    model = make_timm_vit(img_size=64)
    x = images(2, 64, seed=22)
    opts = dict(dict(keep_ratio=0.5, layers=[0, 2]), **opts)
    red = compile_zt(model, x, **opts)
    want = vit_forward(model, x, {0, 2}, opts["keep_ratio"], opts["similarity_share"], steps)
    with torch.no_grad():
        assert float((red(x) - want).abs().max()) <= TOL


def test_keep_ratio_1_is_the_unreduced_model(vit_nocls):
    x = images(2, 64)
    red = compile_zt(vit_nocls, x, keep_ratio=1.0)
    assert not red.report.reduced_blocks
    with torch.no_grad():
        assert float((red(x) - vit_nocls(x)).abs().max()) <= 1e-5


def test_traced_at_batch_2_runs_at_batch_3(vit_nocls, zt_nocls):
    x = images(3, 64, seed=23)
    with torch.no_grad():
        assert float((zt_nocls(x) - vit_forward(vit_nocls, x, {1, 2}, steps=10)).abs().max()) <= TOL


@torch.no_grad()
def bert_forward(bert, ids, mask, layers, keep_ratio=0.5, share=0.5, steps=30):
    x = bert.embeddings(input_ids=ids)
    valid = mask.bool()
    for i, layer in enumerate(bert.encoder.layer):
        sa, so = layer.attention.self, layer.attention.output
        bsz, n, c = x.shape
        heads, d = sa.num_attention_heads, sa.attention_head_size
        q, k, v = (f(x).view(bsz, n, heads, d).transpose(1, 2) for f in (sa.query, sa.key, sa.value))
        bias = torch.zeros(bsz, n).masked_fill(~valid, float("-inf"))[:, None, None, :]
        probs = ((q @ k.transpose(-1, -2)) * d ** -0.5 + bias).softmax(dim=-1)
        h = so.LayerNorm(x + so.dense((probs @ v).transpose(1, 2).reshape(bsz, n, c)))
        if i in layers:
            h, valid = ref_step(h, probs, k, 1, keep_ratio, share, steps, valid)
        x = layer.output.LayerNorm(h + layer.output.dense(layer.intermediate(h)))
    return x


def test_padded_text_batch_matches_the_reference(bert):
    ids, mask = bert_batch()
    red = tokenreduce.compile(bert, (ids,), {"attention_mask": mask}, method="zero_tprune", keep_ratio=0.5,
                              layers=[1], inner="eager", count_model_flops=False)
    with torch.no_grad():
        got = output_tensor(red(ids, attention_mask=mask))
    want = bert_forward(bert, ids, mask, {1})
    assert got.shape == want.shape == (4, 1 + 8, 64)
    assert float((got - want).abs().max()) <= TOL


# ------------------------------------------------------------------------------------------------ ONNX
def test_onnx_export_verifies_and_is_export_safe(vit_nocls, zt_nocls, tmp_path):
    import onnxruntime as ort

    path = tmp_path / "zero_tprune.onnx"
    res = export_onnx(zt_nocls, path)
    assert res.problems == [] and res.verified and res.max_abs_diff is not None and res.max_abs_diff <= TOL
    model = onnx.load(str(path))
    consts = {i.name for i in model.graph.initializer} | {o for nd in model.graph.node if nd.op_type == "Constant"
                                                          for o in nd.output}
    ops = [nd.op_type for nd in model.graph.node]
    assert not {"ScatterND", "NonZero", "Loop", "If"} & set(ops)
    assert not any(nd.domain.startswith("tokenreduce") for nd in model.graph.node)
    topk = [nd for nd in model.graph.node if nd.op_type == "TopK"]
    assert topk and all(nd.input[1] in consts for nd in topk), "every TopK k must be a constant"
    assert check_static(model) == []
    x = images(3, 64, seed=24)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {res.input_names[0]: x.numpy()})
    assert float(np.abs(out[0] - vit_forward(vit_nocls, x, {1, 2}, steps=10).numpy()).max()) <= TOL


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("opts, setting, match", [
    (dict(similarity_share=1.5), "similarity_share", r"similarity_share must be a number in \[0, 1\]"),
    (dict(similarity_share="half"), "similarity_share", "similarity_share must be a number"),
    (dict(iterations=0), "iterations", r"iterations must be in 1..100"),
    (dict(iterations=2.0), "iterations", "iterations must be an int"),
    (dict(head_aggregation="max"), "head_aggregation", "unknown head_aggregation 'max'"),
    (dict(keep_ratio=0.0), "keep_ratio", r"keep_ratio must be in \(0, 1\]"),
])
def test_options_are_checked(opts, setting, match):
    with pytest.raises(TokenReduceError, match=match) as e:
        tokenreduce.Settings.from_options(method="zero_tprune", **opts)
    assert e.value.setting == setting


def test_unmerge_and_out_of_range_layers_are_refused(vit_nocls):
    with pytest.raises(TokenReduceError, match="unmerge") as e:
        compile_zt(vit_nocls, images(2, 64), keep_ratio=0.5, unmerge=True)
    assert e.value.setting == "unmerge"
    with pytest.raises(TokenReduceError, match=r"valid layers 0..3") as e:
        compile_zt(vit_nocls, images(2, 64), keep_ratio=0.5, layers=[4])
    assert e.value.setting == "layers"


def test_too_large_similarity_share_names_the_largest_valid_one(vit_nocls):
    # keep 0.3 of 64: keep 20, 44 removed; share 1 asks the S-stage for all 44, its A half holds at most 20
    with pytest.raises(TokenReduceError, match=r"largest valid similarity_share there is 0.455") as e:
        compile_zt(vit_nocls, images(2, 64), keep_ratio=0.3, layers=[1], similarity_share=1.0)
    assert e.value.setting == "similarity_share"
    red = compile_zt(vit_nocls, images(2, 64), keep_ratio=0.3, layers=[1], similarity_share=0.455)
    assert red.report.blocks[1].action == "zero_tprune keep 20/64 (I -24, S -20)"
