"""Independent reference for a rotary encoder under ToMe: timm EVA-02, written out by hand.

A second implementation, separate from the compiler (never imported here) and from `tests/reference.py`
(whose ToMe this follows in style, not in code): the EVA-02 forward pass written from its submodules
(patch embedding, Linear / LayerNorm layers, the SwiGLU MLP), with attention spelled out as
`softmax(q @ k^T * scale + log(size)) @ v`, and ToMe's bipartite soft matching written from the paper
(Bolya et al., ICLR 2023; `docs/methods.md`, "ToMe", steps 1-7, one protected token).

What it exists to check is rotary positions under merging (`docs/methods.md`, "Side inputs under
reduction"): every slot carries the original position of its representative (`pos [B, N]`; ToMe's
representative of a merged pair is the B token it merged into, and unmerged tokens keep their own). EVA-02
rotates only the patch tokens (`q[:, :, 1:]`, the CLS token is not rotated), so a slot `s >= 1` is
rotated with row `pos[:, s] - 1` of the model's table. The rotation itself is written here: interleaved
pairs (`(x0, x1) -> (-x1, x0)`) or, for `rotate_half` models, the two halves (`(x1, x2) -> (-x2, x1)`).

Everything runs under `torch.no_grad()` in eval mode (dropout and drop-path are identities).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rotate(x: Tensor, half: bool) -> Tensor:
    if half:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rotary(x: Tensor, table: Tensor, rows: Tensor, half: bool) -> Tensor:
    """x `[B, H, M, d]` rotated by the table's rows `rows [B, M]` (table `[N_patches, 2d]` = sin | cos)."""
    sin, cos = table.chunk(2, dim=-1)
    sin, cos = sin[rows][:, None], cos[rows][:, None]  # [B, 1, M, d]
    return x * cos + rotate(x, half) * sin


def tome_step(x: Tensor, size: Tensor, pos: Tensor, keys: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """One ToMe merge with the CLS token (index 0) protected. keys `[B, H, N, d]` as fed to attention.
    Returns x', size', pos' (`pos`: each slot's representative's original position)."""
    metric = keys.mean(dim=1)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, 0::2] @ metric[:, 1::2].transpose(-2, -1)  # A rows, B columns
    scores[:, 0, :] = float("-inf")  # CLS (token 0, an A token) never merges
    node_max, node_idx = scores.max(dim=-1)
    edges = node_max.argsort(dim=-1, descending=True)
    src, unm = edges[:, :r], edges[:, r:].sort(dim=-1).values
    dst = node_idx.gather(-1, src)
    c = x.shape[-1]
    xa, xb, sa, sb = x[:, 0::2], x[:, 1::2], size[:, 0::2], size[:, 1::2]
    wx = (xb * sb[..., None]).scatter_add(1, dst[..., None].expand(-1, -1, c),
                                          (xa * sa[..., None]).gather(1, src[..., None].expand(-1, -1, c)))
    w = sb.scatter_add(1, dst, sa.gather(1, src))
    x_new = torch.cat([xa.gather(1, unm[..., None].expand(-1, -1, c)), wx / w[..., None]], dim=1)
    size_new = torch.cat([sa.gather(1, unm), w], dim=1)
    pos_new = torch.cat([pos[:, 0::2].gather(1, unm), pos[:, 1::2]], dim=1)
    return x_new, size_new, pos_new


def _qkv(attn: nn.Module, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    bsz, n, _ = h.shape
    heads = attn.num_heads
    if attn.qkv is not None:
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        if bias is not None and not attn.qkv_bias_separate:
            qkv = F.linear(h, attn.qkv.weight, bias)
        else:
            qkv = attn.qkv(h) + (bias if bias is not None else 0)
        q, k, v = qkv.reshape(bsz, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    else:
        q, k, v = (proj(h).reshape(bsz, n, heads, -1).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj,
                                                                                  attn.v_proj))
    return attn.q_norm(q), attn.k_norm(k), v


@torch.no_grad()
def eva_features_tome(model: nn.Module, images: Tensor, r: Sequence[int]) -> Tensor:
    """`model.forward_features(images)` of a timm EVA-02 (one CLS token, rotary on the patch tokens) with
    ToMe merging `r[i]` tokens between block i's attention residual and its MLP."""
    assert model.num_prefix_tokens == 1 and model.cls_token is not None, "the reference covers one CLS token"
    x = model.patch_embed(images)
    bsz = x.shape[0]
    x = torch.cat([model.cls_token.expand(bsz, -1, -1), x], dim=1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    x = model.norm_pre(x)
    table = model.rope.get_embed()  # [N_patches, 2 * head_dim]: sin | cos
    n = x.shape[1]
    size = x.new_ones(bsz, n)
    pos = torch.arange(n).expand(bsz, n)
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        q, k, v = _qkv(attn, blk.norm1(x))
        rows = pos[:, 1:] - 1  # table row of each rotated (patch) slot
        half = bool(getattr(attn, "rotate_half", False))
        q = torch.cat([q[:, :, :1], apply_rotary(q[:, :, 1:], table, rows, half)], dim=2)
        k = torch.cat([k[:, :, :1], apply_rotary(k[:, :, 1:], table, rows, half)], dim=2)
        logits = (q @ k.transpose(-2, -1)) * attn.scale + size.log()[:, None, None, :]
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(bsz, x.shape[1], -1)
        out = attn.proj(attn.norm(out))
        x = x + (blk.gamma_1 * out if blk.gamma_1 is not None else out)
        if i < len(r) and r[i] > 0:
            x, size, pos = tome_step(x, size, pos, k, r[i])
        mlp = blk.mlp(blk.norm2(x))
        x = x + (blk.gamma_2 * mlp if blk.gamma_2 is not None else mlp)
    return model.norm(x)
