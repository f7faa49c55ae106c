"""STS Benchmark scoring of sentence encoders, to measure what token reduction costs.

The encoder is passed as a plain function ``model_fn(input_ids, attention_mask) ->
last_hidden_state`` so that the full model, a token-reduced one and a compiled one are scored
by the same code. Embeddings are sentence-transformers mean pooling; the score is Spearman's
rank correlation (x100) between embedding cosine similarity and the gold similarity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def hf_model_fn(model: torch.nn.Module) -> ModelFn:
    """Wrap a transformers encoder (e.g. from ``load_minilm``) as a ``model_fn``."""

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return run


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors ``[B, T, D]`` over non-padding positions -> ``[B, D]``."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


def encode(
    model_fn: ModelFn,
    tokenizer: Callable[..., dict[str, torch.Tensor]],
    sentences: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
    on_batch: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """Mean-pooled embeddings ``[len(sentences), D]`` (float32, not normalised), input order.

    Sentences are batched in order of length (less padding, faster) and put back afterwards.
    ``on_batch(n)`` is called after each batch of ``n`` sentences (progress bars).
    """
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    chunks: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [sentences[i] for i in order[start : start + batch_size]]
            enc = tokenizer(
                batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            hidden = model_fn(enc["input_ids"], enc["attention_mask"])
            chunks.append(mean_pool(hidden, enc["attention_mask"]).float())
            if on_batch is not None:
                on_batch(len(batch))
    if not chunks:
        return torch.empty(0, 0)
    embeddings = torch.cat(chunks)
    out = torch.empty_like(embeddings)
    out[torch.tensor(order)] = embeddings
    return out


def stsb_spearman(
    model_fn: ModelFn,
    tokenizer: Callable[..., dict[str, torch.Tensor]],
    pairs: Sequence[tuple[str, str, float]],
    batch_size: int = 32,
) -> float:
    """Spearman correlation x100 between cosine similarity of the pair embeddings and gold."""
    if len(pairs) < 2:
        raise ValueError("need at least two pairs for a rank correlation")
    n = len(pairs)
    emb = encode(model_fn, tokenizer, [p[0] for p in pairs] + [p[1] for p in pairs], batch_size)
    return pair_spearman(emb[:n], emb[n:], [p[2] for p in pairs])


def pair_spearman(first: torch.Tensor, second: torch.Tensor, gold: Sequence[float]) -> float:
    """Spearman x100 between the cosine similarity of row-paired embeddings ``[n, D]`` and ``gold``."""
    cosine = F.cosine_similarity(first.float(), second.float(), dim=-1)
    return float(spearmanr(cosine.numpy(), list(gold)).statistic) * 100.0


def group_by_length(token_ids: Sequence[Sequence[int] | torch.Tensor]) -> dict[int, list[int]]:
    """Sentence indices grouped by exact token count, lengths ascending, indices in input order: the unpadded
    protocol runs each group as one batch without padding."""
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(token_ids):
        groups.setdefault(len(ids), []).append(i)
    return dict(sorted(groups.items()))


def fixed_length(tokenizer: Callable[..., dict[str, torch.Tensor]], length: int) -> Callable[..., dict[str, torch.Tensor]]:
    """A tokenizer stand-in for :func:`encode` that pads (and truncates) every batch to ``length`` tokens.

    A compiled graph is specialised to its token count (only the batch is dynamic), so one padded
    length lets one reduced graph serve a whole split; ToMe's ``r`` is only comparable at a fixed length.
    """

    def tokenize(batch: Sequence[str], **_ignored: object) -> dict[str, torch.Tensor]:
        return tokenizer(list(batch), padding="max_length", truncation=True, max_length=length,
                         return_tensors="pt")

    return tokenize
