"""DyMU / DToMe (`method="dymu"`) and `calibrate_dymu` against an independent reference written here.

The reference (`ref_merge`) is a Python loop over the rules the method file states: A = even, B = odd
positions, protected leading tokens never merge, each A token's most similar B token by cosine of the
head-averaged keys, and every A token whose best similarity is above the block's threshold is merged into its B
token (size-weighted average; sizes add). The reference keeps its own token order (CLS, unmerged A, B): the
compared outputs (CLS logits) do not depend on the order of the other tokens. It never imports
`tokenreduce.methods.dymu` or the plan kernels.

Checked: the compiled tiny timm ViT against a hand-written forward that merges with the reference, input by
input, with the per-input counts that `recording()` reports (and that those counts differ between inputs);
`calibrate_dymu` against edges computed by hand at the first block (exactly M * r above its threshold), the
mean merges it reports against a recount, its file read back by `thresholds=PATH` (report shows the calibrated
mean), and the same thresholds from padded-batch calibration.

Batches (padded masks): a batch of 3 different images against each image alone at batch 1 (tight tolerance)
and against the hand reference, with per-row counts equal to the reference's (thresholds applied by hand) and
the padded width equal to the largest row; CLS, mean-pooled (also against the reference) and attention-pooled
outputs, unmerged token outputs, `pad="static"`, and a padded BERT batch against each sentence compiled
unpadded at its own length. Refusals: padding with `prop_attn=False`, ONNX export (naming `method='tome'` with
the calibrated r), bad options. Inductor parity (dynamic shapes through graph breaks, batch 1 and a padded
batch) is a slow test: its first compile takes about a minute on two cores.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TOL, images, make_timm_vit
from torch import Tensor

import tokenreduce
from tokenreduce import TokenReduceError

SIZE = 64  # 8x8 patches + CLS = 65 tokens


# ------------------------------------------------------------------------------------------------ reference
def ref_merge(h: Tensor, size: Tensor, k: Tensor, threshold: float | None, p: int) -> tuple[Tensor, Tensor, int]:
    """One DToMe step on one input: `h [N, C]`, `size [N]`, `k [H, N, d]` -> merged h, sizes, merges."""
    n = h.shape[0]
    if threshold is None:
        return h, size, 0
    metric = k.mean(dim=0)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    cos = (unit @ unit.T).tolist()
    a_side = [i for i in range(0, n, 2) if i >= p]
    b_side = [i for i in range(1, n, 2) if i >= p]
    groups: dict[int, list[int]] = {b: [b] for b in b_side}
    kept_a = []
    for a in a_side:
        best = max(b_side, key=lambda b: cos[a][b])
        if cos[a][best] > threshold:
            groups[best].append(a)
        else:
            kept_a.append(a)
    rows, sizes = [], []
    for i in list(range(p)) + kept_a:
        rows.append(h[i])
        sizes.append(size[i])
    for members in groups.values():
        w = torch.stack([size[i] for i in members])
        rows.append((torch.stack([h[i] for i in members]) * w[:, None]).sum(0) / w.sum())
        sizes.append(w.sum())
    return torch.stack(rows), torch.stack(sizes), n - len(rows)


def ref_vit_forward(model: torch.nn.Module, x: Tensor, thresholds: list[float | None]) -> tuple[Tensor, list[int]]:
    """timm ViT (CLS or mean pooling, proportional attention) at batch 1 by hand; returns logits and tokens per
    block."""
    p = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    size = torch.ones(x.shape[1])
    counts = []
    for i, blk in enumerate(model.blocks):
        att = blk.attn
        _, n, c = x.shape
        qkv = att.qkv(blk.norm1(x)).reshape(1, n, 3, att.num_heads, c // att.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = att.q_norm(q), att.k_norm(k)
        logits = (q @ k.transpose(-2, -1)) * att.scale + size.log()[None, None, None, :]
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(1, n, c)
        h = x + blk.ls1(att.proj(att.norm(out)))
        t = thresholds[i] if i < len(thresholds) else None
        h0, size, _ = ref_merge(h[0], size, k[0], t, p)
        counts.append(h0.shape[0])
        h = h0[None]
        x = h + blk.ls2(blk.mlp(blk.norm2(h)))
    x = model.norm(x)
    pooled = x[:, p:].mean(dim=1) if model.global_pool == "avg" else x[:, 0]  # the merged tokens, unweighted
    return model.head(model.fc_norm(pooled)), counts


def first_block_edges(model: torch.nn.Module, x: Tensor) -> list[float]:
    """Every non-protected A token's best cosine at block 0 (its keys from the model's own layers)."""
    p = model.num_prefix_tokens
    z = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    blk = model.blocks[0]
    att = blk.attn
    _, n, c = z.shape
    k = att.k_norm(att.qkv(blk.norm1(z)).reshape(1, n, 3, att.num_heads, c // att.num_heads)[:, :, 1].transpose(1, 2))
    metric = k[0].mean(dim=0)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    cos = unit @ unit.T
    return [max(float(cos[a, b]) for b in range(1, n, 2) if b >= p) for a in range(0, n, 2) if a >= p]


@pytest.fixture(scope="module")
def vit():
    return make_timm_vit(img_size=SIZE)


def compile_dymu(model, x, **settings):
    return tokenreduce.compile(model, (x,), method="dymu", inner="eager", **settings)


# ------------------------------------------------------------------------------------------------ the method
def test_compiled_vit_matches_hand_reference_with_per_input_counts(vit):
    from tokenreduce.methods.dymu import recording

    thresholds = [0.3, 0.25, None, 0.2]
    xs = images(4, size=SIZE, seed=3)
    red = compile_dymu(vit, xs[:1], thresholds=thresholds)
    seen = []
    with torch.no_grad():
        for i in range(xs.shape[0]):
            want, counts = ref_vit_forward(vit, xs[i:i + 1], thresholds)
            with recording() as rec:
                got = red(xs[i:i + 1])
            torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
            assert rec.counts == [{0: counts[0], 1: counts[1], 3: counts[3]}]
            assert counts[2] == counts[1]  # no threshold at block 2: nothing merges there
            seen.append(tuple(counts))
    assert len(set(seen)) > 1, f"the counts should follow the input, got {seen}"
    assert all(c[0] < 65 for c in seen)


def test_threshold_above_every_cosine_merges_nothing(vit):
    x = images(1, size=SIZE, seed=5)
    red = compile_dymu(vit, x, thresholds=[1.5, 1.5])
    with torch.no_grad():
        torch.testing.assert_close(red(x), vit(x), atol=TOL, rtol=TOL)


THRESHOLDS = [0.3, 0.25, None, 0.2]


def dymu_blocks(counts: list[int], thresholds: list[float | None]) -> dict[int, int]:
    """The reference's tokens after each block, for the blocks that have a threshold (what recording() lists)."""
    return {i: c for i, c in enumerate(counts) if i < len(thresholds) and thresholds[i] is not None}


