"""The selection op of GlobalCom2 (`torch.ops.tokenreduce.globalcom2_scores`) for AnyRes VLMs (LLaVA-NeXT).

An AnyRes image reaches the LLM as a thumbnail (the whole image at the vision tower's resolution, `P`
patches) followed by the crops of a grid (row-major, unpadded, one `image_newline` token after each row of
patches). GlobalCom2 (`methods/globalcom2.py`) keeps, within a fixed total, more tokens of the crops whose
region the thumbnail finds important, and within each crop the tokens both the crop's own CLS attention and
the thumbnail's (interpolated to the crop's place) rank highest.

Which token comes from which vision patch is static for given `image_sizes`, so it enters as data
(`methods.globalcom2.anyres_side_inputs` builds it with the model's own packing code):

* `layout [B, N, 4]` long: per token `(group, source, region, thumb_base)`; `group` is 0 for a thumbnail
  token, `c >= 1` for a token of crop `c`, -1 for a newline token, -2 for a token that is not an image
  token; `source` is the token's flat index into the vision patches `[V * P]`; `region` is, for a thumbnail
  token, the crop (1-based) whose part of the image it covers, else 0; `thumb_base` is the flat index of
  the row's thumbnail patch 0;
* `guide [B, N, P]` float: for a crop token, the weights of the thumbnail patches in the bilinear
  interpolation (align_corners=False) of the thumbnail's grid to the unpadded crop grid at its place.

The op is written export-safe: no data-dependent shapes, comparisons as `[B, N, N]` matrices (ranks,
groups), one constant `keep`. It refuses (ValueError) keep counts outside the span.
"""

from __future__ import annotations

import torch

NAMESPACE = "tokenreduce"
EPS = 1e-12  # F.normalize's eps (the official code L2-normalises the crop scores with it)


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """`[V, P]`: each image's CLS query attention over its patches (probabilities over CLS + patches,
    averaged over heads, the CLS column dropped). q, k: `[V, H, 1 + P, d]`."""
    logits = (q[:, :, :1].float() @ k.float().transpose(-1, -2)) * scale
    return logits.softmax(-1).mean(1)[:, 0, 1:]


def globalcom2_scores_reference(q: torch.Tensor, k: torch.Tensor, scale: float, layout: torch.Tensor,
                                guide: torch.Tensor, droppable: torch.Tensor, keep: int, num_droppable: int,
                                keep_ratio: float, temperature: float) -> torch.Tensor:
    """`[B, N]` float32: > 0 for exactly `keep` droppable tokens (their score is `keep - order`), 0 elsewhere.

    1. Newline tokens in the span are taken first (the official code keeps every one).
    2. Crop budgets: the thumbnail's CLS attention summed over the patches covering each crop's region,
       `softmax((sum - max) / temperature)` over the crops, `scale_c = min(1, keep_ratio * (1 + sm_c -
       mean(sm)))`; the thumbnail's scale is `keep_ratio`. Group weights `w = tokens * scale`.
    3. Token scores: thumbnail tokens by their CLS attention; crop tokens by `l2norm(own CLS attention over
       the crop) + l2norm(interpolated thumbnail attention over the crop)`. Each token's rank in its
       group (higher score first, ties to the earlier token).
    4. The remaining budget is apportioned among the groups by the Sainte-Lague rule on the weights: the
       smallest `(rank + 0.5) / w` win (ties to the earlier token), so a group keeps its best tokens and
       the counts follow the weights, never more than a group has.
    """
    if not 1 <= keep <= num_droppable:
        raise ValueError(f"keep must be in 1..{num_droppable}, got {keep}")
    b, n = droppable.shape
    cls = cls_attention(q, k, scale).reshape(-1)  # [V * P]
    p = guide.shape[-1]
    group, source, region, base = layout.unbind(-1)
    own = cls[source.clamp(0, cls.numel() - 1)]  # [B, N]
    thumb = cls[(base[:, :1] + torch.arange(p, device=layout.device)).clamp(0, cls.numel() - 1)]  # [B, P]
    glob = (guide.float() @ thumb[:, :, None])[..., 0]
    is_thumb, is_crop = group == 0, group >= 1
    same = ((group[:, :, None] == group[:, None, :]) & (group >= 0)[:, :, None]).float()  # [B, N, N]
    size = same.sum(-1).clamp_min(1.0)

    def l2(v: torch.Tensor) -> torch.Tensor:  # each crop token over its crop's tokens
        norm = (same @ (v * is_crop)[..., None].pow(2))[..., 0].sqrt()
        return v / norm.clamp_min(EPS)

    score = torch.where(is_crop, l2(own) + l2(glob), own)
    # crop budgets from the thumbnail: region sums, softmax over the crops, scales clipped at 1
    covers = ((region[:, None, :] == group[:, :, None]) & is_thumb[:, None, :]).float()  # [B, crop token, thumb token]
    sums = (covers @ own[..., None])[..., 0]
    top = torch.where(is_crop, sums, torch.full_like(sums, -torch.inf)).amax(-1, keepdim=True)
    e = torch.where(is_crop, ((sums - top) / temperature).exp(), torch.zeros_like(sums))
    per_crop = torch.where(is_crop, 1.0 / size, torch.zeros_like(size))  # summing over a crop's tokens counts it once
    sm = e / ((e * per_crop).sum(-1, keepdim=True) + 1e-8)
    crops = per_crop.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (sm * per_crop).sum(-1, keepdim=True) / crops
    scale_g = torch.where(is_crop, (keep_ratio * (1 + sm - mean)).clamp(max=1.0), torch.full_like(sm, keep_ratio))
    weight = size * scale_g
    # rank in group: higher score first, ties to the earlier token
    idx = torch.arange(n, device=layout.device)
    earlier = idx[None, :] < idx[:, None]  # [t, u]: u before t
    better = (score[:, None, :] > score[:, :, None]) | ((score[:, None, :] == score[:, :, None]) & earlier)
    rank = (better.float() * same).sum(-1)
    key = torch.where(group >= 0, (rank + 0.5) / weight.clamp_min(EPS), torch.full_like(rank, torch.inf))
    key = torch.where(droppable & (group == -1), torch.full_like(key, -1.0), key)
    key = torch.where(droppable, key, torch.full_like(key, torch.inf))
    first = (key[:, None, :] < key[:, :, None]) | ((key[:, None, :] == key[:, :, None]) & earlier)
    order = (first & droppable[:, None, :]).float().sum(-1)
    chosen = droppable & (order < keep)
    return torch.where(chosen, keep - order, torch.zeros_like(order)).float()


@torch.library.custom_op(f"{NAMESPACE}::globalcom2_scores", mutates_args=())
def globalcom2_scores(q: torch.Tensor, k: torch.Tensor, scale: float, layout: torch.Tensor, guide: torch.Tensor,
                      droppable: torch.Tensor, keep: int, num_droppable: int, keep_ratio: float,
                      temperature: float) -> torch.Tensor:
    """`globalcom2_scores_reference` as one graph node -> `[B, N]` float32."""
    return globalcom2_scores_reference(q, k, scale, layout, guide, droppable, keep, num_droppable, keep_ratio,
                                       temperature).contiguous()


@globalcom2_scores.register_fake
def _(q, k, scale, layout, guide, droppable, keep, num_droppable, keep_ratio, temperature):
    return droppable.new_empty(droppable.shape, dtype=torch.float32)


REFERENCES = {torch.ops.tokenreduce.globalcom2_scores.default: globalcom2_scores_reference}
