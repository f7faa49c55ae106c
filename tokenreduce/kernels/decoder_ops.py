"""Custom ops of the decoder prefill methods (`torch.ops.tokenreduce.keep_plan`, `capped_row_scores`,
`window_scores`, `kcenter_scores`, `dart_scores`).

One named node in the graph for the plan step of FastV / PyramidDrop / GemFilter; its CPU implementation
is `kernels.plans.keep_plan`, and the fake implementation states the static output shape. The score step
reuses `tokenreduce::query_row_scores` (row -1: the last query) when the model's logits are plain
`q k^T * scale + mask`. A model whose attention soft-caps its logits (Gemma 2: `tanh(x / c) * c` between
the scale and the mask) is ranked by `capped_row_scores`, which applies the same cap, so the ranking sees
the probabilities the model's attention computes. `capped_row_scores_reference` is its pure-torch
implementation (also what ONNX export inlines, through the decoder methods' `references()`).
`window_scores` is the ranking with `score_window=W > 1` (SnapKV's observation window): the attention of
the last W query rows (the question), summed over the rows, soft-capped where the model caps; W is a
constant, so the slice and the causal mask it builds have static shapes.

The selection methods that rank by hidden states instead of attention emit one op each, whose output is a
`[B, N]` score that `keep_plan` turns into the kept indices (selected span tokens score > 0, the rest 0):

* `kcenter_scores` -- DivPrune's greedy max-min (k-center) selection on cosine distance
  (`methods/divprune.py`);
* `dart_scores` -- DART's pivot tokens and duplication-aware selection (`methods/dart.py`).

`visionzip_plan` (`methods/visionzip.py`) works inside the vision tower instead: from one vision layer's
attention it picks dominant patches (CLS attention) and contextual targets, and returns the layer's
features with each target replaced by its merged value, plus which patches are kept.

Both are written export-safe: a constant number of steps (k, or the pivot count), argmax / top-k with
constant k, one-hot comparisons instead of scatter, no data-dependent shapes. They refuse (ValueError)
counts outside the span.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tokenreduce.kernels import plans

NAMESPACE = "tokenreduce"


@torch.library.custom_op(f"{NAMESPACE}::keep_plan", mutates_args=())
def keep_plan(scores: torch.Tensor, droppable: torch.Tensor, keep: int, num_droppable: int) -> torch.Tensor:
    """`[B, N]` scores and droppable mask -> `[B, N - num_droppable + keep]` ascending kept indices."""
    return plans.keep_plan(scores, droppable, keep, num_droppable).contiguous()


@keep_plan.register_fake
def _(scores, droppable, keep, num_droppable):
    return scores.new_empty((scores.shape[0], scores.shape[-1] - num_droppable + keep), dtype=torch.long)


def capped_row_scores_reference(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float,
                                softcap: float, row: int) -> torch.Tensor:
    """Head-averaged attention probabilities of one query row with soft-capped logits.

    Args:
        q: `[B, H, Nq, d]` queries; k: `[B, H|H_kv, N, d]` keys (grouped keys are repeated over the heads).
        bias: optional mask broadcastable to `[B, H, Nq, N]`: bool (True = attend) or additive float.
        scale: the logit scale; softcap: c in `tanh(logits / c) * c` (> 0); row: the query row (-1: last).

    Returns:
        `[B, N]` = `softmax(tanh(q[row] k^T * scale / c) * c + bias[row]).mean(heads)`, in float32 arithmetic,
        cast to q's dtype (the order of Gemma 2's eager attention: scale, cap, then the mask).
    """
    if softcap <= 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    end = row + 1 if row != -1 else None
    qr = q[:, :, row:end, :].float()
    kf = k.float()
    if kf.shape[1] != qr.shape[1]:
        kf = kf.repeat_interleave(qr.shape[1] // kf.shape[1], dim=1)
    logits = torch.tanh((qr @ kf.transpose(-1, -2)) * scale / softcap) * softcap  # [B, H, 1, N]
    if bias is not None:
        if bias.shape[-2] != 1:
            bias = bias[..., row:end, :]
        if bias.dtype == torch.bool:
            logits = logits.masked_fill(~bias, torch.finfo(torch.float32).min)
        else:
            logits = logits + bias.float()
    return logits.softmax(dim=-1).mean(dim=1)[:, 0, :].to(q.dtype)


@torch.library.custom_op(f"{NAMESPACE}::capped_row_scores", mutates_args=())
def capped_row_scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float, softcap: float,
                      row: int) -> torch.Tensor:
    """`capped_row_scores_reference` as one graph node -> `[B, N]`."""
    return capped_row_scores_reference(q, k, bias, scale, softcap, row).contiguous()


@capped_row_scores.register_fake
def _(q, k, bias, scale, softcap, row):
    return q.new_empty((q.shape[0], k.shape[-2]))


def window_scores_reference(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float,
                            softcap: float | None, window: int, causal: bool) -> torch.Tensor:
    """Attention the last `window` query rows pay each key, summed over those rows, averaged over heads
    (SnapKV's observation window; `window=1` is the last-query row of `query_row_scores`).

    Args:
        q: `[B, H, Nq, d]` queries; k: `[B, H|H_kv, N, d]` keys (grouped keys are repeated over the heads).
        bias: optional mask broadcastable to `[B, H, Nq, N]`: bool (True = attend) or additive float; a bias
            with one query row applies to every window row.
        scale: the logit scale; softcap: c in `tanh(logits / c) * c` (Gemma 2), or None for plain logits.
        window: how many of the last query rows score, `1 .. Nq` (a constant: static shapes).
        causal: also hide from window row i the keys after it (for an `is_causal` attention without a mask;
            a materialised mask already holds the causality).

    Returns:
        `[B, N]` = `sum over rows r of softmax(q[r] k^T * scale (capped) + bias[r]).mean(heads)`, in float32
        arithmetic, cast to q's dtype. Each row's softmax is taken over the keys that row may see; a row
        that may see none (left padding of a row shorter than the window) adds 0.
    """
    nq = q.shape[-2]
    if not 1 <= window <= nq:
        raise ValueError(f"score_window must be in 1..{nq} (the query rows present), got {window}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    qr = q[:, :, nq - window:, :].float()
    kf = k.float()
    if kf.shape[1] != qr.shape[1]:
        kf = kf.repeat_interleave(qr.shape[1] // kf.shape[1], dim=1)
    logits = (qr @ kf.transpose(-1, -2)) * scale  # [B, H, W, N]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if bias is not None:
        if bias.shape[-2] != 1:
            bias = bias[..., bias.shape[-2] - window:, :]
        if bias.dtype == torch.bool:
            logits = logits.masked_fill(~bias, torch.finfo(torch.float32).min)
        else:
            logits = logits + bias.float()
    if causal:
        n = kf.shape[-2]
        rows = torch.arange(n - window, n, device=q.device)
        later = torch.arange(n, device=q.device)[None, :] > rows[:, None]  # [W, N]
        logits = logits.masked_fill(later, torch.finfo(torch.float32).min)
    probs = logits.softmax(dim=-1)
    if window > 1:  # a row that may see no key (a left-padding row inside the window) adds nothing
        probs = probs * (logits > torch.finfo(torch.float32).min / 2).any(-1, keepdim=True)
    return probs.mean(dim=1).sum(dim=1).to(q.dtype)


@torch.library.custom_op(f"{NAMESPACE}::window_scores", mutates_args=())
def window_scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float, softcap: float | None,
                  window: int, causal: bool) -> torch.Tensor:
    """`window_scores_reference` as one graph node -> `[B, N]`."""
    return window_scores_reference(q, k, bias, scale, softcap, window, causal).contiguous()


@window_scores.register_fake
def _(q, k, bias, scale, softcap, window, causal):
    if not 1 <= window <= q.shape[-2]:
        raise ValueError(f"score_window must be in 1..{q.shape[-2]} (the query rows present), got {window}")
    return q.new_empty((q.shape[0], k.shape[-2]))


def span_positions(droppable: torch.Tensor, num_droppable: int) -> torch.Tensor:
    """`[B, N]` bool with exactly `num_droppable` True per row -> `[B, num_droppable]` their positions,
    ascending (a top-k of `-position` over the span, so the shape is static)."""
    pos = torch.arange(droppable.shape[-1], device=droppable.device, dtype=torch.float32)
    key = torch.where(droppable, -pos, torch.full_like(pos, float("-inf")))
    return key.topk(num_droppable, dim=-1).indices


def from_span(values: torch.Tensor, droppable: torch.Tensor) -> torch.Tensor:
    """`[B, S]` values of the span tokens (in sequence order) -> `[B, N]`: each span token's value at its
    position, 0 elsewhere (a gather by the running span count, no scatter)."""
    slot = (droppable.long().cumsum(-1) - 1).clamp_min(0)
    return torch.where(droppable, values.gather(1, slot), torch.zeros((), dtype=values.dtype,
                                                                      device=values.device))


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of `x` scaled to unit L2 norm in float32 (a zero row stays zero: its cosine to anything is 0)."""
    xf = x.float()
    return xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def kcenter_scores_reference(x: torch.Tensor, droppable: torch.Tensor, keep: int, num_droppable: int
                             ) -> torch.Tensor:
    """DivPrune's greedy max-min diversity selection of `keep` span tokens, as keep scores.

    Args:
        x: `[B, N, C]` hidden states (the LLM's input embeddings for DivPrune at layer 0).
        droppable: `[B, N]` bool, exactly `num_droppable` span tokens per row.
        keep: span tokens to select, `1 .. num_droppable` (a constant: the loop has `keep` steps).

    Returns:
        `[B, N]` float32: the i-th selected token (0-based) scores `keep - i`, every other token 0.

    Distance is cosine distance `1 - cos(x_i, x_j)` among the span tokens of a row. Step 0 selects the
    token whose nearest other span token is farthest; each later step selects the not-yet-selected token
    whose distance to the selected set (its minimum distance to a selected token) is largest. Ties go to
    the earlier token (argmax's first maximum).
    """
    if not 1 <= keep <= num_droppable:
        raise ValueError(f"keep must be in 1..{num_droppable}, got {keep}")
    bsz = x.shape[0]
    idx = span_positions(droppable, num_droppable)  # [B, S]
    unit = unit_rows(x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[-1])))
    dist = 1.0 - unit @ unit.transpose(1, 2)  # [B, S, S]
    s = num_droppable
    steps = torch.arange(s, device=x.device)
    score = dist.masked_fill(torch.eye(s, dtype=torch.bool, device=x.device), float("inf")).amin(-1)  # nearest
    picks = []
    for i in range(keep):  # five small ops per step; a selected token's score is -inf from then on
        pick = score.argmax(-1)  # [B]
        row = dist.gather(1, pick[:, None, None].expand(bsz, 1, s))[:, 0]  # [B, S] distances to the pick
        row = row.masked_fill(steps[None, :] == pick[:, None], float("-inf"))
        score = row if i == 0 else torch.minimum(score, row)
        picks.append(pick)
    order = torch.stack(picks, dim=1)  # [B, keep]
    weight = float(keep) - torch.arange(keep, device=x.device, dtype=torch.float32)
    rank = ((steps[None, None, :] == order[:, :, None]).float() * weight[None, :, None]).sum(1)  # [B, S]
    return from_span(rank, droppable)