def batch_and_rows_alone(model, xs):  # type: ignore[no-untyped-def]
    """DyMU compiled on `model` (THRESHOLDS) run on the batch `xs`, recording its counts, and on each row alone:
    (batch output, rows alone concatenated, the recording)."""
    from tokenreduce.methods.dymu import recording

    red = compile_dymu(model, xs[:1], thresholds=THRESHOLDS)
    with torch.no_grad():
        with recording() as rec:
            got = red(xs)
        alone = torch.cat([red(xs[i:i + 1]) for i in range(len(xs))])
    return got, alone, rec


def test_batch_rows_equal_each_row_alone_and_the_reference_counts(vit):
    xs = images(3, size=SIZE, seed=3)
    got, alone, rec = batch_and_rows_alone(vit, xs)
    with torch.no_grad():
        refs = [ref_vit_forward(vit, xs[i:i + 1], THRESHOLDS) for i in range(3)]
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, torch.cat([w for w, _ in refs]), atol=TOL, rtol=TOL)
    want = [dymu_blocks(c, THRESHOLDS) for _, c in refs]
    assert rec.counts == want
    assert rec.widths == [{b: max(w[b] for w in want) for b in want[0]}]  # padded to the batch's largest row
    assert len({tuple(w.values()) for w in want}) == 3, f"the rows should keep different counts, got {want}"


