"""Pure-torch reference implementations of the apply step, the score computations and the token-state
bookkeeping.

These are the CPU implementations of the custom ops in `ops.py` and the ground truth any GPU kernel is
tested against. Export safety is a design rule here: weighted means are `sum(w * x) / sum(w)` built from
scatter-*add* (never `scatter_reduce(mean)`, which the ONNX exporter silently turns into an overwrite),
and every output shape is a function of input shapes and constant ints only.

The token-state helpers (`key_validity`, `reduce_mask`, `size_bias`, `init_source`, `unmerge`) are plain
functions the rewrite passes call from the graph; they trace to a handful of standard ops.
"""

from __future__ import annotations

import torch


def weighted(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`w * x` per token, exactly 0 for a zero-weight (dropped) source: a dropped token's NaN/inf never
    reaches the slot it is dropped into (`0 * nan` is nan)."""
    return torch.where(w[:, :, None] > 0, x * w[:, :, None], torch.zeros_like(x))


def apply_plan(
    x: torch.Tensor,
    slot: torch.Tensor,
    weight: torch.Tensor | None,
    size: torch.Tensor | None,
    n_out: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move tokens through a plan.

    Args:
        x: `[B, N, C]` token features.
        slot: `[B, N]` int64 output slot of every token; `n_out` means dropped.
        weight: `[B, N]` averaging weights (None: use `size`).
        size: `[B, N]` original tokens per token (None: ones).
        n_out: number of output slots.

    Returns:
        `x' [B, n_out, C] = sum(w * x) / sum(w)` per slot (0 for a slot whose weights sum to 0) and
        `size' [B, n_out] = sum(size)` per slot over the sources with `w > 0`.
    """
    bsz, n, c = x.shape
    if size is None:
        size = torch.ones(bsz, n, dtype=x.dtype, device=x.device)
    if weight is None:
        weight = size
    weight = weight.to(x.dtype)
    acc = torch.zeros(bsz, n_out + 1, c, dtype=x.dtype, device=x.device)
    acc = acc.scatter_add(1, slot[:, :, None].expand(bsz, n, c), weighted(x, weight))
    wsum = torch.zeros(bsz, n_out + 1, dtype=x.dtype, device=x.device).scatter_add(1, slot, weight)
    counted = torch.where(weight > 0, size, torch.zeros_like(size))  # a zero-weight source is dropped
    ssum = torch.zeros(bsz, n_out + 1, dtype=size.dtype, device=x.device).scatter_add(1, slot, counted)
    wsum = wsum[:, :n_out]
    denom = torch.where(wsum > 0, wsum, torch.ones_like(wsum))
    return acc[:, :n_out] / denom[:, :, None], ssum[:, :n_out]


def apply_matrix(
    x: torch.Tensor,
    matrix: torch.Tensor,
    size: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move tokens through a dense many-to-many plan (Token Transforming) in one batched matmul.

    Args:
        x: `[B, N, C]` token features.
        matrix: `[B, N', N]` non-negative: `matrix[b, s, i]` is the share of token i's mass that slot s
            receives (a column sums to 1 for a kept or spread token, to 0 for a dropped one).
        size: `[B, N]` original tokens per token (None: ones).

    Returns:
        `x' [B, N', C] = (matrix * size) @ x / (matrix @ size)` (0 for a slot with no mass) and
        `size' [B, N'] = matrix @ size`: the size-weighted average of `apply_plan`, with fractional shares.
        A token with no mass in any slot is zeroed first, so its NaN/inf never reaches a slot (`0 * nan`).
    """
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    w = matrix.to(x.dtype) * size.to(x.dtype)[:, None, :]  # [B, N', N]
    used = (w > 0).any(dim=1)  # [B, N]
    x = torch.where(used[:, :, None], x, torch.zeros_like(x))
    ssum = w.sum(dim=-1)  # [B, N']
    denom = torch.where(ssum > 0, ssum, torch.ones_like(ssum))
    return (w @ x) / denom[:, :, None], ssum.to(size.dtype)


def _as_additive(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if bias.dtype == torch.bool:
        return torch.zeros(bias.shape, dtype=dtype, device=bias.device).masked_fill(~bias, torch.finfo(dtype).min)
    return bias.to(dtype)


def query_row_scores(
    q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float, row: int
) -> torch.Tensor:
    """Head-averaged attention probabilities of one query row over all keys.

    Args:
        q: `[B, H, Nq, d]` queries, k: `[B, H, N, d]` keys (as fed to the block's attention).
        bias: optional mask broadcastable to `[B, H, Nq, N]`: bool (True = attend) or additive float.
        scale: the attention's logit scale.
        row: the query row (0 for CLS, -1 for the last token).

    Returns:
        `[B, N]` = `softmax(q[:, :, row] @ k^T * scale + bias[row]).mean(heads)`, computed in float32.
    """
    qr = q[:, :, row : (row + 1) if row != -1 else None, :].float()
    logits = (qr @ k.float().transpose(-1, -2)) * scale  # [B, H, 1, N]
    if bias is not None:
        if bias.shape[-2] != 1:
            bias = bias[..., row : (row + 1) if row != -1 else None, :]
        logits = logits + _as_additive(bias, torch.float32)
    return logits.softmax(dim=-1).mean(dim=1)[:, 0, :].to(q.dtype)


def key_validity(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`[B, N]` bool: which keys some query may attend to under an attention mask `[.., Nq|1, N]`.

    `like` is any `[B, N, ...]` tensor that gives the batch size when the mask broadcasts over batch.
    """
    if mask.dtype == torch.bool:
        ok = mask
    else:
        ok = mask > torch.finfo(mask.dtype).min / 2
    ok = ok.reshape(ok.shape[0], -1, ok.shape[-1]).any(dim=1)
    return ok.expand(like.shape[0], ok.shape[-1])


def gather_tokens(t: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Gather along token axis `dim` with a per-batch `[B, M]` index (t's batch dim may broadcast)."""
    bsz, m = index.shape
    shape = list(t.shape)
    shape[0] = bsz
    t = t.expand(shape)
    view = [bsz] + [1] * (t.dim() - 1)
    view[dim] = m
    target = list(shape)
    target[dim] = m
    return t.gather(dim, index.reshape(view).expand(target))


def reduce_mask(mask: torch.Tensor, rep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Reduce an attention mask `[B|1, H|1, Nq|1, N]` along both token axes to the plan's slots.

    `rep [B, N']` holds the original token each slot stands for; `num_tokens` is the original N, to tell
    a token axis from a broadcast one.
    """
    if mask.shape[-1] == num_tokens:
        mask = gather_tokens(mask, rep, dim=mask.dim() - 1)
    if mask.dim() >= 2 and mask.shape[-2] == num_tokens:
        mask = gather_tokens(mask, rep, dim=mask.dim() - 2)
    return mask


def size_bias(size: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias `log(size)` over keys, combined with an (already reduced) mask.

    Returns `[B, 1, 1, N]` without a mask, or the mask's shape with masked entries at the dtype minimum.
    """
    log_size = size.to(dtype).log()[:, None, None, :]
    if mask is None:
        return log_size
    if mask.dtype == torch.bool:
        return torch.where(mask, log_size, torch.full_like(log_size, torch.finfo(dtype).min))
    return mask.to(dtype) + log_size


def init_source(x: torch.Tensor) -> torch.Tensor:
    """`[B, N]` identity map original position -> slot for hidden states `x [B, N, C]`."""
    return torch.arange(x.shape[1], device=x.device).expand(x.shape[0], x.shape[1])


def compose_index(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """`outer.gather(1, inner)`: follow two index maps (e.g. source through a plan's slots)."""
    return outer.gather(1, inner)


def merge_weight(size: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """Averaging weights of a ToMe step: token sizes (ones before the first merge) times the plan's keep."""
    return keep if size is None else size * keep


def unmerge(x: torch.Tensor, source: torch.Tensor, dim: int) -> torch.Tensor:
    """Restore the original token count: original position i gets `x[:, source[:, i]]` along `dim`."""
    return gather_tokens(x, source, dim=dim)


# --------------------------------------------------------------------------------------------- exported forms
# The functions below are what the ONNX lowering puts in place of `apply_plan` (`passes/inline_reference_ops.py`).
# Same numbers as `apply_plan` (sums in a different order: differences at float rounding level); fewer and
# cheaper ONNX nodes. onnxruntime's ScatterElements walks an expanded `[B, N, C]` int64 index element by
# element, so `apply_plan`'s three scatters over every token cost more at batch 1 than the row copies below
# (measured in docs/benchmarks.md, "Edge: onnxruntime batch 1, fp16, int8").


def gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`t [B, N, ...]` rows picked per batch by `index [B, M]` -> `[B, M, ...]`, as one flat row Gather (ONNX
    `Gather` on axis 0 copies whole rows; `torch.gather` exports as GatherElements over an expanded index)."""
    bsz, n = t.shape[0], t.shape[1]
    rest = tuple(t.shape[2:])
    flat = (index + (torch.arange(bsz, device=index.device) * n)[:, None]).reshape(-1)
    return t.reshape((bsz * n,) + rest)[flat].reshape((bsz, index.shape[1]) + rest)


def apply_plan_packed(
    x: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor | None, size: torch.Tensor | None, n_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_plan` with two scatter-adds instead of three: the weights and counted sizes travel as one
    `[B, N, 2]` tensor (when `size` has the features' dtype; otherwise `apply_plan` itself)."""
    if size is not None and size.dtype != x.dtype:
        return apply_plan(x, slot, weight, size, n_out)
    bsz, n, c = x.shape
    w, counted = _weights(x, weight, size)
    acc = torch.zeros(bsz, n_out + 1, c, dtype=x.dtype, device=x.device)
    acc = acc.scatter_add(1, slot[:, :, None].expand(bsz, n, c), weighted(x, w))
    sums = torch.zeros(bsz, n_out + 1, 2, dtype=x.dtype, device=x.device)
    sums = sums.scatter_add(1, slot[:, :, None].expand(bsz, n, 2), torch.stack([w, counted], dim=2))
    return _finish(acc, sums)


def apply_plan_reps(
    x: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor | None, size: torch.Tensor | None, n_out: int,
    rep: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_plan` for a plan that names a representative source of every slot (`rep [B, n_out]`, distinct,
    `slot[rep[s]] == s`: ToMe's and EViT's plans): each slot starts as a row copy of its representative's
    weighted features, and only the other `N - n_out` sources are scatter-added (ToMe: the r merged tokens,
    not all N). A scatter-add keeps non-finite values in their own slot and channel, as `apply_plan` does.
    If a plan broke the invariant, sources would be lost; the ONNX verification compares against
    `apply_plan` on the example inputs."""
    if size is not None and size.dtype != x.dtype:  # sizes travel with the weights only in the features' dtype
        return apply_plan(x, slot, weight, size, n_out)
    bsz, n, c = x.shape
    w, counted = _weights(x, weight, size)
    xw = weighted(x, w)
    pair = torch.stack([w, counted], dim=2)  # [B, N, 2]
    acc = torch.cat([gather_rows(xw, rep), torch.zeros_like(xw[:, :1])], dim=1)  # + the dump slot n_out
    sums = torch.cat([gather_rows(pair, rep), torch.zeros_like(pair[:, :1])], dim=1)
    k = n - n_out
    if k > 0:
        # non-representatives: topk over a 0/1 flag with a constant k (exact: there are exactly k of them)
        is_rep = rep.gather(1, slot.clamp(max=n_out - 1)) == torch.arange(n, device=x.device)[None, :]
        others = (~is_rep).to(x.dtype).topk(k, dim=-1, largest=True, sorted=False).indices
        dest = slot.gather(1, others)[:, :, None]
        acc = acc.scatter_add(1, dest.expand(bsz, k, c), gather_rows(xw, others))
        sums = sums.scatter_add(1, dest.expand(bsz, k, 2), gather_rows(pair, others))
    return _finish(acc, sums)


def _weights(x: torch.Tensor, weight: torch.Tensor | None, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(`w`, `counted`) of `apply_plan`: averaging weights in x's dtype, and sizes of the sources with w > 0."""
    if size is None:
        size = torch.ones_like(x[:, :, 0])
    w = (size if weight is None else weight).to(x.dtype)
    counted = torch.where(w > 0, size, torch.zeros_like(size))
    return w, counted


def _finish(acc: torch.Tensor, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features / weight sum (0 where no weight arrived) and the size sum, from the weighted feature sums
    `acc [B, n_out + 1, C]` and the (weight, size) sums `sums [B, n_out + 1, 2]` (the last slot is the dump
    slot). Sliced as `apply_plan` slices, so the outputs have its strides: the graph after the apply was
    captured with them."""
    n_out = acc.shape[1] - 1
    wsum = sums[:, :n_out, 0]
    denom = torch.where(wsum > 0, wsum, torch.ones_like(wsum))
    return acc[:, :n_out] / denom[:, :, None], sums[:, :, 1][:, :n_out]
