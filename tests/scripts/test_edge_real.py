"""benchmarks/edge_real.py's pieces on tiny random-init models, so the real-model edge table cannot rot.

* `choose_r` against a brute-force argmin over r (from several starting points, ties to the smaller r).
* `export_variants` on a tiny BERT at one unpadded length (dynamic int8) and a tiny DINOv2 behind
  `CLSFeature` (static int8 from a folder of images): four files, the int8 ones really quantized (dynamic:
  `DynamicQuantizeLinear`; static: `QuantizeLinear`), the fp32 files' embeddings/features through
  onnxruntime equal to the eager model's (mean pooling / CLS written here), the int8 ones close but not
  equal.
* `group_by_length`, `parse_lengths`, the per-length cache (round trip; refused for other token ids or
  timing settings) and the markdown table's deltas and ratios against values computed here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import bert_batch

import tokenreduce

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bert():  # type: ignore[no-untyped-def]
    """Two layers (the conftest BERT has four): every export here costs seconds of CPU per layer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    return BertModel(cfg, add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def dinov2():  # type: ignore[no-untyped-def]
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    return Dinov2Model(cfg).eval()


@pytest.fixture(scope="module")
def edge():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("edge_real", REPO / "benchmarks" / "edge_real.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["edge_real"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("target", [0.3, 0.5, 0.65, 0.9, 0.05])
@pytest.mark.parametrize("start", [1, 4, 30])
def test_choose_r_is_the_closest(edge, target, start):  # type: ignore[no-untyped-def]
    def ratio(r: int) -> float:
        return 1.0 / (1.0 + 0.37 * r)

    best = min(range(1, 200), key=lambda r: (abs(ratio(r) - target), r))
    r, tried = edge.choose_r(ratio, target, start)
    assert r == best
    assert tried[r] == ratio(r)


def test_choose_r_tie_goes_to_smaller_r(edge):  # type: ignore[no-untyped-def]
    table = {1: 0.9, 2: 0.75, 3: 0.55, 4: 0.4}
    assert edge.choose_r(table.__getitem__, 0.65, 4)[0] == 2  # 0.75 and 0.55 are both 0.10 away


def test_group_by_length(edge):  # type: ignore[no-untyped-def]
    groups = edge.group_by_length([[1, 2, 3], [4], [5, 6, 7], [8, 9], [1]])
    assert list(groups.items()) == [(1, [1, 4]), (2, [3]), (3, [0, 2])]


def test_parse_lengths(edge):  # type: ignore[no-untyped-def]
    assert edge.parse_lengths("all") is None
    assert edge.parse_lengths("none") == set()
    assert edge.parse_lengths("5-7,12") == {5, 6, 7, 12}
    with pytest.raises(edge.TokenReduceError, match="lengths"):
        edge.parse_lengths("5-x")


def test_cache_round_trip_and_mismatch(edge, tmp_path):  # type: ignore[no-untyped-def]
    ids = np.arange(12).reshape(2, 6)
    emb = {k: np.full((2, 3), float(i)) for i, k in enumerate(edge.VARIANTS)}
    settings = {"target_flops": 0.65, "threads": 1, "repeats": 3, "warmup": 1}
    record = {"r": 2, "median_ms": {k: 1.5 for k in edge.VARIANTS}}
    edge.save_cached(str(tmp_path), 6, ids, settings, record, emb)
    got_record, got_emb = edge.load_cached(str(tmp_path), 6, ids, settings)
    assert got_record == record and all(np.array_equal(got_emb[k], emb[k]) for k in edge.VARIANTS)
    assert edge.load_cached(str(tmp_path), 6, ids + 1, settings) is None  # other sentences
    assert edge.load_cached(str(tmp_path), 6, ids, {**settings, "repeats": 4}) is None  # other timing
    assert edge.load_cached(str(tmp_path), 7, ids, settings) is None
    assert edge.load_cached(None, 6, ids, settings) is None


def op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_text_variants_dynamic_int8(edge, bert, tmp_path):  # type: ignore[no-untyped-def]
    ids, _ = bert_batch(lengths=(16,))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        base = tokenreduce.compile(bert, (ids,), {"attention_mask": mask}, inner="eager", method="none",
                                   count_model_flops=False)
        red = tokenreduce.compile(bert, (ids,), {"attention_mask": mask}, inner="eager", method="tome", r=2,
                                  unmerge=True)
    v = edge.export_variants(base, red, 2, tmp_path / "bert")
    assert set(v.files) == set(edge.VARIANTS) and all(p.is_file() for p in v.files.values())
    assert v.int8_mode == "dynamic" and v.flops_after < v.flops_before
    assert "DynamicQuantizeLinear" in op_types(v.files["int8 ToMe"])
    assert "DynamicQuantizeLinear" not in op_types(v.files["fp32 ToMe"])
    assert max(v.fp32_diff.values()) < 1e-4 and 0 < v.int8_margin["int8 ToMe"] <= 1.0
    other = bert_batch(lengths=(16,), seed=5)[0]  # a second sentence of the same length
    token_ids = [ids[0].tolist(), other[0].tolist()]
    emb = edge.text_embeddings(edge.sessions_of(v.files, 1), token_ids, [1, 0])
    with torch.no_grad():
        stacked = torch.cat([other, ids])
        full = bert(stacked, attention_mask=torch.ones_like(stacked)).last_hidden_state.mean(1).double().numpy()
        reduced = red(stacked, attention_mask=torch.ones_like(stacked)).last_hidden_state.mean(1).double().numpy()
    np.testing.assert_allclose(emb["fp32 full"], full, atol=1e-4)
    np.testing.assert_allclose(emb["fp32 ToMe"], reduced, atol=1e-4)
    assert np.abs(reduced - full).max() > 1e-3  # the reduction changed something
    for key, ref in (("int8 full", full), ("int8 ToMe", reduced)):
        cos = edge.cosine_stats(emb[key], ref)
        assert 0.95 < cos["min"] and np.abs(emb[key] - ref).max() > 1e-5


def test_vision_variants_static_int8(edge, dinov2, tmp_path):  # type: ignore[no-untyped-def]
    from PIL import Image

    from tokenreduce.evaluate.knn import resize_normalize

    rng = np.random.default_rng(0)
    for i in range(6):  # a calibration folder of images in class folders, as CIFAR's
        (tmp_path / "calib" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "calib" / f"c{i % 2}" / f"{i}.png")
    model = edge.CLSFeature(dinov2).eval()
    images = torch.from_numpy(rng.integers(0, 255, (5, 3, 32, 32), dtype=np.uint8))
    x = resize_normalize(images[:1], 32)
    with torch.no_grad():
        base = tokenreduce.compile(model, (x,), inner="eager", method="none", count_model_flops=False)
        red = tokenreduce.compile(model, (x,), inner="eager", method="tome", r=3)
    v = edge.export_variants(base, red, 3, tmp_path / "vit", calibration=tmp_path / "calib", calibration_limit=6)
    assert v.int8_mode == "static" and v.flops_after < v.flops_before
    assert "QuantizeLinear" in op_types(v.files["int8 full"]) and "QuantizeLinear" in op_types(v.files["int8 ToMe"])
    feats = edge.image_features(edge.sessions_of(v.files, 1), images, batch=2, size=32)
    with torch.no_grad():
        xs = resize_normalize(images, 32)
        full = dinov2(pixel_values=xs).last_hidden_state[:, 0].numpy()
        reduced = red(xs).numpy()
    assert feats["fp32 full"].shape == (5, 32)
    np.testing.assert_allclose(feats["fp32 full"], full, atol=1e-4)
    np.testing.assert_allclose(feats["fp32 ToMe"], reduced, atol=1e-4)
    assert np.abs(feats["int8 ToMe"] - reduced).max() > 1e-5


def test_markdown_deltas_and_ratios(edge):  # type: ignore[no-untyped-def]
    cos = {"mean": 1.0, "min": 1.0}
    rows = [{"variant": "fp32 full", "quality": 80.0, "flops_ratio": 1.0, "latency_ms": 10.0,
             "mean_latency_ms": 8.0, "cosine_vs_fp32_full": cos},
            {"variant": "int8 ToMe", "quality": 78.5, "flops_ratio": 0.651, "latency_ms": 4.0,
             "mean_latency_ms": 2.0, "cosine_vs_fp32_full": {"mean": 0.98, "min": 0.7}}]
    table = edge.markdown([{"model": "m", "rows": rows}])
    last = [c.strip() for c in table.splitlines()[-1].strip("|").split("|")]
    assert last == ["m", "int8 ToMe", "0.651", "78.50", "-1.50", "4.00", "0.40x", "2.00", "0.25x", "0.9800 / 0.700"]