@pytest.mark.parametrize("pool", ["avg", "map"])
def test_pooled_outputs_of_a_batch_pool_each_row_over_its_own_tokens(pool):
    model = make_timm_vit(img_size=SIZE, global_pool=pool)  # mean of the patch tokens / attention pooling head
    xs = images(3, size=SIZE, seed=3)
    got, alone, rec = batch_and_rows_alone(model, xs)
    assert len(set(rec.counts[i][3] for i in range(3))) > 1, rec.counts  # the rows were padded
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    if pool == "avg":
        with torch.no_grad():
            want = torch.cat([ref_vit_forward(model, xs[i:i + 1], THRESHOLDS)[0] for i in range(3)])
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_only_padding_methods_pool_over_their_own_slots():
    from tokenreduce.passes.insert_reductions import pool_own_slots

    model = make_timm_vit(img_size=SIZE, global_pool="avg")
    x = images(1, size=SIZE)

    def pools(red) -> list:
        return [n.args[1:4] for n in red.graph_module.graph.nodes if n.target is pool_own_slots]

    assert pools(compile_dymu(model, x, thresholds=THRESHOLDS)) == [("mean", [1], False)]
    assert pools(tokenreduce.compile(model, (x,), method="tome", r=4, inner="eager")) == []


def test_static_padding_keeps_the_input_count_and_the_row_results(vit):
    from tokenreduce.methods.dymu import recording

    xs = images(3, size=SIZE, seed=3)
    red = compile_dymu(vit, xs[:1], thresholds=THRESHOLDS, pad="static")
    assert [(b.tokens_in, b.tokens_out) for b in red.report.blocks] == [(65, 65)] * 4
    with torch.no_grad():
        with recording() as rec:
            got = red(xs)
        refs = [ref_vit_forward(vit, xs[i:i + 1], THRESHOLDS) for i in range(3)]
    torch.testing.assert_close(got, torch.cat([w for w, _ in refs]), atol=TOL, rtol=TOL)
    assert rec.counts == [dymu_blocks(c, THRESHOLDS) for _, c in refs]
    assert rec.widths == [{0: 65, 1: 65, 3: 65}]


def test_unmerged_tokens_of_a_batch_equal_each_row_alone():
    tokens = make_timm_vit(img_size=SIZE, global_pool="")  # the head runs on every token: [B, N, classes]
    xs = images(3, size=SIZE, seed=4)
    red = compile_dymu(tokens, xs[:1], thresholds=THRESHOLDS, unmerge=True)
    with torch.no_grad():
        got = red(xs)
        alone = torch.cat([red(xs[i:i + 1]) for i in range(3)])
    assert got.shape == (3, 65, 5)  # every original position, no padded slot
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


def test_batches_without_proportional_attention_are_refused(vit):
    x = images(2, size=SIZE)
    red = compile_dymu(vit, x[:1], thresholds=[0.3], prop_attn=False)
    with torch.no_grad():
        red(x[:1])  # batch 1: no padded slot to mask
        with pytest.raises(TokenReduceError, match="keep prop_attn=True, or call the module once per input") as info:
            red(x)
    assert info.value.setting == "prop_attn"


