"""Prefill token pruning for decoder LLMs and VLMs: FastV, PyramidDrop and GemFilter as score -> plan.

All three rank the *span* tokens (image tokens of a VLM, or the context tokens a user marks) by the
attention the last query token pays them at one layer (probabilities, averaged over heads), keep the
best in their original order, and never touch tokens outside the span (system prompt, the question at
the end, padding). They differ in where the ranking happens and which layers run on the kept tokens:

* FastV -- Chen, Zhao, Chen, Liu, Bai, Lin, Zhou, Chang, "An Image is Worth 1/2 Tokens After Layer 2:
  Plug-and-Play Inference Acceleration for Large Vision-Language Models", ECCV 2024. After layer K
  (default K=2), drop R% (default 50%) of the span for every later layer, ranked by layer K's attention.
* PyramidDrop -- Xing, Chen, Zhang, Yin, Ma, Zhang, Wang, Jiang, Ma, "PyramidDrop: Accelerating Your
  Large Vision-Language Models via Pyramid Visual Redundancy Reduction", 2024. Several stages (layers
  8/16/24 of 32, scaled to the depth); each keeps a fraction lambda (default 0.5) of the remaining span.
* GemFilter -- Shi, Ye, Jin, Wang, Zhang, "Discovering the Gems in Early Layers: Accelerating
  Long-Context LLMs with 1000x Input Token Reduction", 2024. Run the first L layers, take the top-k
  tokens by layer L's last-query attention, then run the *whole* model on the kept tokens only.

Written from the papers; the shared plan below is ours. Positions are never renumbered: a kept token
keeps its original position id (rotary), which is what all three official implementations do.

This module knows nothing of graphs or models (shapes in docstrings); `passes/prune_decoder_tokens.py`
wires it into the captured graph.

Refuses: a keep count outside `0 .. span`, stage layers out of order or out of range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenreduce.errors import TokenReduceError

# The papers' defaults, as fractions of depth so they scale to any model.
FASTV_LAYER = 2  # "after layer 2" (the paper's K)
FASTV_KEEP = 0.5  # R = 50%
PYRAMID_FRACTIONS = (8 / 32, 16 / 32, 24 / 32)  # stage layers of the 32-layer LLaVA-1.5 setting
PYRAMID_KEEP = 0.5  # lambda
GEMFILTER_FRACTION = 13 / 32  # the paper's filter layer for LLaMA-3.1-8B (32 layers)
GEMFILTER_KEEP_TOKENS = 1024
MAX_TOKENS = 1 << 16  # keep_plan's tie-break is exact up to this many tokens per row


@dataclass(frozen=True)
class Stage:
    """One pruning step: rank with the attention of block `score_block`, and run blocks from
    `first_reduced_block` on with `keep` span tokens (plus every token outside the span)."""

    score_block: int
    first_reduced_block: int
    keep: int


def default_layers(method: str, num_layers: int) -> tuple[int, ...]:
    """The papers' layer choices for a model of `num_layers` blocks (0-based block indices)."""
    if method == "fastv":
        return (min(FASTV_LAYER, num_layers - 1),)
    if method == "pyramiddrop":
        return tuple(sorted({max(1, min(num_layers - 1, round(f * num_layers))) for f in PYRAMID_FRACTIONS}))
    if method == "gemfilter":
        return (max(0, min(num_layers - 1, round(GEMFILTER_FRACTION * num_layers))),)
    raise TokenReduceError(f"{method!r} is not a decoder method (fastv, pyramiddrop, gemfilter)")


