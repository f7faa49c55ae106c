"""SparseVLM: text-guided visual-token pruning inside the LLM, with the pruned tokens recycled.

Source: Zhang, Fan, Ma, Zheng, Wang, Lu, Chen, Chen, Shang, Wang, Zhang, "SparseVLM: Visual Token
Sparsification for Efficient Vision-Language Model Inference", 2024 (official code Gumpest/SparseVLMs,
`llava/model/language_model/modelling_sparse_llama.py`, `score.py`, `utils.py`; read, not copied).

What it does, as the official code computes it:

* **Raters.** From the LLM's input embeddings, every text token after the image (the question) is rated by
  how much the visual tokens attend to it: `softmax over the text of (v . t)`, averaged over the visual
  tokens; the raters are the text tokens rated above the mean.
* **Scoring.** At each pruning layer, a visual token's relevance is the attention the raters pay it
  (head-averaged attention probabilities, averaged over the rater rows).
* **Pruning.** The most relevant visual tokens are kept.
* **Recycling.** Of the pruned visual tokens, the most relevant `int(0.3 * pruned) + 1` are clustered
  with DPC-KNN (density peaks over Euclidean distance / sqrt(C), `int(m / 10) + 1` centres, density from
  the centre-count nearest neighbours) and each cluster becomes one token: the mean of its members.

Where this departs from the official code, on purpose:

* **Fixed counts.** The paper's count is adaptive (the rank of the attention matrix); the official code's
  inference path uses fixed per-layer lists (e.g. 300/200/110 of 576, "192 tokens"). Here the counts are
  constants from `keep_ratio`, so the graph is static and exports: with stages `1..S`, stage `s` keeps
  `ceil(span * keep_ratio ** (s / S))` span tokens, recycled tokens included, so `keep_ratio` is the fraction
  of the span left after the last stage (default 110/576, the 192-token setting's last stage; its
  geometric stages give 332/192/110 of 576 against the official 300/200/110). The recycled count is
  `int((int(recycle_ratio * (remaining - keep)) + 1) / 10) + 1` (at most `keep - 1`; none when a stage
  drops nothing), the candidates `int(recycle_ratio * pruned) + 1` of the then `pruned` tokens.
* **Positions.** A recycled token takes the original position of its cluster's centre (itself a pruned
  candidate) and kept tokens keep theirs; the official code inserts the recycled tokens after the kept
  visual ones and renumbers the shorter sequence.
* **Layers.** `layers` are the blocks whose input is pruned, ranked with the attention of the block before
  (as FastV here); the official `pruning_loc` [2, 6, 15] (prune after those layers) is `layers=[3, 7, 16]`,
  the default scaled to the depth.
* **Raters.** "After the image" is after the last span token (text between two images does not rate); a
  row without text after the span rates with its last token (the official code would average nothing);
  the best-rated text token is always a rater (a single text token is never above its own mean).
* **Determinism.** DPC-KNN's density has no random tie-break noise (equal scores make the more relevant
  candidate the centre), clusters are plain means (no 1e-6 in the denominator), and distances use the Gram
  form `|a|^2 + |b|^2 - 2 a.b` (no `[m, m, C]` difference tensor).
* **Batch > 1.** Each row rates, scores, prunes and recycles on its own tokens (the official code runs one
  prompt).

The plan is one op, `tokenreduce::sparsevlm_plan` (defined here, with its pure-torch reference that ONNX
export inlines): top-k with constant k and one-hot matmuls, so the pruned prefill exports. Refuses: layer 0
(the previous block's attention ranks), layers out of order or range, keep and recycle ratios out of range,
attention whose queries are not `[B, H, N, d]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from tokenreduce.kernels import decoder_ops
from tokenreduce.methods.base import DecoderMethod, Options, Stage, check_int_list, check_ratio, fail, option
from tokenreduce.methods.prefill import SelectionMethod, SelectionSite, checked_layers, ratio_keep

NAMESPACE = "tokenreduce"
SPARSEVLM_FRACTIONS = (3 / 32, 7 / 32, 16 / 32)  # pruning_loc [2, 6, 15]: inputs of blocks 3, 7, 16 of 32
SPARSEVLM_KEEP_RATIO = 110 / 576  # the 192-token setting's last stage (LLaVA-1.5's 576 image tokens)
SPARSEVLM_RECYCLE = 0.3  # "Top 30%" of the pruned tokens are recycled
CLUSTER_SIZE = 10  # one recycled token per ten candidates (official `int(m / 10) + 1`)


# ------------------------------------------------------------------------------ shared with VisionDrop
def head_mean_probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float, softcap: float,
                    causal: bool) -> torch.Tensor:
    """`[B, N, N]` attention probabilities averaged over heads, in float32.

    q `[B, H, N, d]`, k `[B, H|H_kv, N, d]` (grouped keys repeated), bias broadcastable to `[B, H, N, N]`
    (bool True = attend, or additive), `softcap` c > 0 applies `tanh(logits / c) * c` before the mask (0: no
    cap); `causal` hides later keys when there is no mask."""
    qf, kf = q.float(), k.float()
    if kf.shape[1] != qf.shape[1]:
        kf = kf.repeat_interleave(qf.shape[1] // kf.shape[1], dim=1)
    logits = (qf @ kf.transpose(-1, -2)) * scale
    if softcap > 0:
        logits = torch.tanh(logits / softcap) * softcap
    low = torch.finfo(torch.float32).min
    if bias is not None:
        logits = logits.masked_fill(~bias, low) if bias.dtype == torch.bool else logits + bias.float()
    elif causal:
        n = logits.shape[-1]
        later = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(later, low)
    return logits.softmax(dim=-1).mean(dim=1)


def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx [B, M]` of `x [B, N, C]` -> `[B, M, C]`."""
    return x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[-1]))


