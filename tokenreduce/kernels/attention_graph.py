"""Scores from a block's whole attention matrix: the attention each token receives, and its PageRank.

Why this file exists: EViT's CLS row (`query_row_scores`) needs a CLS token. Models without one (SigLIP,
average-pooled ViTs, CaiT's self-attention stage, Wav2Vec2, Whisper, text encoders) can still rank tokens by
the attention they *receive* from every query, and Zero-TPrune (Wang et al., CVPR 2024) ranks them by a
weighted PageRank over the same attention graph. Both read the full `[B, H, N, N]` probabilities of one
block, recomputed here from that block's `q`, `k`, mask/bias and scale, so the block's own fused SDPA stays
in place and every other block never materialises its attention.

* `received_scores(q, k, bias, scale, valid)` -> `[B, N]`: the column mean of the head-averaged attention
  probabilities over the queries, `s_j = mean_h sum_i w_i P[h, i, j]` with `w_i = valid_i / sum(valid)` (a
  sum divided by a count, never a masked mean: padding queries weigh exactly 0, padding keys get the
  probability the mask gives them, 0 for a -inf/min mask).
* `pagerank_scores(q, k, bias, scale, valid, iterations, rms)` -> `[B, N]`: Zero-TPrune's weighted PageRank
  per head, `s^0 = w`, `s^{t+1}_j = sum_i s^t_i P[h, i, j]` (`s^{t+1} = P^T s^t`: a token is important when
  important tokens attend to it), a fixed number of power iterations (a static graph, no data-dependent
  loop), then the heads aggregated by their root mean square (`rms=True`) or mean. One iteration with the
  mean is exactly `received_scores`.

Both are `torch.ops.tokenreduce.*` custom ops (one named node; fake implementations state `[B, N]`; FLOP
formulas count the `Q K^T` and the iterations; backward formulas recompute the reference under autograd)
with pure-torch references that ONNX export inlines through the methods' `references()` (`REFERENCES`
below; `passes/inline_reference_ops.py`). The `*_of_probabilities` functions take the block's own softmax
output instead, for explicit attention whose logits carry terms `q` and `k` alone do not give (relative
biases, soft-capping, `masked_fill`); they are plain functions traced into the graph.

Refuses: cross-attention shapes (the graph needs as many queries as keys), `iterations < 1`. Memory: the
reference materialises the scoring block's `[B, H, N, N]` float32 probabilities once (what an explicit
attention model holds anyway); on CUDA the reference runs too (no Triton kernel yet for these scores).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import register_flop_formula

from tokenreduce.errors import TokenReduceError

NAMESPACE = "tokenreduce"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scores are computed in: float32, or float64 for float64 inputs (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """`softmax(q k^T * scale + bias)` in (at least) float32 -> `[B, H, N, N]`.

    Args:
        q, k: `[B, H, N, d]` as fed to the block's attention (self-attention: as many queries as keys).
        bias: optional mask broadcastable to `[B, H, N, N]`: bool (True = attend) or additive float (the
            block's padding mask and `log(size)` term, as its softmax sees them).
        scale: the attention's logit scale.
    """
    if q.shape[-2] != k.shape[-2]:
        raise TokenReduceError(
            f"attention-graph scores need self-attention (as many queries as keys); got {q.shape[-2]} queries "
            f"over {k.shape[-2]} keys")
    acc = accumulation_dtype(q.dtype)
    logits = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if bias is not None:
        if bias.dtype == torch.bool:
            logits = logits.masked_fill(~bias, torch.finfo(acc).min)
        else:
            logits = logits + bias.to(acc)
    return logits.softmax(dim=-1)


def query_weights(valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """`[B, N]` weight of each query (`like`'s dtype), summing to 1 per row: `valid / sum(valid)` (a real row
    always has one valid token), or `1 / N` without padding. `like` is the `[B, H, N, N]` probabilities."""
    bsz, n = like.shape[0], like.shape[-2]
    if valid is None:
        return torch.full((bsz, n), 1.0 / n, dtype=like.dtype, device=like.device)
    w = valid.to(like.dtype)
    return w / w.sum(dim=-1, keepdim=True).clamp(min=1.0)


def _masked_rows(probs: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The probabilities with padding query rows set to exactly 0 (a fully masked row may hold NaN)."""
    if valid is None:
        return probs
    return torch.where(valid[:, None, :, None], probs, torch.zeros_like(probs))


def pagerank_of_probabilities(probs: torch.Tensor, valid: torch.Tensor | None, iterations: int,
                              rms: bool) -> torch.Tensor:
    """Weighted PageRank of every token over attention probabilities `[B, H, N, N]` (rows = queries).

    `s^0 = query_weights(valid)` per head; `s^{t+1}_j = sum_i s^t_i P[h, i, j]` `iterations` times (each step
    keeps `sum_j s_j = 1`, since every row of `P` sums to 1); the heads are then aggregated by their root
    mean square (`rms`) or their mean. Returns `[B, N]` in (at least) float32.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise TokenReduceError(f"PageRank iterations must be an int >= 1, got {iterations!r}", setting="iterations")
    probs = _masked_rows(probs.to(accumulation_dtype(probs.dtype)), valid)
    s = query_weights(valid, probs)[:, None, None, :].expand(-1, probs.shape[1], 1, -1)  # [B, H, 1, N]
    for _ in range(iterations):  # a constant count: unrolled into a static graph
        s = s @ probs
    s = s[:, :, 0, :]
    return s.square().mean(dim=1).sqrt() if rms else s.mean(dim=1)


def received_of_probabilities(probs: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Attention each token receives: `sum_i w_i P[h, i, j]` averaged over heads -> `[B, N]` (at least
    float32), from probabilities `[B, H, N, N]` (rows = queries; `w = query_weights(valid)`)."""
    probs = _masked_rows(probs.to(accumulation_dtype(probs.dtype)), valid)
    w = query_weights(valid, probs)
    return (probs * w[:, None, :, None]).sum(dim=2).mean(dim=1)


def _heads_first(probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A softmax output `[B, H, N, N]` or `[B*H, N, N]` (bmm layout) as `[B, H, N, N]`; `x [B, N, C]` gives B."""
    return probs.reshape(x.shape[0], -1, probs.shape[-2], probs.shape[-1])


def received_of_block(probs: torch.Tensor, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """`received_of_probabilities` of a block's own softmax output (any head layout), in `x`'s dtype."""
    return received_of_probabilities(_heads_first(probs, x), valid).to(x.dtype)


def pagerank_of_block(probs: torch.Tensor, x: torch.Tensor, valid: torch.Tensor | None, iterations: int,
                      rms: bool) -> torch.Tensor:
    """`pagerank_of_probabilities` of a block's own softmax output (any head layout), in `x`'s dtype."""
    return pagerank_of_probabilities(_heads_first(probs, x), valid, iterations, rms).to(x.dtype)


def received_scores_reference(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float,
                              valid: torch.Tensor | None) -> torch.Tensor:
    """The `received_scores` op: `[B, N]` attention each token receives (column mean over the valid
    queries, head-averaged), computed in float32 and cast to q's dtype."""
    return received_of_probabilities(attention_probabilities(q, k, bias, scale), valid).to(q.dtype)


def pagerank_scores_reference(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float,
                              valid: torch.Tensor | None, iterations: int, rms: bool) -> torch.Tensor:
    """The `pagerank_scores` op: `[B, N]` weighted PageRank over the block's attention graph (float32
    arithmetic, cast to q's dtype)."""
    return pagerank_of_probabilities(attention_probabilities(q, k, bias, scale), valid, iterations, rms).to(q.dtype)


# ------------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op(f"{NAMESPACE}::received_scores", mutates_args=())
def received_scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float,
                    valid: torch.Tensor | None) -> torch.Tensor:
    """Head-averaged attention received by every key from the valid queries -> `[B, N]`."""
    return received_scores_reference(q, k, bias, scale, valid).contiguous()


@received_scores.register_fake
def _(q, k, bias, scale, valid):
    return q.new_empty((q.shape[0], k.shape[-2]))


@torch.library.custom_op(f"{NAMESPACE}::pagerank_scores", mutates_args=())
def pagerank_scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float,
                    valid: torch.Tensor | None, iterations: int, rms: bool) -> torch.Tensor:
    """Zero-TPrune's weighted PageRank over the attention graph, heads aggregated -> `[B, N]`."""
    return pagerank_scores_reference(q, k, bias, scale, valid, iterations, rms).contiguous()