def test_padded_text_batch_rows_equal_each_sentence_unpadded(bert):
    from conftest import bert_batch

    from tokenreduce.methods.dymu import recording

    ids, mask = bert_batch(lengths=(16, 9, 12))
    thresholds = [0.5, 0.5, 0.5]
    red = tokenreduce.compile(bert, (), {"input_ids": ids, "attention_mask": mask}, method="dymu", inner="eager",
                              thresholds=thresholds)
    with torch.no_grad(), recording() as rec:
        got = red(input_ids=ids, attention_mask=mask).last_hidden_state
    for i, n in enumerate(mask.sum(1).tolist()[1:], start=1):  # the padded rows, each compiled at its length
        one = {"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n]}
        alone = tokenreduce.compile(bert, (), one, method="dymu", inner="eager", thresholds=thresholds)
        with torch.no_grad(), recording() as rec1:
            want = alone(**one).last_hidden_state
        assert rec.counts[i] == rec1.counts[0]
        # the row's own tokens come first, in the order the unpadded sentence has them (then its padding)
        torch.testing.assert_close(got[i, :want.shape[1]], want[0], atol=1e-5, rtol=1e-5)
    assert any(c[0] < n for c, n in zip(rec.counts, mask.sum(1).tolist())), rec.counts


# ------------------------------------------------------------------------------------------------ calibration
@pytest.fixture(scope="module")
def calibrated(vit, tmp_path_factory):
    from tokenreduce.tuning.dymu_calibration import calibrate_dymu

    path = tmp_path_factory.mktemp("dymu") / "thresholds.json"
    xs = images(6, size=SIZE, seed=7)
    return calibrate_dymu(vit, xs, r=5, output=path), path, xs


def test_calibration_puts_m_times_r_first_block_edges_above_the_threshold(vit, calibrated):
    res, _, xs = calibrated
    with torch.no_grad():
        edges = [e for i in range(xs.shape[0]) for e in first_block_edges(vit, xs[i:i + 1])]
    above = sum(e > res.thresholds[0] for e in edges)
    assert above == 5 * xs.shape[0]
    assert res.mean_r[0] == pytest.approx(5.0)


def test_calibrated_thresholds_reach_the_mean_and_match_the_reference(vit, calibrated):
    res, path, xs = calibrated
    finals = []
    with torch.no_grad():
        for i in range(xs.shape[0]):
            _, counts = ref_vit_forward(vit, xs[i:i + 1], res.thresholds)
            finals.append(counts[-1])
    assert finals == res.tokens_per_input
    assert res.mean_tokens == pytest.approx(sum(finals) / len(finals))
    for block, m in enumerate(res.mean_r):  # exactly M * r merges per block on the calibration inputs (no ties)
        assert m == pytest.approx(5.0), (block, res.mean_r)
    data = json.loads(path.read_text())
    assert data["format"] == "tokenreduce-dymu-thresholds" and data["thresholds"] == res.thresholds
    red = compile_dymu(vit, xs[:1], thresholds=str(path))
    assert [(b.tokens_in, b.tokens_out) for b in red.report.blocks] == [(65, 60), (60, 55), (55, 50), (50, 45)]
    assert "data-dependent" in red.report.blocks[0].reason
    assert red.report.flops_ratio is not None and red.report.flops_ratio < 1.0


def test_calibration_in_padded_batches_gives_the_batch_1_thresholds(vit, calibrated):
    from tokenreduce.tuning.dymu_calibration import calibrate_dymu

    res, _, xs = calibrated
    batched = calibrate_dymu(vit, xs, r=5, batch_size=4)  # calls of 4 and 2 rows
    assert batched.thresholds == pytest.approx(res.thresholds, abs=1e-5)
    assert batched.tokens_per_input == res.tokens_per_input and batched.mean_r == res.mean_r
    with pytest.raises(TokenReduceError, match="batch_size must be an int >= 1"):
        calibrate_dymu(vit, xs, r=5, batch_size=0)


def test_calibration_needs_one_target(vit):
    from tokenreduce.tuning.dymu_calibration import calibrate_dymu

    with pytest.raises(TokenReduceError, match="exactly one of r"):
        calibrate_dymu(vit, images(2, size=SIZE), r=3, target_tokens=40)


# ------------------------------------------------------------------------------------------------ refusals
def test_onnx_export_is_refused_naming_tome(vit, calibrated, tmp_path):
    from tokenreduce.targets.onnx import export_onnx

    _, path, xs = calibrated
    red = compile_dymu(vit, xs[:1], thresholds=str(path))
    with pytest.raises(TokenReduceError, match=r"method='tome' with r=5"):
        export_onnx(red, tmp_path / "m.onnx")


@pytest.mark.parametrize("opts, setting, match", [
    (dict(), "thresholds", "dymu needs thresholds"),
    (dict(thresholds=[0.3, float("nan")]), "thresholds", r"thresholds\[1\] must be a number"),
    (dict(thresholds=["a"]), "thresholds", r"thresholds\[0\] must be a number"),
    (dict(thresholds="/nonexistent/t.json"), "thresholds", "not found; write one with"),
    (dict(thresholds=[0.3], mean_r=[-1]), "mean_r", "mean_r must be numbers >= 0"),
])
def test_options_are_checked(opts, setting, match):
    with pytest.raises(TokenReduceError, match=match) as info:
        tokenreduce.Settings.from_options({"method": "dymu", **opts})
    assert info.value.setting == setting


def test_too_many_thresholds_name_the_block_count(vit):
    with pytest.raises(TokenReduceError, match="model has 4"):
        compile_dymu(vit, images(1, size=SIZE), thresholds=[0.3] * 5)


def test_malformed_file_is_refused(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"thresholds": [0.1]}))
    with pytest.raises(TokenReduceError, match="not a dymu thresholds file"):
        tokenreduce.Settings.from_options({"method": "dymu", "thresholds": str(bad)})