def stages(method: str, num_layers: int, span: int, layers: tuple[int, ...], keep_ratio: float,
           keep_tokens: int | None) -> list[Stage]:
    """The pruning steps of a method for a prompt whose span has `span` tokens.

    FastV / PyramidDrop: `layers` are the blocks whose input is pruned (block K-1's attention ranks,
    as FastV's "after layer K"); each stage keeps `ceil(keep_ratio * remaining)`. GemFilter: `layers`
    holds the filter layer L (its attention ranks) and every block runs on `keep_tokens` span tokens.
    """
    if any(b < a for a, b in zip(layers, layers[1:])) or len(set(layers)) != len(layers):
        raise TokenReduceError(f"layers must be strictly increasing, got {list(layers)}")
    bad = [v for v in layers if not 0 <= v < num_layers]
    if bad:
        raise TokenReduceError(f"layer(s) {bad} out of range: the model has {num_layers} decoder blocks (0..{num_layers - 1})")
    if method == "gemfilter":
        if len(layers) != 1:
            raise TokenReduceError(f"gemfilter uses one filter layer, got layers={list(layers)}")
        # The paper's k = 1024 is for 32k-128k contexts; on shorter spans the default keeps a quarter.
        k = min(GEMFILTER_KEEP_TOKENS, math.ceil(span / 4)) if keep_tokens is None else keep_tokens
        if not 1 <= k <= span:
            raise TokenReduceError(
                f"keep_tokens={k} but the prompt's span has {span} tokens; choose 1..{span} (or a longer span)")
        return [Stage(score_block=layers[0], first_reduced_block=0, keep=k)]
    if method not in ("fastv", "pyramiddrop"):
        raise TokenReduceError(f"{method!r} is not a decoder method (fastv, pyramiddrop, gemfilter)")
    if keep_tokens is not None:
        raise TokenReduceError(f"keep_tokens is a gemfilter setting; {method} uses keep_ratio")
    if layers[0] < 1:
        raise TokenReduceError(f"{method} prunes after a layer has ranked the tokens: layers must be >= 1, got {list(layers)}")
    out, remaining = [], span
    for layer in layers:
        remaining = math.ceil(keep_ratio * remaining)
        out.append(Stage(score_block=layer - 1, first_reduced_block=layer, keep=remaining))
    return out


def pool_scores(scores: torch.Tensor, window: int) -> torch.Tensor:
    """Max of each token's score and its neighbours' within `window` (odd) -> `[B, N]`.

    An opt-in extension, not part of the three papers: SnapKV (Li et al., "SnapKV: LLM Knows What You are
    Looking for Before Generation", 2024) pools attention scores so a selected token brings its
    neighbours along, which keeps multi-token facts (a number split into digit tokens) whole.
    """
    if window <= 1:
        return scores
    pad = window // 2
    return torch.nn.functional.max_pool1d(scores[:, None, :], window, stride=1, padding=pad)[:, 0, :]


def keep_plan(scores: torch.Tensor, droppable: torch.Tensor, keep: int, num_droppable: int) -> torch.Tensor:
    """Which tokens survive one step, in original order.

    Args:
        scores: `[B, N]` last-query attention over the current tokens (any real values).
        droppable: `[B, N]` bool, the span tokens still present (exactly `num_droppable` per row).
        keep: span tokens to keep (constant, so the output shape is static).
        num_droppable: span tokens per row before this step (the caller checked it per row).

    Returns:
        `[B, N - num_droppable + keep]` int64 indices into the current tokens, ascending: every
        non-span token, plus the `keep` highest-scoring span tokens (ties go to the earlier token).
        Scores must be >= 0 (attention probabilities, possibly pooled).
    """
    n = scores.shape[-1]
    if n > MAX_TOKENS:
        raise TokenReduceError(f"keep_plan ranks at most {MAX_TOKENS} tokens per row, got {n}")
    n_out = n - num_droppable + keep
    # Non-span tokens rank above everything; span tokens by score, earlier first among equal scores.
    # Export-safe (two ONNX TopKs with constant k, no stable sort). The float64 key scales a positive
    # score by (1 - position * 2^-42): at most 2^-26 relative for N <= 2^16, below half an fp32 ulp, so
    # two different fp32 scores never swap, while equal scores (e.g. after score_pool) are ordered by
    # position. Zero scores get -(position + 1): below every positive score, again earlier first.
    pos = torch.arange(n, device=scores.device, dtype=torch.float64)
    s64 = scores.to(torch.float64)
    key = torch.where(s64 > 0, s64 * (1.0 - pos * 2.0**-42), -(pos + 1.0))
    key = torch.where(droppable, key, torch.full_like(key, float("inf")))
    idx = key.topk(n_out, dim=-1).indices
    return idx.topk(n_out, dim=-1, largest=False).values  # ascending: original order
