"""benchmarks/vision_selection.py on a tiny random-init DINOv2: its attention recorder gives the model's own
attention probabilities, and each selection wrapper keeps exactly `keep` distinct patches per image and equals
a direct call of the method's kernel on independently obtained inputs (eager attention, hidden states)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels import decoder_ops

REPO = Path(__file__).resolve().parents[2]
KEEPS = (16, 7, 3)  # of 8 x 8 = 64 patches


@pytest.fixture(scope="module")
def vs():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("vision_selection", REPO / "benchmarks" / "vision_selection.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vision_selection"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, image_size=32,
                       patch_size=4)
    model = Dinov2Model(cfg).eval()
    model.set_attn_implementation("eager")  # the reference attention probabilities come from output_attentions
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    return model, pixels, ref


def independent_qkv(model, ref, layer):  # type: ignore[no-untyped-def]
    """q, k, v of block `layer` from the block's input hidden state (the encoder's, not the hook's), and the
    logit scale."""
    block = model.encoder.layer[layer]
    heads, d = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    with torch.inference_mode():
        x = block.norm1(ref.hidden_states[layer])
        q, k, v = (getattr(block.attention, name)(x).view(x.shape[0], -1, heads, d).transpose(1, 2)
                   for name in ("q_proj", "k_proj", "v_proj"))
    return q, k, v, d ** -0.5


def assert_kept(idx: torch.Tensor, bsz: int, keep: int, p: int) -> None:
    assert idx.shape == (bsz, keep)
    for row in idx.tolist():
        assert len(set(row)) == keep and all(0 <= i < p for i in row)


def test_recorder_matches_eager_attention_and_leaves_output(vs, tiny) -> None:  # type: ignore[no-untyped-def]
    model, pixels, ref = tiny
    recorder = vs.AttentionRecorder(model)
    with torch.inference_mode(), recorder.recording():
        out = model(pixel_values=pixels).last_hidden_state
        maps = [recorder.attention(i) for i in range(3)]
    torch.testing.assert_close(out, ref.last_hidden_state)
    for i in range(3):
        torch.testing.assert_close(maps[i], ref.attentions[i].mean(1), atol=1e-6, rtol=1e-5)
    with pytest.raises(TokenReduceError, match="recording"):
        vs.AttentionRecorder(model).qk(0)


def test_visionzip_and_divprune_equal_their_kernels(vs, tiny) -> None:  # type: ignore[no-untyped-def]
    model, pixels, ref = tiny
    got = vs.select_batch(model, pixels, ["visionzip", "divprune"], KEEPS, [0, 1, 2])
    hidden = ref.last_hidden_state
    patches = hidden[:, 1:]
    torch.testing.assert_close(got["full"]["all"], patches.mean(1))
    torch.testing.assert_close(got["full"]["cls"], hidden[:, 0])
    q, k, _, scale = independent_qkv(model, ref, 2)
    for keep in KEEPS:
        dominant, contextual = vs.visionzip_split(keep)
        assert dominant + contextual == keep and contextual == min(keep, round(keep * 10 / 64))
        merged, kept = decoder_ops.visionzip_plan_reference(hidden, q, k, None, scale, dominant, contextual)
        idx, feat = got["visionzip"][keep]
        assert_kept(idx, 3, keep, 64)
        want = [torch.nonzero(kept[b]).flatten().tolist() for b in range(3)]
        assert idx.tolist() == want
        torch.testing.assert_close(feat, torch.stack([merged[b, 1:][want[b]].mean(0) for b in range(3)]),
                                   atol=1e-5, rtol=1e-5)

        droppable = torch.ones(3, 64, dtype=torch.bool)
        scores = decoder_ops.kcenter_scores_reference(patches, droppable, keep, 64)
        idx, feat = got["divprune"][keep]
        assert_kept(idx, 3, keep, 64)
        want = [torch.nonzero(scores[b] > 0).flatten().tolist() for b in range(3)]
        assert idx.tolist() == want
        torch.testing.assert_close(feat, torch.stack([patches[b][want[b]].mean(0) for b in range(3)]))


def test_random_and_grid_baselines(vs, tiny) -> None:  # type: ignore[no-untyped-def]
    model, pixels, ref = tiny
    got = vs.select_batch(model, pixels, ["random", "grid"], KEEPS, [5, 6, 7])
    again = vs.select_batch(model, pixels[:1], ["random"], KEEPS, [5])
    for keep in KEEPS:
        idx, feat = got["random"][keep]
        assert_kept(idx, 3, keep, 64)
        assert idx[0].tolist() != idx[1].tolist()  # one generator per image
        assert again["random"][keep][0][0].tolist() == idx[0].tolist()  # seeded: the same rows on a rerun
        idx, feat = got["grid"][keep]
        assert_kept(idx, 3, keep, 64)
        torch.testing.assert_close(feat, ref.last_hidden_state[:, 1:][:, idx[0]].mean(1))
    # 64 of 16 x 16: the stride-2 lattice at cell centres (rows and columns 1, 3, ..., 15)
    assert vs.grid_indices((16, 16), 64).tolist() == [r * 16 + c for r in range(1, 16, 2) for c in range(1, 16, 2)]
    for keep in (1, 13, 28, 255, 256):
        g = vs.grid_indices((16, 16), keep)
        assert len(set(g.tolist())) == keep and int(g.max()) < 256
    with pytest.raises(TokenReduceError, match="1..256"):
        vs.grid_indices((16, 16), 257)
    with pytest.raises(TokenReduceError, match="1..64"):
        vs.select_batch(model, pixels, ["grid"], [65], [0, 1, 2])
    with pytest.raises(TokenReduceError, match="unknown"):
        vs.select_batch(model, pixels, ["tome"], [4], [0, 1, 2])


def test_cache_rows_round_trip_and_report(vs, tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, pixels, ref = tiny
    got = vs.select_batch(model, pixels, ["divprune"], (7,), [0, 1, 2])
    for method, lines in vs.batch_rows(got, [0, 1, 2], [0, 1, 1]).items():
        for split in ("train", "test"):
            vs.cache_file(tmp_path, split, method).write_text("".join(line + "\n" for line in lines) + '{"torn')
    feats, labels = vs.features(tmp_path, "test", "divprune", "7", [0, 1, 2])
    torch.testing.assert_close(feats, got["divprune"][7][1], atol=1e-5, rtol=0)
    assert labels.tolist() == [0, 1, 1]
    rows = vs.report(tmp_path, ["divprune"], (7,), 3, [0, 1, 2])
    div = rows[-1]
    cos = torch.nn.functional.cosine_similarity(got["divprune"][7][1], got["full"]["all"], dim=-1)
    assert div["method"] == "divprune" and div["keep"] == 7
    assert div["cos_mean"] == pytest.approx(float(cos.mean()), abs=1e-4)
    assert rows[0]["full_bank"] == 100.0  # every query is its own bank feature here (same images)
    with pytest.raises(TokenReduceError, match="not cached"):
        vs.features(tmp_path, "test", "divprune", "7", [0, 3])
    squares = [len({(i // 8 // 4, i % 8 // 4) for i in row}) for row in got["divprune"][7][0].tolist()]
    assert vs.blocks_covered(tmp_path, "divprune", 7, [0, 1, 2], side=8, block=4) == pytest.approx(sum(squares) / 3)
    # queries: the same count per class (class 0 has one cached image, class 1 two -> one each)
    assert vs.balanced_queries(tmp_path, ["divprune"], torch.tensor([0, 1, 1])) == [0, 1]
    vs.cache_file(tmp_path, "train", "divprune").unlink()  # the matched bank is said to be missing, not skipped
    rows = vs.report(tmp_path, ["divprune"], (7,), 3, [0, 1, 2])
    assert rows[-1]["matched_bank"] is None and rows[-1]["cos_mean"] == pytest.approx(float(cos.mean()), abs=1e-4)
    line = next(x for x in vs.markdown(rows, 3, 3).splitlines() if x.startswith("| divprune | 7 |"))
    assert line.split(" | ")[3] == "not run"
    vs.check_meta(tmp_path, {"keeps": [7]})
    with pytest.raises(TokenReduceError, match="another setting"):
        vs.check_meta(tmp_path, {"keeps": [8]})


def test_hiprune_and_flowcut_equal_their_kernels(vs, tiny) -> None:  # type: ignore[no-untyped-def]
    from tokenreduce.kernels import vision_ops

    model, pixels, ref = tiny
    got = vs.select_batch(model, pixels, ["hiprune", "flowcut"], KEEPS, [0, 1, 2])
    maps = [a.mean(1) for a in ref.attentions]  # eager attention probabilities, head mean
    values = [independent_qkv(model, ref, i)[2] for i in range(3)]
    assert vs.hiprune_object_layer(11) == 4 and vs.hiprune_object_layer(2) == 1  # 8/22 of the feature layer
    assert vs.flowcut_layers(11) == tuple(range(11)) and vs.flowcut_layers(2) == (0, 1)  # the layers before it
    patches = ref.last_hidden_state[:, 1:]
    for keep in KEEPS:
        want = vision_ops.hiprune_select(maps[1], maps[2], (8, 8), keep)
        idx, feat = got["hiprune"][keep]
        assert_kept(idx, 3, keep, 64)
        assert idx.tolist() == want.tolist()
        torch.testing.assert_close(feat, torch.stack([patches[b][want[b]].mean(0) for b in range(3)]))
        want = vision_ops.flowcut_select(maps[:2], keep, values[:2])
        idx, feat = got["flowcut"][keep]
        assert_kept(idx, 3, keep, 64)
        assert idx.tolist() == want.tolist()


def test_flowcut_progressive_runs_the_last_block_on_the_survivors(vs, tiny) -> None:  # type: ignore[no-untyped-def]
    """A 3-block tower read at block 2: the default prune layer is 1 (F - 1), to `keep` directly, so the kept patches
    are FlowCut's selection over layers 0-1; block 2 and the final norm then run on CLS + those patches only
    (reference: the block called by hand on the gathered hidden state of the unpruned run)."""
    from tokenreduce.kernels import vision_ops

    model, pixels, ref = tiny
    got = vs.select_batch(model, pixels, ["flowcut-progressive"], KEEPS, [0, 1, 2])
    maps = [a.mean(1) for a in ref.attentions]
    values = [independent_qkv(model, ref, i)[2] for i in range(2)]
    for keep in KEEPS:
        want = vision_ops.flowcut_select(maps[:2], keep, values)  # ascending
        idx, feat = got["flowcut-progressive"][keep]
        assert idx.tolist() == want.tolist()
        h = ref.hidden_states[2]  # block 1's output, block 2's input
        cut = torch.cat([h[:, :1], torch.stack([h[b, 1:][want[b]] for b in range(3)])], 1)
        with torch.inference_mode():
            out = model.layernorm(model.encoder.layer[2](cut))
        torch.testing.assert_close(feat, out[:, 1:].float().mean(1), atol=1e-5, rtol=1e-5)
        unpruned = ref.last_hidden_state[:, 1:]
        assert not torch.allclose(feat, torch.stack([unpruned[b][want[b]].mean(0) for b in range(3)]), atol=1e-4)