@pytest.mark.slow
def test_inductor_follows_the_counts_through_graph_breaks_at_batch_1_and_in_padded_batches(vit):
    from tokenreduce.methods.dymu import recording

    xs = images(3, size=SIZE, seed=3)
    red = tokenreduce.compile(vit, (xs[:1],), method="dymu", inner="inductor", thresholds=THRESHOLDS)
    with torch.no_grad():
        refs = [ref_vit_forward(vit, xs[i:i + 1], THRESHOLDS) for i in range(3)]
        for i in range(xs.shape[0]):
            with recording() as rec:
                got = red(xs[i:i + 1])
            torch.testing.assert_close(got, refs[i][0], atol=TOL, rtol=TOL)
            assert rec.counts == [dymu_blocks(refs[i][1], THRESHOLDS)]
        with recording() as rec:
            got = red(xs)
    torch.testing.assert_close(got, torch.cat([w for w, _ in refs]), atol=TOL, rtol=TOL)
    assert rec.counts == [dymu_blocks(c, THRESHOLDS) for _, c in refs]
    assert math.isfinite(float(got.sum()))


def test_folder_of_arrays_and_target_tokens_give_the_same_thresholds_as_a_tensor_and_r(vit, tmp_path):
    import numpy as np

    from tokenreduce.tuning.dymu_calibration import calibrate_dymu

    xs = images(3, size=SIZE, seed=11)
    for i in range(xs.shape[0]):
        np.save(tmp_path / f"{i}.npy", xs[i].numpy())
    by_folder = calibrate_dymu(vit, tmp_path, target_tokens=45, input_shape=(3, SIZE, SIZE))
    assert by_folder.target_r == [5, 5, 5, 5]  # (65 - 45) / 4 blocks
    by_tensor = calibrate_dymu(vit, xs, r=5)
    assert by_folder.thresholds == pytest.approx(by_tensor.thresholds)
    assert by_folder.tokens_per_input == by_tensor.tokens_per_input
