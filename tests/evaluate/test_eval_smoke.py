"""End-to-end smoke test of `tokenreduce.evaluate` on all-MiniLM-L6-v2 and a few STS-B pairs.

Runs the whole sweep (full model, one ToMe setting, eager speed at batch 1, files written) on 16 test
pairs and checks the table is computed, not copied: the full-model row must equal the Spearman of the
plain model computed here independently (own tokenisation, pooling and scipy call), and the reduced row
must differ from it in FLOPs. Skips without the data folder or the model package. About 20 s on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datadir import require_data_dir

LIMIT = 16
SEQ_LEN = 32


@pytest.fixture(scope="module")
def data_dir() -> Path:
    return require_data_dir("the evaluation smoke test")


def _plain_spearman(data_dir: Path) -> float:
    """STS-B test Spearman x100 of the unmodified model on the first LIMIT pairs, without tokenreduce code."""
    from scipy.stats import spearmanr

    from tokenreduce.evaluate.data import load_stsb
    from tokenreduce.evaluate.models import ModelMissing, load_minilm

    try:
        model, tokenizer = load_minilm()
    except ModelMissing as e:
        pytest.skip(str(e))
    pairs = load_stsb("test", data_dir, limit=LIMIT)
    sentences = [a for a, _, _ in pairs] + [b for _, b, _ in pairs]
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = (hidden * mask).sum(1) / mask.sum(1)
    cos = torch.nn.functional.cosine_similarity(emb[:LIMIT], emb[LIMIT:], dim=-1)
    return float(spearmanr(cos.numpy(), [s for _, _, s in pairs]).statistic) * 100


def test_minilm_eval_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    from tokenreduce.evaluate.results import write_results
    from tokenreduce.evaluate.sweep import EvalConfig, run_eval, sweep_settings

    expected = _plain_spearman(data_dir)
    cfg = EvalConfig(family="minilm", settings=sweep_settings(["tome"], [3]), data_dir=data_dir, limit=LIMIT,
                     splits=("test",), seq_len=SEQ_LEN, batch_sizes=(1,), targets=("eager",), repeats=1, warmup=0,
                     cache_dir=tmp_path / "cache", progress=False)
    result = run_eval(cfg)

    full = [r for r in result.quality if r.setting == "full model"]
    tome = [r for r in result.quality if r.setting == "ToMe r=3"]
    assert len(full) == 1 and len(tome) == 1, result.quality
    assert full[0].metric == "STS-B test Spearman" and full[0].n == LIMIT
    assert full[0].value == pytest.approx(expected, abs=1e-3)
    assert (full[0].delta, full[0].flops_ratio, full[0].cosine_mean) == (0.0, 1.0, 1.0)
    assert tome[0].delta == pytest.approx(tome[0].value - full[0].value)
    assert 0.5 < tome[0].flops_ratio < 0.9 and tome[0].tokens == "32 -> 14"
    assert 0.8 < tome[0].cosine_mean <= 1.0 + 1e-6 and tome[0].n_cosine == 2 * LIMIT
    assert result.quality_skipped is None

    (row,) = result.speed
    assert (row.setting, row.batch, row.target, row.repeats) == ("ToMe r=3", 1, "eager", 1)
    assert row.flops_ratio == pytest.approx(tome[0].flops_ratio, abs=1e-6)  # same graph, same length
    assert row.latency_ratio == pytest.approx(row.latency_reduced_ms / row.latency_unreduced_ms)

    written = write_results(result, tmp_path / "out")
    names = {p.name for p in written}
    assert {"results.md", "results.json", "quality_vs_speedup.png", "quality_vs_flops.png",
            "speedup_vs_flops.png"} <= names
    md = (tmp_path / "out" / "results.md").read_text()
    assert f"**{full[0].value:.2f}**" in md and "| ToMe r=3 | 1 | eager |" in md
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["quality"][0]["value"] == pytest.approx(expected, abs=1e-3)
    assert len(data["speed_samples_ms"][0]["reduced"]) == 1
    assert all((tmp_path / "out" / n).stat().st_size > 1000 for n in names if n.endswith(".png"))