@torch.library.custom_op(f"{NAMESPACE}::kcenter_scores", mutates_args=())
def kcenter_scores(x: torch.Tensor, droppable: torch.Tensor, keep: int, num_droppable: int) -> torch.Tensor:
    """`kcenter_scores_reference` as one graph node -> `[B, N]` float32."""
    return kcenter_scores_reference(x, droppable, keep, num_droppable).contiguous()


@kcenter_scores.register_fake
def _(x, droppable, keep, num_droppable):
    return x.new_empty(x.shape[:2], dtype=torch.float32)


def pivot_budgets(remaining: int, pivots: int) -> list[int]:
    """Span tokens each of `pivots` pivots selects so that they add up to `remaining`: an equal share,
    the remainder to the first pivots."""
    base, extra = divmod(remaining, pivots)
    return [base + (1 if j < extra else 0) for j in range(pivots)]


def allowed_keys(bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """`[B|1, N]` bool: the keys the last query may attend to under an attention mask broadcastable to
    `[B, H, N, N]` (bool True = attend, or additive with a large negative value for masked keys)."""
    if bias is None:
        return torch.ones(1, n, dtype=torch.bool)
    row = bias[..., -1, :]  # [B|1, H|1, N]
    ok = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    return ok.reshape(ok.shape[0], -1, ok.shape[-1]).any(1)


def dart_scores_reference(x: torch.Tensor, keys: torch.Tensor, droppable: torch.Tensor, bias: torch.Tensor | None,
                          keep: int, num_droppable: int, pivot_image: int, pivot_text: int) -> torch.Tensor:
    """DART's duplication-aware selection of `keep` span tokens, as keep scores.

    Args:
        x: `[B, N, C]` hidden states entering the pruned layer (whose cosine similarities measure duplication).
        keys: `[B, H, N, d]` the previous layer's keys (after rotary; their L1 norm over heads and channels
            picks the pivots).
        droppable: `[B, N]` bool, exactly `num_droppable` span tokens per row.
        bias: the previous layer's attention mask (its last query row tells real tokens from padding), or None.
        keep: span tokens kept, `pivot_image .. num_droppable`.
        pivot_image / pivot_text: pivots taken from the span / from the real tokens after the span.

    Returns:
        `[B, N]` float32: 1 for the `keep` selected span tokens, 0 elsewhere.

    Pivots: the `pivot_image` span tokens and the `pivot_text` real non-span tokens after the last span
    token with the largest key L1 norm (a row with fewer text candidates repeats its best text pivot). The
    image pivots are kept. Then each pivot in sequence order selects its budget (`pivot_budgets` of
    `keep - pivot_image` over all pivots) of not-yet-selected span tokens least cosine-similar to it.
    """
    if not 0 <= pivot_image <= keep <= num_droppable:
        raise ValueError(f"keep must be in {pivot_image}..{num_droppable} (at least the {pivot_image} image "
                         f"pivots), got {keep}")
    if pivot_image + pivot_text < 1:
        raise ValueError("DART needs at least one pivot")
    bsz, n, _ = x.shape
    neg = torch.full((), float("-inf"), device=x.device)
    pos = torch.arange(n, device=x.device)
    l1 = keys.float().abs().sum(dim=(1, 3))  # [B, N]
    pivots = []
    selected = torch.zeros(bsz, n, dtype=torch.bool, device=x.device)
    if pivot_image:
        img = torch.where(droppable, l1, neg).topk(pivot_image, dim=-1).indices  # [B, Pi]
        selected = (pos[None, None, :] == img[:, :, None]).any(1)
        pivots.append(img)
    if pivot_text:
        last_span = torch.where(droppable, pos[None, :], torch.full_like(pos, -1)[None, :]).amax(-1, keepdim=True)
        after = (pos[None, :] > last_span) & ~droppable & allowed_keys(bias, n).to(x.device)
        vals, txt = torch.where(after, l1, neg).topk(pivot_text, dim=-1)
        pivots.append(torch.where(vals > neg, txt, txt[:, :1]))
    order = torch.cat(pivots, dim=-1).sort(dim=-1).values  # [B, P] pivots in sequence order
    unit = unit_rows(x)
    remaining = droppable & ~selected
    for j, budget in enumerate(pivot_budgets(keep - pivot_image, order.shape[-1])):
        if budget == 0:
            continue
        pivot = unit.gather(1, order[:, j, None, None].expand(-1, 1, unit.shape[-1]))  # [B, 1, C]
        cos = (unit * pivot).sum(-1)  # [B, N]
        pick = torch.where(remaining, -cos, neg).topk(budget, dim=-1).indices
        hit = (pos[None, None, :] == pick[:, :, None]).any(1)
        selected = selected | hit
        remaining = remaining & ~hit
    return selected.float()


@torch.library.custom_op(f"{NAMESPACE}::dart_scores", mutates_args=())
def dart_scores(x: torch.Tensor, keys: torch.Tensor, droppable: torch.Tensor, bias: torch.Tensor | None, keep: int,
                num_droppable: int, pivot_image: int, pivot_text: int) -> torch.Tensor:
    """`dart_scores_reference` as one graph node -> `[B, N]` float32."""
    return dart_scores_reference(x, keys, droppable, bias, keep, num_droppable, pivot_image, pivot_text).contiguous()


@dart_scores.register_fake
def _(x, keys, droppable, bias, keep, num_droppable, pivot_image, pivot_text):
    return x.new_empty(x.shape[:2], dtype=torch.float32)


def visionzip_plan_reference(feats: torch.Tensor, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None,
                             scale: float, dominant: int, contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's dominant + contextual tokens of one vision layer (CLS first, then `P` patches).

    Args:
        feats: `[B, 1 + P, C]` the layer's output features (what the projector reads, CLS at index 0).
        q, k: `[B, H, 1 + P, d]` the layer's attention queries and keys (before scaling).
        bias: the layer's attention mask broadcastable to `[B, H, 1 + P, 1 + P]` (None: no mask).
        scale: the attention logit scale. dominant / contextual: patch counts, `dominant + contextual <= P`.

    Returns:
        `merged [B, 1 + P, C]`: `feats` with each contextual target replaced by `target + mean(assigned)`;
        `kept [B, P]` float32: 1 for the dominant patches and the contextual targets, else 0.

    Dominant: the `dominant` patches the CLS query attends to most (probabilities summed over heads).
    Contextual: among the other patches in order, targets every `max(1, R // contextual)`-th (the first
    `contextual`); every other remaining patch joins the target whose head-averaged key is most
    cosine-similar to its own, and each target adds the mean of the features that joined it.
    """
    bsz, t, _ = feats.shape
    p = t - 1
    if not (0 <= dominant and 0 <= contextual and 1 <= dominant + contextual <= p):
        raise ValueError(f"dominant + contextual must be in 1..{p}, got {dominant} + {contextual}")
    logits = (q[:, :, :1].float() @ k.float().transpose(-1, -2)) * scale  # [B, H, 1, T]
    if bias is not None:
        row = bias[..., :1, :]
        logits = logits.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else logits + row.float()
    cls = logits.softmax(-1).sum(1)[:, 0, 1:]  # [B, P]
    pos = torch.arange(p, device=feats.device)
    dom = cls.topk(dominant, dim=-1).indices if dominant else torch.zeros(bsz, 0, dtype=torch.long, device=feats.device)
    dom_mask = (pos[None, None, :] == dom[:, :, None]).any(1)  # [B, P]
    kept = dom_mask.float()
    patches = feats[:, 1:]
    if contextual == 0:
        return feats, kept
    rest = span_positions(~dom_mask, p - dominant)  # [B, R] remaining patches, ascending
    r = p - dominant
    step = max(1, r // contextual)
    targets = list(range(0, r, step))[:contextual]
    others = [i for i in range(r) if i not in targets]
    t_pos, o_pos = rest[:, targets], rest[:, others]  # [B, Ct], [B, R - Ct]
    metric = k.float().mean(1)[:, 1:]  # [B, P, d] head-averaged keys
    unit = metric / metric.norm(dim=-1, keepdim=True)

    def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[-1]))

    sim = take(unit, o_pos) @ take(unit, t_pos).transpose(1, 2)  # [B, R - Ct, Ct]
    slots = torch.arange(len(targets), device=feats.device)
    assign = (sim.argmax(-1)[:, :, None] == slots[None, None, :]).float()  # [B, R - Ct, Ct]
    counts = assign.sum(1).clamp_min(1.0)[:, :, None]
    added = assign.transpose(1, 2) @ take(patches.float(), o_pos) / counts  # [B, Ct, C]
    at = (pos[None, None, :] == t_pos[:, :, None]).float()  # [B, Ct, P]
    merged = patches.float() + at.transpose(1, 2) @ added
    kept = kept + at.sum(1)
    return torch.cat([feats[:, :1], merged.to(feats.dtype)], dim=1), kept


@torch.library.custom_op(f"{NAMESPACE}::visionzip_plan", mutates_args=())
def visionzip_plan(feats: torch.Tensor, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float,
                   dominant: int, contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`visionzip_plan_reference` as one graph node -> (`[B, 1 + P, C]` merged features, `[B, P]` kept)."""
    merged, kept = visionzip_plan_reference(feats, q, k, bias, scale, dominant, contextual)
    return merged.clone(), kept.contiguous()  # a custom op's output may not alias its input


@visionzip_plan.register_fake
def _(feats, q, k, bias, scale, dominant, contextual):
    return torch.empty_like(feats), feats.new_empty((feats.shape[0], feats.shape[1] - 1), dtype=torch.float32)


REFERENCES: dict[Any, Callable[..., Any]] = {
    torch.ops.tokenreduce.capped_row_scores.default: capped_row_scores_reference,
    torch.ops.tokenreduce.window_scores.default: window_scores_reference,
    torch.ops.tokenreduce.kcenter_scores.default: kcenter_scores_reference,
    torch.ops.tokenreduce.dart_scores.default: dart_scores_reference,
    torch.ops.tokenreduce.visionzip_plan.default: visionzip_plan_reference}