def to_sequence(values: torch.Tensor, droppable: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """`[B, S, C]` new values of the span tokens (in sequence order) -> `[B, N, C]`: `hidden` with each span
    token replaced by its value (a gather by the running span count, no scatter)."""
    slot = (droppable.long().cumsum(-1) - 1).clamp_min(0)
    return torch.where(droppable[:, :, None], take(values.to(hidden.dtype), slot), hidden)


def one_hot_rows(idx: torch.Tensor, n: int) -> torch.Tensor:
    """`[B, M]` indices -> `[B, M, n]` float32 one-hot rows."""
    return (torch.arange(n, device=idx.device)[None, None, :] == idx[:, :, None]).float()


# ------------------------------------------------------------------------------ the op
def recycle_counts(remaining: int, keep: int, recycle_ratio: float) -> tuple[int, int]:
    """(recycled tokens, recycling candidates) of a stage keeping `keep` of `remaining` span tokens."""
    if recycle_ratio == 0 or keep >= remaining or keep < 2:
        return 0, 0
    recycled = min(keep - 1, int((int(recycle_ratio * (remaining - keep)) + 1) / CLUSTER_SIZE) + 1)
    pruned = remaining - (keep - recycled)
    return recycled, max(recycled, min(pruned, int(recycle_ratio * pruned) + 1))


def first_top(score: torch.Tensor, k: int) -> torch.Tensor:
    """`[B, k]` indices of the `k` largest of `score [B, M]` (>= 0), equal scores to the earlier index (a
    float64 key scaled by `1 - i * 2^-42`, below half an fp32 ulp, as `kernels.plans.keep_plan` does)."""
    pos = torch.arange(score.shape[-1], device=score.device, dtype=torch.float64)
    s64 = score.to(torch.float64)
    return torch.where(s64 > 0, s64 * (1.0 - pos * 2.0**-42), -(pos + 1.0)).topk(k, dim=-1).indices


def dpc_knn(x: torch.Tensor, centres: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN clustering of `x [B, M, C]` into `centres` clusters -> (centre indices `[B, K]`, the cluster
    of every token `[B, M]` in 0..K-1; each centre in its own). Density: `exp(-mean of the squared distances
    to the K nearest)` (the token itself included); a token's distance indicator is its distance to the
    nearest denser token (the largest distance for the densest); centres have the largest density * indicator,
    ties to the earlier token (with one centre every density is 1: the first candidate, the most relevant, is
    the centre); every other token joins its nearest centre."""
    m, c = x.shape[1], x.shape[2]
    sq = (x * x).sum(-1)
    d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * (x @ x.transpose(1, 2))
    eye = torch.eye(m, dtype=torch.bool, device=x.device)
    dist = d2.clamp_min(0.0).masked_fill(eye, 0.0).sqrt() / math.sqrt(c)  # [B, M, M]
    density = (-(dist.topk(centres, dim=-1, largest=False).values ** 2).mean(-1)).exp()  # [B, M]
    denser = density[:, None, :] > density[:, :, None]  # [B, i, j]: j is denser than i
    far = dist.amax(dim=(1, 2))[:, None, None].expand_as(dist)
    indicator = torch.where(denser, dist, far).amin(-1)
    top = first_top(indicator * density, centres)  # [B, K]
    to_centre = dist.gather(1, top[:, :, None].expand(-1, -1, m))  # [B, K, M]
    member = one_hot_rows(top, m)  # [B, K, M]: centre k is token top[k]
    slots = torch.arange(centres, device=x.device, dtype=torch.float32)
    own = (member * slots[None, :, None]).sum(1).long()  # a centre's own cluster
    cluster = torch.where(member.sum(1) > 0, own, to_centre.argmin(1))
    return top, cluster


def rater_rows(embeds: torch.Tensor, span0: torch.Tensor, kept: torch.Tensor | None, droppable: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """`[B, N]` bool: the current tokens that rate the visual ones. Text = real non-span tokens after the last
    original span token; each is rated by `softmax over the text of (v . t)` averaged over the original
    span tokens `v` (input embeddings); raters: rated above the row's mean, or the best. A row without
    text after the span rates with its last token."""
    b, n = droppable.shape
    pos0 = torch.arange(span0.shape[1], device=span0.device)
    last_span = torch.where(span0, pos0[None, :], torch.full_like(pos0, -1)[None, :]).amax(-1, keepdim=True)
    orig = kept if kept is not None else torch.arange(n, device=droppable.device)[None, :].expand(b, n)
    text = (orig > last_span) & ~droppable & decoder_ops.allowed_keys(bias, n).to(droppable.device)
    cur = embeds if kept is None else take(embeds, kept)
    low = torch.finfo(torch.float32).min
    logits = (embeds.float() @ cur.float().transpose(1, 2)).masked_fill(~text[:, None, :], low)  # [B, N0, N]
    vis = span0.float()[:, :, None]
    rating = (logits.softmax(-1) * vis).sum(1) / vis.sum(1).clamp_min(1.0)  # [B, N]
    mean = (rating * text).sum(-1, keepdim=True) / text.sum(-1, keepdim=True).clamp_min(1)
    best = torch.where(text, rating, torch.full_like(rating, float("-inf"))).amax(-1, keepdim=True)
    raters = text & ((rating > mean) | (rating >= best))
    last = torch.arange(n, device=droppable.device)[None, :].expand(b, n) == n - 1
    has_text = text.any(-1, keepdim=True)
    return (raters & has_text) | (last & ~has_text)  # logical ops: onnxruntime has no bool Where


def sparsevlm_plan_reference(hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None,
                             embeds: torch.Tensor, span0: torch.Tensor, kept: torch.Tensor | None,
                             droppable: torch.Tensor, scale: float, softcap: float, causal: bool, keep: int,
                             num_droppable: int, recycled: int, candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One SparseVLM stage.

    Args:
        hidden: `[B, N, C]` hidden states entering the pruned block (what is kept and recycled).
        q, k, bias, scale, softcap, causal: the previous block's attention (see `head_mean_probs`).
        embeds, span0: the LLM's input embeddings `[B, N0, C]` and the original span `[B, N0]` (raters).
        kept: `[B, N]` original positions of the current tokens (None: all, unpruned).
        droppable: `[B, N]` bool, exactly `num_droppable` span tokens per row.
        keep: span tokens left after the stage, recycled ones included; recycled / candidates: see
            `recycle_counts` (0 / 0: plain pruning).

    Returns:
        `scores [B, N]` float32 (1 for the kept span tokens and the recycled ones' centres, else 0) and
        `merged [B, N, C]` (`hidden` with each centre replaced by its cluster's mean).
    """
    if not 0 <= recycled < keep <= num_droppable or (recycled and not recycled <= candidates <= num_droppable -
                                                      (keep - recycled)):
        raise ValueError(f"sparsevlm counts out of range: keep {keep} of {num_droppable}, {recycled} recycled from "
                         f"{candidates} candidates")
    probs = head_mean_probs(q, k, bias, scale, softcap, causal)
    raters = rater_rows(embeds, span0, kept, droppable, bias).float()
    relation = (raters[:, None, :] @ probs)[:, 0] / raters.sum(-1, keepdim=True)  # [B, N]
    s = num_droppable
    idx = decoder_ops.span_positions(droppable, s)
    rel = relation.gather(1, idx)  # [B, S]
    chosen = rel.topk(keep - recycled, dim=-1).indices
    kept_span = one_hot_rows(chosen, s).sum(1) > 0  # [B, S]
    if not recycled:
        return decoder_ops.from_span(kept_span.float(), droppable), hidden.clone()
    cand = torch.where(kept_span, torch.full_like(rel, float("-inf")), rel).topk(candidates, dim=-1).indices
    feats = take(hidden.gather(1, idx[:, :, None].expand(-1, -1, hidden.shape[-1])).float(), cand)  # [B, M, C]
    top, cluster = dpc_knn(feats, recycled)
    assign = one_hot_rows(cluster, recycled)  # [B, M, K]
    means = assign.transpose(1, 2) @ feats / assign.sum(1)[:, :, None]  # [B, K, C]
    at = one_hot_rows(cand.gather(1, top), s)  # [B, K, S]: centre k sits at span slot
    is_centre = at.sum(1) > 0
    span_feats = take(hidden, idx).float()
    span_feats = torch.where(is_centre[:, :, None], at.transpose(1, 2) @ means, span_feats)
    scores = decoder_ops.from_span((kept_span | is_centre).float(), droppable)
    return scores, to_sequence(span_feats, droppable, hidden)


@torch.library.custom_op(f"{NAMESPACE}::sparsevlm_plan", mutates_args=())
def sparsevlm_plan(hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None,
                   embeds: torch.Tensor, span0: torch.Tensor, kept: torch.Tensor | None, droppable: torch.Tensor,
                   scale: float, softcap: float, causal: bool, keep: int, num_droppable: int, recycled: int,
                   candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sparsevlm_plan_reference` as one graph node -> (`[B, N]` scores, `[B, N, C]` merged)."""
    scores, merged = sparsevlm_plan_reference(hidden, q, k, bias, embeds, span0, kept, droppable, scale, softcap,
                                              causal, keep, num_droppable, recycled, candidates)
    return scores.contiguous(), merged.contiguous()


@sparsevlm_plan.register_fake
def _(hidden, q, k, bias, embeds, span0, kept, droppable, scale, softcap, causal, keep, num_droppable, recycled,
      candidates):
    return hidden.new_empty(hidden.shape[:2], dtype=torch.float32), torch.empty_like(hidden)


# ------------------------------------------------------------------------------ the method
def staged_keeps(span: int, keep_ratio: float, stages: int) -> list[int]:
    """Span tokens left after each of `stages` stages: `ceil(span * keep_ratio ** (s / stages))`, so the
    last stage leaves `ceil(keep_ratio * span)` (geometric in between; 1.0 keeps every token)."""
    out = [ratio_keep(keep_ratio ** (s / stages), span) for s in range(1, stages)]
    return out + [ratio_keep(keep_ratio, span)]


def scaled_layers(fractions: Sequence[float], num_layers: int) -> tuple[int, ...]:
    """Blocks at `fractions` of the depth, each in 1..num_layers-1 (duplicates dropped)."""
    return tuple(sorted({max(1, min(num_layers - 1, round(f * num_layers))) for f in fractions}))


def attention_stages(method: DecoderMethod, options: Options, num_layers: int, span: int,
                     keep_ratio: float) -> list[Stage]:
    """One stage per pruning layer K: block `K-1`'s attention ranks, block K's input is pruned, and the
    stages leave the geometric `staged_keeps`."""
    layers = checked_layers(method, options, num_layers)
    if layers[0] < 1:
        raise fail("layers", f"{method.name} ranks with the attention of the block before the pruned one: layers "
                             f"must be >= 1, got {list(layers)}")
    return [Stage(score_block=layer - 1, first_reduced_block=layer, keep=keep)
            for layer, keep in zip(layers, staged_keeps(span, keep_ratio, len(layers)), strict=True)]


def attention_operands(name: str, site: SelectionSite) -> tuple[fx.Node, fx.Node, float, float, bool]:
    """(q, k, scale, softcap or 0, causal) of the score block's attention, refused unless `[B, H, N, d]`."""
    att = site.attention
    if att is None or len(att.q.meta["val"].shape) != 4 or len(att.k.meta["val"].shape) != 4:
        raise fail("method", f"{name} reads the attention map of the block before the pruned one, whose queries "
                             "and keys must be [B, heads, tokens, head_dim] (this model's attention uses another "
                             "layout)")
    return att.q, att.k, float(att.scale), float(att.softcap or 0.0), bool(att.is_causal)


def check_staged(options: Options, layers: Any, keep_ratio: Any, share: str, value: Any, zero: str) -> None:
    """The settings of a staged attention method (SparseVLM, VisionDrop), checked and stored on `options`:
    `layers` (ints, placed against the model later), `keep_ratio` in (0, 1], and the share setting named
    `share` a number in [0, 1] (0 = `zero`)."""
    if layers is not None:
        options.set("layers", check_int_list("layers", layers, lo=None))
    options.set("keep_ratio", check_ratio("keep_ratio", keep_ratio))
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise fail(share, f"{share} must be a number in [0, 1] (0 = {zero}), got {value!r}")
    options.set(share, float(value))


@dataclass(frozen=True)
class SparsevlmOptions(Options):
    layers: tuple[int, ...] | None = option(None, "blocks (0-based, >= 1) whose input is pruned, ranked by the "
                                                  "block before; default: the paper's 3/7/16 of 32, scaled")
    keep_ratio: float = option(SPARSEVLM_KEEP_RATIO, "fraction of the span tokens left after the last stage, "
                                                     "recycled ones included, in (0, 1]; earlier stages keep the "
                                                     "geometric steps (default 110/576)")
    recycle_ratio: float = option(SPARSEVLM_RECYCLE, "share of each stage's pruned tokens (the most relevant) "
                                                     "clustered into recycled tokens, one per ten, in [0, 1] "
                                                     "(0: plain pruning; default 0.3)")

    def validate(self) -> None:
        check_staged(self, self.layers, self.keep_ratio, "recycle_ratio", self.recycle_ratio, "no recycling")


class Sparsevlm(SelectionMethod):
    name = "sparsevlm"
    summary = "text-guided: the question's rater tokens score the visual tokens inside the LLM, pruned ones " \
              "recycled (Zhang et al., 2024)"
    options_type = SparsevlmOptions

    def default_layers(self, num_layers: int) -> tuple[int, ...]:
        return scaled_layers(SPARSEVLM_FRACTIONS, num_layers)

    def stages(self, options: Options, num_layers: int, span: int) -> list[Stage]:
        assert isinstance(options, SparsevlmOptions)
        return attention_stages(self, options, num_layers, span, options.keep_ratio)

    def emit_scores(self, options: Options, site: SelectionSite) -> fx.Node:
        assert isinstance(options, SparsevlmOptions)
        q, k, scale, cap, causal = attention_operands(self.name, site)
        assert site.embeddings is not None and site.span is not None, "the pass gives the embeddings and span"
        recycled, candidates = recycle_counts(site.num_droppable, site.keep, options.recycle_ratio)
        b = site.builder
        plan = b.add(torch.ops.tokenreduce.sparsevlm_plan.default,
                     (site.hidden, q, k, site.mask, site.embeddings, site.span, site.kept, site.droppable, scale, cap,
                      causal, site.keep, site.num_droppable, recycled, candidates))
        site.merged = b.item(plan, 1)
        return b.item(plan, 0)

    def references(self) -> dict[Any, Callable[..., Any]]:
        return {**super().references(), torch.ops.tokenreduce.sparsevlm_plan.default: sparsevlm_plan_reference}


METHOD = Sparsevlm()
