"""Attention-received scoring (`tokenreduce::received_scores`) and EViT on models without a CLS token.

The references here are written from docs/methods.md ("EViT", "CLS-free scoring"), not from the code: the
received score of key j is `sum over the valid queries i of P[h, i, j] / (number of valid queries)`, averaged
over heads, computed with explicit loops; the model forwards (tiny timm ViT without a CLS token, tiny padded
BERT) are re-written by hand from their submodules, with EViT's keep-top-k-and-fuse step between attention and
MLP ranking by that score and fusing the pruned tokens by it.

Checked: the op against the loop reference (additive bias, bool masks with fully masked padding rows), one
PageRank iteration with the head mean is the same score, gradcheck; EViT on a CLS-free ViT (the default
`score="auto"` picks the received score) and on a padded BERT with `score="received"` against the hand-written
forwards; `auto` keeps the CLS row on a CLS model; `score="cls"` without a CLS token is refused by name; only
the scoring blocks compute the probabilities (every SDPA stays); the ONNX export verifies in onnxruntime with
no tokenreduce op left; a graph traced at batch 2 runs at batch 3.
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
from tokenreduce.kernels import attention_graph
from tokenreduce.targets.onnx import check_static, export_onnx

tr = torch.ops.tokenreduce


# ------------------------------------------------------------------------------------------------ reference
def loop_received(q: Tensor, k: Tensor, scale: float, bias: Tensor | None, valid: Tensor | None) -> Tensor:
    """Received attention by loops: per row b and head h, softmax each valid query's logits, add the rows up,
    divide by the number of valid queries; then average the heads. `bias` broadcasts to [B, H, N, N]."""
    bsz, heads, n, _ = q.shape
    out = torch.zeros(bsz, n, dtype=torch.float64)
    for b in range(bsz):
        queries = [i for i in range(n) if valid is None or bool(valid[b, i])]
        for h in range(heads):
            col = torch.zeros(n, dtype=torch.float64)
            for i in queries:
                logits = (q[b, h, i].double() @ k[b, h].double().T) * scale
                if bias is not None:
                    logits = logits + bias.expand(bsz, heads, n, n)[b, h, i].double()
                col += torch.softmax(logits, dim=0)
            out[b] += col / len(queries) / heads
    return out


def evit_received_step(h: Tensor, received: Tensor, keep_ratio: float, p: int,
                       valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """EViT with the received score: keep the top ceil(rho (N - P)) candidates (descending score; padding
    below every real token, by index), fuse the pruned ones as their score-weighted average (last slot; 0
    when their weights sum to 0, i.e. only padding was pruned)."""
    bsz, n, _ = h.shape
    keep = math.ceil(keep_ratio * (n - p))
    cand = received[:, p:]
    ranked = cand.clone()
    if valid is not None:
        sentinel = -1.0 - 1e-6 * torch.arange(n - p, dtype=cand.dtype)
        ranked = torch.where(valid[:, p:], cand, sentinel)
    top = ranked.topk(keep, dim=-1, sorted=True).indices
    rows, valids = [], []
    for b in range(bsz):
        kept = top[b].tolist()
        pruned = [j for j in range(n - p) if j not in kept]
        w = cand[b, pruned]
        fused = (w[:, None] * h[b, p:][pruned]).sum(0) / w.sum() if float(w.sum()) > 0 else torch.zeros_like(h[b, 0])
        rows.append(torch.cat([h[b, :p], h[b, p:][kept], fused[None]]))
        if valid is not None:
            best = pruned[int(torch.argmax(w))]
            valids.append(torch.cat([valid[b, :p], valid[b, p:][kept], valid[b, p + best: p + best + 1]]))
    return torch.stack(rows), (torch.stack(valids) if valid is not None else None)


@torch.no_grad()
def vit_forward(model: torch.nn.Module, x: Tensor, layers: set[int], keep_ratio: float) -> Tensor:
    """timm ViT by hand (pre-LN, no padding, EViT's default: no proportional attention), EViT-received at
    `layers` (the CLS-free model protects nothing; with a CLS token, the CLS token is protected)."""
    p = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        bsz, n, c = x.shape
        qkv = a.qkv(blk.norm1(x)).reshape(bsz, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        probs = ((a.q_norm(q) @ a.k_norm(k).transpose(-1, -2)) * a.scale).softmax(dim=-1)
        h = x + blk.ls1(a.proj(a.norm((probs @ v).transpose(1, 2).reshape(bsz, n, c))))
        if i in layers:
            h, _ = evit_received_step(h, probs.mean(dim=2).mean(dim=1), keep_ratio, p)
        x = h + blk.ls2(blk.mlp(blk.norm2(h)))
    x = model.norm(x)
    pooled = x[:, p:].mean(dim=1) if model.global_pool == "avg" else x[:, 0]
    return model.head(model.fc_norm(pooled))


@torch.no_grad()
def bert_forward(bert: torch.nn.Module, ids: Tensor, mask: Tensor, layers: set[int], keep_ratio: float) -> Tensor:
    """transformers BertModel by hand (post-LN), padding keys at -inf, EViT-received at `layers` (the first
    token protected, as text models are): the last hidden state."""
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
            w = valid.float() / valid.float().sum(dim=1, keepdim=True)  # mean over the valid queries
            received = (probs * w[:, None, :, None]).sum(dim=2).mean(dim=1)
            h, valid = evit_received_step(h, received, keep_ratio, 1, valid)
        x = layer.output.LayerNorm(h + layer.output.dense(layer.intermediate(h)))
    return x


# ------------------------------------------------------------------------------------------------ the op
def _qk(bsz: int = 2, heads: int = 3, n: int = 7, d: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bsz, heads, n, d, generator=g), torch.randn(bsz, heads, n, d, generator=g)


def test_received_scores_match_the_loop_reference():
    q, k = _qk()
    valid = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    size = torch.tensor([[1.0, 2, 1, 1, 3, 1, 1], [1, 1, 2, 1, 1, 1, 1]])
    bias = torch.where(valid, size.log(), torch.tensor(float("-inf")))[:, None, None, :]  # log(size) + padding
    want = loop_received(q, k, 0.5, bias, valid)
    got = tr.received_scores(q, k, bias, 0.5, valid)
    assert got.shape == (2, 7)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert float(got[1, 5:].abs().max()) == 0.0  # padding keys receive nothing
    torch.testing.assert_close(got.sum(dim=1), torch.ones(2), atol=1e-6, rtol=0)  # a distribution over keys
    # without padding and bias: the plain column mean over all queries
    torch.testing.assert_close(tr.received_scores(q, k, None, 0.5, None).double(), loop_received(q, k, 0.5, None, None),
                               atol=1e-6, rtol=1e-5)


def test_fully_masked_padding_queries_count_for_nothing():
    """A per-query bool mask whose padding rows attend to nothing (NaN rows in a plain softmax) gives the
    same scores as a key-only mask: padding queries weigh exactly 0."""
    q, k = _qk(seed=3)
    valid = torch.tensor([[True] * 4 + [False] * 3, [True] * 6 + [False]])
    per_query = (valid[:, :, None] & valid[:, None, :])[:, None]  # [B, 1, N, N]
    got = tr.received_scores(q, k, per_query, 0.5, valid)
    assert torch.isfinite(got).all()
    key_only = torch.zeros(2, 7).masked_fill(~valid, float("-inf"))[:, None, None, :]
    torch.testing.assert_close(got.double(), loop_received(q, k, 0.5, key_only, valid), atol=1e-6, rtol=1e-5)


def test_one_pagerank_iteration_with_the_head_mean_is_the_received_score():
    q, k = _qk(seed=5)
    valid = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    bias = torch.zeros(2, 7).masked_fill(~valid, float("-inf"))[:, None, None, :]
    torch.testing.assert_close(tr.pagerank_scores(q, k, bias, 0.3, valid, 1, False),
                               tr.received_scores(q, k, bias, 0.3, valid), atol=1e-7, rtol=0)


def test_received_scores_gradcheck():
    q, k = (t.double().requires_grad_(True) for t in _qk(heads=2, n=4, d=2, seed=7))
    bias = torch.randn(2, 1, 1, 4, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True] * 4, [True] * 3 + [False]])
    assert torch.autograd.gradcheck(lambda a, b, c: tr.received_scores(a, b, c, 0.4, valid), (q, k, bias))


def test_self_attention_only():
    q, k = _qk()
    with pytest.raises(TokenReduceError, match="self-attention"):
        attention_graph.received_scores_reference(q[:, :, :3], k, None, 0.5, None)


# ------------------------------------------------------------------------------------------------ EViT
@pytest.fixture(scope="module")
def vit_nocls():
    return make_timm_vit(img_size=64, class_token=False, global_pool="avg")


def compile_evit(model, x, **opts):
    return tokenreduce.compile(model, (x,), method="evit", inner="eager", count_model_flops=False, **opts)


@pytest.fixture(scope="module")
def evit_nocls(vit_nocls):
    """EViT keep 0.5 at blocks 1 and 2 of the CLS-free ViT, default score ("auto": received here)."""
    return compile_evit(vit_nocls, images(2, 64), keep_ratio=0.5, layers=[1, 2])


@pytest.mark.parametrize("layers, keep_ratio", [([1, 2], 0.5), ([0, 3], 0.7)])
def test_evit_on_a_cls_free_vit_matches_the_reference(vit_nocls, evit_nocls, layers, keep_ratio):
    x = images(2, 64, seed=11)
    red = evit_nocls if layers == [1, 2] else compile_evit(vit_nocls, x, keep_ratio=keep_ratio, layers=layers)
    with torch.no_grad():
        got = red(x)
    want = vit_forward(vit_nocls, x, set(layers), keep_ratio)
    assert float((got - want).abs().max()) <= TOL
    with torch.no_grad():
        assert float((got - vit_nocls(x)).abs().max()) > 1e-3  # it did reduce
    reducing = [b for b in red.report.blocks if b.tokens_out < b.tokens_in]
    assert [b.index for b in reducing] == layers
    assert all(b.action.endswith("(received)") for b in reducing)
    # only the scoring blocks materialise attention: one received_scores node each, every SDPA stays
    nodes = list(red.graph_module.graph.nodes)
    assert sum(n.target is tr.received_scores.default for n in nodes) == len(layers)
    assert sum(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in nodes) == 4


def test_evit_auto_keeps_the_cls_row_on_a_cls_model():
    model = make_timm_vit(img_size=64)
    x = images(2, 64, seed=12)
    auto, received = (compile_evit(model, x, keep_ratio=0.5, layers=[1], score=s) for s in ("auto", "received"))
    targets = [n.target for n in auto.graph_module.graph.nodes]
    assert tr.query_row_scores.default in targets and tr.received_scores.default not in targets  # the CLS row
    with torch.no_grad():
        got, cls = received(x), auto(x)
    assert float((got - vit_forward(model, x, {1}, 0.5)).abs().max()) <= TOL  # CLS protected, ranked by received
    assert float((got - cls).abs().max()) > 1e-4
    assert "(received)" not in auto.report.blocks[1].action and "(received)" in received.report.blocks[1].action


def test_evit_cls_score_without_a_cls_token_is_refused(vit_nocls):
    with pytest.raises(TokenReduceError, match="score='received'") as e:
        compile_evit(vit_nocls, images(2, 64), keep_ratio=0.5, score="cls")
    assert e.value.setting == "score" and "CLS" in str(e.value)
    with pytest.raises(TokenReduceError, match="unknown score 'row'") as e:
        compile_evit(vit_nocls, images(2, 64), keep_ratio=0.5, score="row")
    assert e.value.setting == "score"


def test_evit_received_on_a_padded_text_batch(bert):
    ids, mask = bert_batch()
    red = tokenreduce.compile(bert, (ids,), {"attention_mask": mask}, method="evit", keep_ratio=0.5, layers=[1],
                              score="received", inner="eager", count_model_flops=False)
    with torch.no_grad():
        got = output_tensor(red(ids, attention_mask=mask))
    want = bert_forward(bert, ids, mask, {1}, 0.5)
    assert got.shape == want.shape == (4, 1 + 8 + 1, 64)
    assert float((got - want).abs().max()) <= TOL


def test_traced_at_batch_2_runs_at_batch_3(vit_nocls, evit_nocls):
    x = images(3, 64, seed=13)
    with torch.no_grad():
        got = evit_nocls(x)
    assert float((got - vit_forward(vit_nocls, x, {1, 2}, 0.5)).abs().max()) <= TOL


def test_onnx_export_of_received_scoring_verifies(vit_nocls, evit_nocls, tmp_path):
    import onnxruntime as ort

    red = evit_nocls
    path = tmp_path / "evit_received.onnx"
    res = export_onnx(red, path)
    assert res.problems == [] and res.verified and res.max_abs_diff is not None and res.max_abs_diff <= TOL
    model = onnx.load(str(path))
    assert not any(nd.op_type.startswith("tokenreduce") or nd.domain.startswith("tokenreduce")
                   for nd in model.graph.node)
    assert check_static(model) == []
    x = images(3, 64, seed=14)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {res.input_names[0]: x.numpy()})
    assert float(np.abs(out[0] - vit_forward(vit_nocls, x, {1, 2}, 0.5).numpy()).max()) <= TOL
