"""Pure parts of the evaluation: the weighted k-NN, the sweep's settings and its summary (no models, no data)."""

from __future__ import annotations

import pytest
import torch

from tokenreduce.errors import TokenReduceError
from tokenreduce.evaluate.knn import resize_normalize, weighted_knn
from tokenreduce.evaluate.sweep import QualityRow, summarize, sweep_settings


def test_weighted_knn_votes_by_similarity() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = torch.tensor([[2.0, 0.1], [0.0, 3.0], [1.0, 1.05]])
    assert weighted_knn(bank, labels, queries, 2, k=1).tolist() == [0, 1, 1]
    # k=5 with a very low temperature: the nearest neighbour's weight dominates the majority
    assert weighted_knn(bank, labels, queries[:1], 2, k=5, temperature=0.01).tolist() == [0]
    # with a high temperature the votes are almost counts: 3 of class 1 beat 2 of class 0
    assert weighted_knn(bank, labels, queries[:1], 2, k=5, temperature=100.0).tolist() == [1]
    # scale of the features does not matter (cosine)
    assert weighted_knn(bank * 7, labels, queries * 0.1, 2, k=3).tolist() == weighted_knn(bank, labels, queries, 2,
                                                                                          k=3).tolist()
    with pytest.raises(ValueError, match="labels"):
        weighted_knn(bank, labels[:3], queries, 2)


def test_resize_normalize_shape_and_range() -> None:
    x = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    y = resize_normalize(x, 56)
    assert y.shape == (2, 3, 56, 56)
    torch.testing.assert_close(y[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                                            (1 - 0.406) / 0.225]))


def test_sweep_settings_names_and_errors() -> None:
    s = sweep_settings(["tome", "evit"], [2, 4], [0.5], clamp_r=True)
    assert [x.name for x in s] == ["ToMe r=2", "ToMe r=4", "EViT keep 0.5"]
    assert s[0].options == {"method": "tome", "r": 2, "r_schedule": "constant", "clamp_r": True}
    assert s[2].options == {"method": "evit", "keep_ratio": 0.5}
    assert sweep_settings(["evit"], keep_ratios=[0.7], layers=[1, 2])[0].name == "EViT keep 0.7 @ 1,2"
    with pytest.raises(TokenReduceError, match="--r"):
        sweep_settings(["tome"])
    with pytest.raises(TokenReduceError, match="--keep-ratio"):
        sweep_settings(["evit"], [2])
    with pytest.raises(TokenReduceError, match="twice"):
        sweep_settings(["tome"], [2, 2])


def _row(setting: str, delta: float, flops: float) -> QualityRow:
    return QualityRow(setting, "m", 80 + delta, delta, 10, flops, "-", None, 1.0, 1.0, "x", 10)


def test_summary_picks_fewest_flops_within_tolerance() -> None:
    rows = [_row("full model", 0.0, 1.0), _row("r=2", -0.3, 0.8), _row("r=3", -0.9, 0.7), _row("r=4", -2.8, 0.6)]
    (s,) = summarize(rows, [], 1.0)
    assert (s["setting"], s["flops_ratio"]) == ("r=3", 0.7)
    (s,) = summarize(rows, [], 0.1)
    assert s["setting"] is None