@pagerank_scores.register_fake
def _(q, k, bias, scale, valid, iterations, rms):
    return q.new_empty((q.shape[0], k.shape[-2]))


@register_flop_formula(torch.ops.tokenreduce.received_scores)
def _received_flops(q_shape, k_shape, *args, **kwargs) -> int:
    bsz, heads, n, d = k_shape
    return 2 * bsz * heads * q_shape[-2] * n * (d + 1)  # Q K^T, then the weighted column sums


@register_flop_formula(torch.ops.tokenreduce.pagerank_scores)
def _pagerank_flops(q_shape, k_shape, bias_shape, scale, valid_shape, iterations, *args, **kwargs) -> int:
    bsz, heads, n, d = k_shape
    return 2 * bsz * heads * q_shape[-2] * n * (d + iterations)  # Q K^T, then one P^T s per iteration


# Backward: both scores are smooth functions of q, k and an additive float bias; the backward re-runs the
# reference under autograd (the scoring block only, so the cost is one more [B, H, N, N] softmax).
def _setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    q, k, bias, *rest = inputs
    ctx.rest = rest
    ctx.save_for_backward(q, k, bias)


def _backward_of(reference: Callable[..., torch.Tensor], extra: int) -> Callable[..., tuple[Any, ...]]:
    """A backward for an op `reference(q, k, bias, *rest)` whose `rest` (scale, valid, ...) gets no gradient."""

    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        q, k, bias = ctx.saved_tensors
        with_bias = bias is not None and bias.dtype.is_floating_point and ctx.needs_input_grad[2]
        with torch.enable_grad():
            qd, kd = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
            bd = bias.detach().requires_grad_(True) if with_bias else bias
            out = reference(qd, kd, bd, *ctx.rest)
            wrt = [qd, kd] + ([bd] if with_bias else [])
            grads = torch.autograd.grad(out, wrt, grad, allow_unused=True)
        return (grads[0], grads[1], grads[2] if with_bias else None) + (None,) * extra

    return backward


torch.library.register_autograd(f"{NAMESPACE}::received_scores", _backward_of(received_scores_reference, 2),
                                setup_context=_setup)
torch.library.register_autograd(f"{NAMESPACE}::pagerank_scores", _backward_of(pagerank_scores_reference, 4),
                                setup_context=_setup)

REFERENCES: dict[Any, Callable[..., Any]] = {
    torch.ops.tokenreduce.received_scores.default: received_scores_reference,
    torch.ops.tokenreduce.pagerank_scores.default: pagerank_scores_reference,
}
"""The ops of this file -> their pure-torch implementations (ONNX inlines them through `Method.references()`)."""
