"""`tokenreduce.tune` on a text encoder and the unpadded STS-B scorer of `tuning/compare.py`, on a tiny random BERT.

The references are computed here independently: each constant-r ToMe setting compiled through the public
`tokenreduce.compile` (with `unmerge=True`) and scored with a mean-pooled cosine written out in the test; the
unpadded scorer's embeddings against one `tokenreduce.compile` per token count, and its Spearman against scipy.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

import tokenreduce
from tokenreduce.errors import TokenReduceError
from tokenreduce.methods.plan import Plan
from tokenreduce.tuning import tune
from tokenreduce.tuning.compare import UnpaddedStsb, mean_pooled_cosine, median_length


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    return BertModel(cfg, add_pooling_layer=False).eval()


def _ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(5, 64, (n, length), generator=torch.Generator().manual_seed(seed))


def _embed(out) -> torch.Tensor:
    return out.last_hidden_state.mean(dim=1)


def test_tunes_a_text_model_on_sentence_embedding_cosine(bert):
    ids = _ids(6, 10, 1)
    calib = [{"input_ids": ids[:3], "attention_mask": torch.ones_like(ids[:3])},
             {"input_ids": ids[3:], "attention_mask": torch.ones_like(ids[3:])}]
    plan = tune(bert, calib, {"flops": 0.75}, methods=["tome"], families=["constant"], settings={"unmerge": True},
                metric=mean_pooled_cosine)
    with torch.inference_mode():
        full = _embed(bert(input_ids=ids, attention_mask=torch.ones_like(ids)))
    refs = {}
    for r in range(1, 6):
        try:
            red = tokenreduce.compile(bert, (), {"input_ids": ids[:3], "attention_mask": torch.ones_like(ids[:3])},
                                      method="tome", r=r, unmerge=True, inner="eager")
        except TokenReduceError:
            break  # r too large for a block of 10 tokens: so is every larger r
        with torch.inference_mode():
            out = _embed(red(input_ids=ids, attention_mask=torch.ones_like(ids)))
        assert out.shape == full.shape  # unmerge: one vector per input token, so the mean is the size-weighted one
        refs[r] = (float(F.cosine_similarity(full, out, dim=-1).mean()), red.report.flops_ratio)
    fits = {r: v for r, v in refs.items() if v[1] <= 0.75}
    assert fits, refs
    best = max(fits, key=lambda r: fits[r][0])
    assert plan.settings == {"method": "tome", "r": best, "unmerge": True}
    assert plan.measured["fidelity"] == pytest.approx(fits[best][0], abs=1e-5)
    assert plan.measured["flops_ratio"] <= 0.75


def test_unpadded_scorer_runs_every_sentence_at_its_own_length(bert):
    lengths = [6, 9, 12, 9, 6, 12, 9, 12]
    ids = [_ids(1, n, 10 + i)[0] for i, n in enumerate(lengths)]
    gold = [0.5, 3.0, 4.5, 1.0]
    scorer = UnpaddedStsb(bert, ids, gold)
    assert sorted(scorer.groups) == [6, 9, 12]
    settings = {"method": "tome", "r": 2}
    emb, fallback = scorer.embed(settings)
    assert fallback == 0
    with torch.inference_mode():
        full = torch.stack([bert(input_ids=t[None], attention_mask=torch.ones_like(t[None]))
                            .last_hidden_state.mean(dim=1)[0] for t in ids])
    assert torch.allclose(scorer.full, full, atol=1e-5)
    for length in (6, 9, 12):  # one graph per token count, as the scorer must; batch 1 for each sentence
        rows = [i for i, t in enumerate(ids) if len(t) == length]
        x = ids[rows[0]][None]
        red = tokenreduce.compile(bert, (), {"input_ids": x, "attention_mask": torch.ones_like(x)}, **settings,
                                  clamp_r=True, unmerge=True, inner="eager")
        for i in rows:
            with torch.inference_mode():
                ref = red(input_ids=ids[i][None], attention_mask=torch.ones_like(ids[i][None]))
            ref = ref.last_hidden_state.mean(dim=1)[0]
            assert torch.allclose(emb[i], ref, atol=1e-5)
            assert not torch.allclose(ref, full[i], atol=1e-3)  # reduced at every length (clamped where needed)
    got = scorer.score(Plan(settings=settings, label="ToMe r=2"))
    cos = F.cosine_similarity(emb[:4], emb[4:], dim=-1)
    assert got["stsb_spearman"] == pytest.approx(float(spearmanr(cos.numpy(), gold).statistic) * 100, abs=1e-6)
    assert got["full_model_sentences"] == 0
    assert 0.0 < got["embedding_cosine_test"] < 1.0


def test_a_length_the_method_refuses_runs_the_full_model_and_is_counted(bert):
    ids = [_ids(1, n, 30 + i)[0] for i, n in enumerate([6, 8, 6, 8])]
    scorer = UnpaddedStsb(bert, ids, [1.0, 2.0])
    # EViT at a block this 3-block model does not have: refused at every length
    emb, fallback = scorer.embed({"method": "evit", "keep_ratio": 0.5, "layers": [7]})
    assert fallback == 4
    assert torch.equal(emb, scorer.full)


def test_median_length():
    assert median_length([5, 9, 7]) == 7
    assert median_length([4, 8, 6, 10]) == 6  # the lower middle value of an even count
