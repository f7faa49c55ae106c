"""Selections that read a vision tower's attention across layers: HiPrune and FlowCut (`methods/hiprune.py`,
`methods/flowcut.py`), as pure tensor functions and as the two plan ops the graph rewrite emits
(`torch.ops.tokenreduce.hiprune_plan`, `tokenreduce::flowcut_plan`).

The file exists so the arithmetic has one home that any caller can use: the VLM methods (on the LLaVA
graph, before the projector) and benchmarks on plain ViTs (e.g. DINOv2) call the same functions. Every
input is per layer, head-averaged attention probabilities `[B, N, N]` (query rows, key columns) of a token
sequence whose first `num_prefix` tokens are not patches (CLS first, then e.g. register tokens), followed
by the `P = N - num_prefix` patches in row-major order on a `grid = (rows, cols)` patch grid. Outputs are
kept *patch* indices `[B, keep]`, ascending (index 0 = the first patch).

* HiPrune (Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision
  Encoders", 2025; official code Danielement321/HiPrune, `LLaVA/llava/model/llava_arch.py`
  `encode_images`, read, not copied). A patch's score is the attention it *receives*, averaged over heads
  and over every query (the official "global attention", CLS query included; no CLS needed). Anchors: the
  `round(keep * anchor_ratio / 5)` best patches of an object-centric middle layer; buffers: their four
  grid neighbours; registers: the best remaining patches of the deep layer until `keep` are kept.
* FlowCut (Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language
  Models", 2025; official code TungChintao/FlowCut, `flowcut/modeling_clip_flowcut.py` and
  `utils_flowcut.py`, read, not copied). Per layer, a patch's score relays through the CLS token:
  `(a_cls / sum a_cls + s / sum s) * |v|_1`, where `a_cls` is the CLS query's attention to the patch
  (head mean), `s` the CLS *value*'s softmax similarity to the patch's value (per head, unscaled, head
  mean) and `|v|_1` the L1 norm of the patch's head-averaged value; scores accumulate over layers as
  `c = decay * c + (1 - decay) * score` (official: 0.5); the best `keep` patches of the last layer's `c`.

Departures from the official code, on purpose (each method's docstring repeats them where they matter):

* HiPrune's buffers are the 4-neighbours *on the grid*: the official code adds `i - 1, i + 1, i - W, i + W`
  on the flat index and clamps to `0 .. P - 1`, so a patch on a row's edge gets the other row's end as a
  "neighbour" and a patch on the top/bottom row repeats itself; here an off-grid neighbour is no buffer.
  Anchors are capped at `keep // 5` so anchors and buffers never exceed `keep` (the official code would
  ask top-k for a negative register count).
* FlowCut's `flowcut_select` / `flowcut_plan` *select once* from the cumulative score over all patches: every
  layer's score is normalised over all patches. The progressive form (`methods/flowcut.py`,
  `progressive=True`) prunes between tower layers with the functions below, scoring the survivors as the
  official code does, but with a fixed per-layer count where the official count is entropy-adaptive
  (data-dependent).

Both plans are export-safe: top-k with constant k, one-hot comparisons instead of scatter, static shapes.
They refuse (ValueError) counts outside `1 .. P`, grids that do not hold `P` patches, and a FlowCut
without a CLS token (`num_prefix < 1`: the relay token) or with no layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

NAMESPACE = "tokenreduce"


# ------------------------------------------------------------------------------------------- shared
def head_mean_attention(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """`[B, H, N, d]` queries and keys (before scaling), a mask broadcastable to `[B, H, N, N]` (bool: True
    = attend; float: added) or None, and the logit scale -> `[B, N, N]` float32 attention probabilities
    averaged over heads (what the layer's softmax computes)."""
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else logits + bias.float()
    return logits.softmax(-1).mean(1)


def _check_attn(name: str, attn: torch.Tensor, num_prefix: int) -> int:
    if attn.dim() != 3 or attn.shape[1] != attn.shape[2]:
        raise ValueError(f"{name} must be head-averaged attention [B, N, N], got {list(attn.shape)}")
    p = attn.shape[-1] - num_prefix
    if num_prefix < 0 or p < 1:
        raise ValueError(f"{name}: {attn.shape[-1]} tokens with num_prefix={num_prefix} leave no patch")
    return p


def _check_keep(keep: int, p: int) -> None:
    if not 1 <= keep <= p:
        raise ValueError(f"keep must be in 1..{p} (the patches), got {keep}")


def kept_indices(kept: torch.Tensor, keep: int) -> torch.Tensor:
    """`[B, P]` float kept mask (1 = kept, exactly `keep` per row) -> `[B, keep]` ascending patch indices."""
    pos = torch.arange(kept.shape[-1], device=kept.device, dtype=torch.float32)
    return torch.where(kept > 0, -pos, torch.full_like(pos, float("-inf"))).topk(keep, dim=-1).indices


def one_hot_any(idx: torch.Tensor, valid: torch.Tensor, p: int) -> torch.Tensor:
    """`[B, K]` indices and `[B, K]` bool validity -> `[B, P]` bool: the valid indices (no scatter)."""
    pos = torch.arange(p, device=idx.device)
    return ((pos[None, None, :] == idx[:, :, None]) & valid[:, :, None]).any(1)


# ------------------------------------------------------------------------------------------- HiPrune
def hiprune_anchors(keep: int, anchor_ratio: float) -> int:
    """HiPrune's anchor count for `keep` kept patches: `round(keep * anchor_ratio / 5)` (each anchor brings
    up to four buffers, so anchors + buffers ~ `anchor_ratio * keep`), at most `keep // 5`."""
    return min(round(keep * anchor_ratio / 5), keep // 5)


def grid_neighbours(anchors: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`[B, A]` patch indices on a row-major `grid` -> `[B, P]` bool: the anchors and their up / down /
    left / right neighbours that lie on the grid."""
    rows, cols = grid
    r, c = anchors // cols, anchors % cols
    steps = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]
    idx = torch.cat([anchors + dr * cols + dc for dr, dc in steps], dim=1)
    valid = torch.cat([(r + dr >= 0) & (r + dr < rows) & (c + dc >= 0) & (c + dc < cols) for dr, dc in steps], dim=1)
    return one_hot_any(idx, valid, rows * cols)


def hiprune_plan_reference(attn_mid: torch.Tensor, attn_deep: torch.Tensor, rows: int, cols: int, keep: int,
                           anchors: int, num_prefix: int) -> torch.Tensor:
    """HiPrune's kept patches as a `[B, P]` float32 mask (1 = kept, exactly `keep` per row).

    Args:
        attn_mid, attn_deep: `[B, N, N]` head-averaged attention of the object (middle) and deep layer.
        rows, cols: the patch grid, `rows * cols = P = N - num_prefix`.
        keep: patches kept; anchors: anchor count (`hiprune_anchors`), `5 * anchors <= keep`.
        num_prefix: leading non-patch tokens (CLS, registers): they score and attend, but are never kept.
    """
    p = _check_attn("attn_mid", attn_mid, num_prefix)
    if _check_attn("attn_deep", attn_deep, num_prefix) != p or attn_mid.shape[0] != attn_deep.shape[0]:
        raise ValueError(f"attn_mid {list(attn_mid.shape)} and attn_deep {list(attn_deep.shape)} differ")
    if rows < 1 or cols < 1 or rows * cols != p:
        raise ValueError(f"the grid {rows} x {cols} does not hold the {p} patches")
    _check_keep(keep, p)
    if not 0 <= 5 * anchors <= keep:
        raise ValueError(f"anchors must be in 0..{keep // 5} (each brings up to 4 buffers), got {anchors}")
    mid = attn_mid.float().mean(1)[:, num_prefix:]  # attention each patch receives, mean over queries
    deep = attn_deep.float().mean(1)[:, num_prefix:]
    if anchors:
        chosen = grid_neighbours(mid.topk(anchors, dim=-1).indices, (rows, cols)).float()
    else:
        chosen = torch.zeros_like(mid)
    registers = (deep + 2.0 * chosen).topk(keep, dim=-1).indices  # probabilities <= 1: anchors/buffers first
    return one_hot_any(registers, torch.ones_like(registers, dtype=torch.bool), p).float()


def hiprune_select(attn_mid: torch.Tensor, attn_deep: torch.Tensor, grid: tuple[int, int], keep: int,
                   anchor_ratio: float = 0.1, num_prefix: int = 1) -> torch.Tensor:
    """HiPrune's kept patches: `[B, N, N]` head-averaged attention of the object layer and the deep layer,
    the `(rows, cols)` patch grid, the kept count -> `[B, keep]` ascending patch indices (0 = first patch).
    `anchor_ratio` is the paper's alpha (0.1): anchors + buffers ~ `anchor_ratio * keep`."""
    if not 0.0 <= anchor_ratio <= 1.0:
        raise ValueError(f"anchor_ratio must be in [0, 1], got {anchor_ratio}")
    kept = hiprune_plan_reference(attn_mid, attn_deep, grid[0], grid[1], keep, hiprune_anchors(keep, anchor_ratio),
                                  num_prefix)
    return kept_indices(kept, keep)


@torch.library.custom_op(f"{NAMESPACE}::hiprune_plan", mutates_args=())
def hiprune_plan(attn_mid: torch.Tensor, attn_deep: torch.Tensor, rows: int, cols: int, keep: int, anchors: int,
                 num_prefix: int) -> torch.Tensor:
    """`hiprune_plan_reference` as one graph node -> `[B, P]` float32 kept mask."""
    return hiprune_plan_reference(attn_mid, attn_deep, rows, cols, keep, anchors, num_prefix).contiguous()


@hiprune_plan.register_fake
def _(attn_mid, attn_deep, rows, cols, keep, anchors, num_prefix):
    return attn_mid.new_empty((attn_mid.shape[0], attn_mid.shape[-1] - num_prefix), dtype=torch.float32)


# ------------------------------------------------------------------------------------------- FlowCut
def flowcut_layer_scores(attn: torch.Tensor, values: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """One layer's FlowCut scores `[B, P]`: `attn [B, N, N]` head-averaged probabilities (or only the CLS
    query's row, `[B, 1, N]`), `values [B, H, N, d]` the layer's per-head value vectors (CLS at index 0).
    `(a / sum a + s / sum s) * |mean_h v|_1` with `a` the CLS query's attention to each patch and `s` the CLS
    value's softmax similarity (over all N tokens, per head, then head mean) to each patch's value."""
    _check_attn("attn", attn if attn.dim() != 3 or attn.shape[1] != 1 else attn.expand(-1, attn.shape[-1], -1),
                num_prefix)
    if num_prefix < 1:
        raise ValueError("FlowCut relays information through the CLS token (index 0): a CLS-free sequence "
                         f"(num_prefix={num_prefix}) cannot be scored")
    if values.dim() != 4 or values.shape[0] != attn.shape[0] or values.shape[2] != attn.shape[-1]:
        raise ValueError(f"values must be [B, H, N, d] with B, N of attn {list(attn.shape)}, got {list(values.shape)}")
    v = values.float()
    cls = attn.float()[:, 0, num_prefix:]
    semantic = (v[:, :, :1] @ v.transpose(-1, -2)).softmax(-1).mean(1)[:, 0, num_prefix:]  # [B, P]
    norm = v.mean(1)[:, num_prefix:].abs().sum(-1)
    return (cls / cls.sum(-1, keepdim=True) + semantic / semantic.sum(-1, keepdim=True)) * norm


def flowcut_plan_reference(attns: Sequence[torch.Tensor], values: Sequence[torch.Tensor], keep: int, decay: float,
                           num_prefix: int) -> torch.Tensor:
    """FlowCut's kept patches as a `[B, P]` float32 mask: the best `keep` patches by the cumulative score
    over the layers in order (`c = score_0`, then `c = decay * c + (1 - decay) * score_l`)."""
    if len(attns) < 1 or len(attns) != len(values):
        raise ValueError(f"FlowCut needs one attention map and one value tensor per layer, got {len(attns)} "
                         f"and {len(values)}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    cum = flowcut_layer_scores(attns[0], values[0], num_prefix)
    for attn, v in zip(attns[1:], values[1:]):
        cum = decay * cum + (1.0 - decay) * flowcut_layer_scores(attn, v, num_prefix)
    _check_keep(keep, cum.shape[-1])
    top = cum.topk(keep, dim=-1).indices
    return one_hot_any(top, torch.ones_like(top, dtype=torch.bool), cum.shape[-1]).float()


def flowcut_select(attns: Sequence[torch.Tensor], keep: int, values: Sequence[torch.Tensor], decay: float = 0.5,
                   num_prefix: int = 1) -> torch.Tensor:
    """FlowCut's kept patches: per layer (in order) head-averaged attention `[B, N, N]` (or its CLS row
    `[B, 1, N]`) and per-head values `[B, H, N, d]` (CLS at index 0), the kept count -> `[B, keep]` ascending
    patch indices (0 = first patch). `decay` weighs the earlier layers' cumulative score (official: 0.5)."""
    return kept_indices(flowcut_plan_reference(attns, values, keep, decay, num_prefix), keep)


# FlowCut's progressive pruning inside the tower (`methods/flowcut.py`, `progressive=True`): plain tensor functions
# the graph rewrite emits between vision layers; static shapes (top-k with a constant k, gathers, one-hot
# comparisons), so the pruned prefill exports.
def flowcut_accumulate(cum: torch.Tensor, scores: torch.Tensor, decay: float) -> torch.Tensor:
    """`decay * cum + (1 - decay) * scores`: the running FlowCut score after one more layer."""
    return decay * cum + (1.0 - decay) * scores


def flowcut_prune_index(cum: torch.Tensor, keep: int) -> torch.Tensor:
    """`[B, n]` running scores of the surviving patches -> the `keep` best, ascending `[B, keep]` (the survivors
    keep their order, as the official code's sorted top-k)."""
    _check_keep(keep, cum.shape[-1])
    return cum.topk(keep, dim=-1).indices.sort(dim=-1).values


def patch_origins(hidden: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """`[B, num_prefix + P, C]` tower tokens -> `[B, P]` int64: each patch's original index (0..P-1)."""
    p = hidden.shape[1] - num_prefix
    return torch.arange(p, device=hidden.device).unsqueeze(0).expand(hidden.shape[0], p)


def keep_patches(hidden: torch.Tensor, index: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """`[B, num_prefix + n, C]` tokens and `[B, k]` patch indices -> `[B, num_prefix + k, C]`: the prefix tokens
    (CLS) and the indexed patches."""
    patches = hidden[:, num_prefix:].gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return torch.cat([hidden[:, :num_prefix], patches], 1)


def place_patches(features: torch.Tensor, origins: torch.Tensor, p: int, num_prefix: int = 1) -> torch.Tensor:
    """`[B, num_prefix + k, C]` features of `k` surviving patches whose original indices are `origins [B, k]` ->
    `[B, num_prefix + p, C]` with each survivor at its original index and zeros at the pruned ones (no scatter:
    a one-hot match per original index)."""
    hit = origins.unsqueeze(1) == torch.arange(p, device=origins.device).view(1, p, 1)  # [B, p, k]
    slot = hit.to(torch.int64).argmax(-1)  # [B, p]: the survivor at each index (0 where none)
    patches = features[:, num_prefix:].gather(1, slot.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    patches = torch.where(hit.any(-1, keepdim=True), patches, torch.zeros_like(patches))
    return torch.cat([features[:, :num_prefix], patches], 1)


def origins_mask(origins: torch.Tensor, p: int) -> torch.Tensor:
    """`[B, k]` original patch indices -> `[B, p]` float32 kept mask (1 at each, as the plan ops give)."""
    return one_hot_any(origins, torch.ones_like(origins, dtype=torch.bool), p).float()


@torch.library.custom_op(f"{NAMESPACE}::flowcut_plan", mutates_args=())
def flowcut_plan(attns: list[torch.Tensor], values: list[torch.Tensor], keep: int, decay: float,
                 num_prefix: int) -> torch.Tensor:
    """`flowcut_plan_reference` as one graph node -> `[B, P]` float32 kept mask."""
    return flowcut_plan_reference(attns, values, keep, decay, num_prefix).contiguous()


@flowcut_plan.register_fake
def _(attns, values, keep, decay, num_prefix):
    return attns[0].new_empty((attns[0].shape[0], attns[0].shape[-1] - num_prefix), dtype=torch.float32)


REFERENCES: dict[Any, Callable[..., Any]] = {
    torch.ops.tokenreduce.hiprune_plan.default: hiprune_plan_reference,
    torch.ops.tokenreduce.flowcut_plan.default: flowcut_plan_reference}
