"""Independent eager reference implementations of ToMe and EViT for the test-suite.

This module is a deliberately separate, second implementation of the token-reduction arithmetic,
written directly from the papers and from ``docs/methods.md`` -- *not* from the ``tokenreduce``
compiler (which it never imports):

* ToMe: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (bipartite soft matching,
  size-weighted merging, proportional attention).
* EViT: Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
  Reorganizations", ICLR 2022 (CLS-attention top-k keep, inattentive-token fusion).

Each ``*_forward`` function re-writes the model's forward pass by hand from its submodules (embedding,
Linear and LayerNorm layers, MLPs); attention is computed manually as
``softmax(q @ k^T * scale + bias) @ v`` (the semantics of ``F.scaled_dot_product_attention`` with an
additive float ``attn_mask``) so that the reduction can be placed between the attention residual and
the MLP and the ``log(size)`` bias can be added.  Everything runs under ``torch.no_grad()`` with the
model in eval mode (dropout / drop-path are identities and are therefore omitted).

Token state carried through the blocks: ``size [B, N]`` (original tokens per slot), ``valid [B, N]``
(key validity; ``None`` means all valid) and ``source [B, N0]`` (original position -> current slot,
``-1`` for a token EViT dropped without fusion; unmerge gives such positions zeros).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------
# Primitives
# ----------------------------------------------------------------------------------------------------
def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """Plain attention, q/k/v [B, H, N, d] -> [B, N, H*d] (same math as SDPA with a float mask)."""
    logits = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        logits = logits + bias
    out = logits.softmax(dim=-1) @ v
    B, H, N, d = out.shape
    return out.transpose(1, 2).reshape(B, N, H * d)


def _attn_bias(size: Tensor, valid: Tensor | None, prop_attn: bool) -> Tensor | None:
    """Additive key bias ``where(valid, log(size) [if prop_attn else 0], -inf)`` as [B, 1, 1, N]."""
    if not prop_attn and valid is None:
        return None
    bias = size.log() if prop_attn else torch.zeros_like(size)
    if valid is not None:
        bias = bias.masked_fill(~valid, NEG_INF)
    return bias[:, None, None, :]


def cls_row_attention(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """q, k [B, H, N, d] -> head-averaged attention probabilities of the CLS row (token 0), [B, N]."""
    logits = (q[:, :, 0:1] @ k.transpose(-2, -1)) * scale  # [B, H, 1, N]
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def _gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, N, C], idx [B, M] -> [B, M, C]."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _update_source(source: Tensor | None, assign: Tensor) -> Tensor | None:
    """Compose the original->slot map with this step's old-slot->new-slot map (``-1`` = dropped)."""
    if source is None:
        return None
    new = assign.gather(1, source.clamp(min=0))
    return torch.where(source >= 0, new, torch.full_like(new, -1))


def unmerge_tokens(x: Tensor, source: Tensor) -> Tensor:
    """Restore the original token count: position i gets ``x[:, source[:, i]]`` (zeros if dropped)."""
    out = _gather_tokens(x, source.clamp(min=0))
    return out.masked_fill((source < 0)[..., None], 0.0)


# ----------------------------------------------------------------------------------------------------
# ToMe (docs/methods.md, "ToMe", steps 1-7)
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def tome_match(metric: Tensor, r: int, num_protected: int,
               valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """metric [B,N,d] (already head-averaged keys, NOT yet normalised). Returns (src_idx, dst_idx,
    unm_idx) per docs/methods.md steps 1-5 (indices into the A / B halves)."""
    N, P = metric.shape[1], num_protected
    if r < 0 or r > (N - P) // 2:
        raise ValueError(f"ToMe r={r} is invalid for {N} tokens with {P} protected: "
                         f"the largest valid r is (N - P) // 2 = {(N - P) // 2}")
    metric = metric / metric.norm(dim=-1, keepdim=True)                    # step 1
    scores = metric[:, 0::2] @ metric[:, 1::2].transpose(-2, -1)          # step 2: A @ B^T
    if valid is not None:                                                  # step 3: padding
        va, vb = valid[:, 0::2, None], valid[:, None, 1::2]
        scores = scores.masked_fill(~va & vb, -2.0).masked_fill(va & ~vb, -3.0)
    for i in range(P):                                                     # step 4: protected
        if i % 2 == 0:
            scores[:, i // 2, :] = NEG_INF
        else:
            scores[:, :, i // 2] = NEG_INF
    node_max, node_idx = scores.max(dim=-1)                                # step 5
    row = torch.arange(node_max.shape[-1], dtype=node_max.dtype)
    node_max = torch.where(node_max < -1.5, node_max - 1e-6 * row, node_max)  # sentinel ties by index
    edge_idx = node_max.argsort(dim=-1, descending=True)
    src_idx, unm_idx = edge_idx[:, :r], edge_idx[:, r:]
    dst_idx = node_idx.gather(-1, src_idx)
    if P > 0:
        unm_idx = unm_idx.sort(dim=-1).values
    return src_idx, dst_idx, unm_idx


@torch.no_grad()
def tome_merge(x: Tensor, size: Tensor, r: int, metric: Tensor, num_protected: int,
               valid: Tensor | None = None, source: Tensor | None = None
               ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Returns x' [B,N-r,C], size' [B,N-r], valid' (or None), source' (or None). Ordering per step 6;
    size-weighted average per step 7. ``source`` [B,N0] maps each original position to its current
    slot; the updated map is returned."""
    src_idx, dst_idx, unm_idx = tome_match(metric, r, num_protected, valid)
    B, N, _ = x.shape
    P = num_protected
    n_b = N // 2
    pa, pb = (P + 1) // 2, P // 2                     # protected tokens in A / in B
    # Original (pre-merge) positions: A token a is 2a, B token b is 2b+1.
    a_pos = 2 * unm_idx                                                   # kept A tokens
    b_pos = (2 * torch.arange(n_b, device=x.device) + 1).expand(B, n_b)  # all B tokens
    # Step 6: protected tokens in original order, then remaining unm, then remaining B.
    # (For P = 0 this is cat([unm, dst]); the protected A tokens are unm[:, :pa] since unm is sorted.)
    protected = [a_pos[:, i // 2] if i % 2 == 0 else b_pos[:, i // 2] for i in range(P)]
    order = torch.cat([p[:, None] for p in protected] + [a_pos[:, pa:], b_pos[:, pb:]], dim=1)
    n_out = N - r
    # assign[b, old] = new slot: representatives by `order`, merged A tokens to their B token's slot.
    assign = torch.full((B, N), -1, dtype=torch.long, device=x.device)
    assign.scatter_(1, order, torch.arange(n_out, device=x.device).expand(B, n_out))
    assign.scatter_(1, 2 * src_idx, assign.gather(1, 2 * dst_idx + 1))
    # Step 7: size-weighted average, x' = sum(w * x) / sum(w), size' = sum(size) over w > 0, where
    # w = size, and 0 for a source merged across padding (step 3).
    w = size.clone()
    if valid is not None:
        crossed = valid.gather(1, 2 * src_idx) != valid.gather(1, 2 * dst_idx + 1)
        w.scatter_(1, 2 * src_idx, w.gather(1, 2 * src_idx).masked_fill(crossed, 0.0))
    new_size = size.new_zeros(B, n_out).scatter_add_(1, assign, size * (w > 0))
    wsum = size.new_zeros(B, n_out).scatter_add_(1, assign, w)
    weighted = x.new_zeros(B, n_out, x.shape[-1]).scatter_add_(
        1, assign[..., None].expand_as(x), x * w[..., None])
    new_x = weighted / wsum[..., None]
    new_valid = valid.gather(1, order) if valid is not None else None
    return new_x, new_size, new_valid, _update_source(source, assign)


# ----------------------------------------------------------------------------------------------------
# EViT (docs/methods.md, "EViT", steps 1-5)
# ----------------------------------------------------------------------------------------------------
def _check_keep_ratio(keep_ratio: float | None) -> float:
    if keep_ratio is None or not (0.0 < keep_ratio <= 1.0):
        raise ValueError(f"EViT keep_ratio must be in (0, 1], got {keep_ratio}")
    return float(keep_ratio)


@torch.no_grad()
def evit_select(x: Tensor, size: Tensor, cls_attn: Tensor, keep_ratio: float, num_protected: int,
                fuse: bool = True, valid: Tensor | None = None, source: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """cls_attn [B,N] (head-averaged CLS-row attention probabilities). Keeps the top
    ``ceil(keep_ratio * (N - P))`` candidates and (``fuse``) fuses the rest into one token.
    Returns (x', size', valid', source') like :func:`tome_merge`. ``keep_ratio`` keeping every
    candidate is a no-op (inputs returned unchanged, no reordering)."""
    keep_ratio = _check_keep_ratio(keep_ratio)
    B, N, _ = x.shape
    P = num_protected
    if P < 1:
        raise ValueError("EViT needs a CLS token (num_protected >= 1)")
    k = math.ceil(keep_ratio * (N - P))
    if k < 1:
        raise ValueError(f"EViT keeps k={k} tokens; need k >= 1 (N={N}, P={P})")
    if k >= N - P:
        return x, size, valid, source                        # rho = 1: removes nothing
    scores = cls_attn[:, P:]                                  # step 2: candidates i >= P
    if valid is not None:
        pad_rank = -1.0 - 1e-6 * torch.arange(scores.shape[1], dtype=scores.dtype)  # below any probability,
        scores = torch.where(valid[:, P:], scores, pad_rank)  # ordered by index: never outranks a real token
    keep = scores.topk(k, dim=-1, sorted=True).indices + P    # step 3: descending order
    order = torch.cat([torch.arange(P, device=x.device).expand(B, P), keep], dim=1)
    kept = torch.zeros(B, N, dtype=torch.bool, device=x.device).scatter_(1, order, True)
    pruned = ~kept
    n_out = P + k + (1 if fuse else 0)
    assign = torch.full((B, N), -1, dtype=torch.long, device=x.device)
    assign.scatter_(1, order, torch.arange(P + k, device=x.device).expand(B, P + k))
    new_x, new_size = _gather_tokens(x, order), size.gather(1, order)
    new_valid = valid.gather(1, order) if valid is not None else None
    if fuse:                                                  # step 4: normalised weighted average
        w = cls_attn * pruned                                 # a_j on pruned tokens, 0 elsewhere
        w_sum = w.sum(dim=1, keepdim=True)
        fused = (w[..., None] * x).sum(dim=1) / w_sum.clamp_min(torch.finfo(x.dtype).tiny)
        fused = torch.where(w_sum > 0, fused, torch.zeros_like(fused))
        fused_size = (size * pruned).sum(dim=1, keepdim=True)
        new_x = torch.cat([new_x, fused[:, None]], dim=1)    # step 5: fused token last
        new_size = torch.cat([new_size, fused_size], dim=1)
        if new_valid is not None:                             # validity of highest-weight source
            top = cls_attn.masked_fill(~pruned, NEG_INF).argmax(dim=1, keepdim=True)
            new_valid = torch.cat([new_valid, valid.gather(1, top)], dim=1)
        assign = torch.where(pruned, torch.full_like(assign, n_out - 1), assign)
    return new_x, new_size, new_valid, _update_source(source, assign)


# ----------------------------------------------------------------------------------------------------
# Generic block driver
# ----------------------------------------------------------------------------------------------------
@dataclass
class _Options:
    tome_r: list[int]
    evit_layers: set[int]
    keep_ratio: float
    fuse: bool
    prop_attn: bool
    num_protected: int


def _make_options(depth: int, tome_r: Sequence[int] | None, evit_layers: Sequence[int] | None,
                  keep_ratio: float | None, fuse: bool, prop_attn: bool | None,
                  num_protected: int) -> _Options:
    r = [int(v) for v in (tome_r or [])]
    if len(r) > depth:
        raise ValueError(f"tome_r has {len(r)} entries but the model has {depth} blocks")
    r += [0] * (depth - len(r))                 # shorter schedules are padded with zeros
    if any(v < 0 for v in r):
        raise ValueError(f"tome_r entries must be >= 0, got {r}")
    layers = set(int(i) for i in (evit_layers or []))
    if layers:
        keep_ratio = _check_keep_ratio(keep_ratio)
        if not all(0 <= i < depth for i in layers):
            raise ValueError(f"evit_layers {sorted(layers)} out of range for {depth} blocks")
        if any(r[i] > 0 for i in layers):
            raise ValueError("ToMe and EViT on the same block are not supported by the reference")
    if prop_attn is None:
        prop_attn = tome_r is not None          # on for ToMe, off for EViT
    return _Options(r, layers, keep_ratio or 1.0, fuse, bool(prop_attn), num_protected)


# attn_half(layer, x, bias) -> (h, q, k, scale): h is the hidden state after the attention residual
# (post-LN: after norm1), q/k [B,H,N,d] as fed to attention.  mlp_half(layer, h) -> block output.
AttnHalf = Callable[[nn.Module, Tensor, Tensor | None], tuple[Tensor, Tensor, Tensor, float]]
MlpHalf = Callable[[nn.Module, Tensor], Tensor]


def _run_blocks(x: Tensor, layers: Sequence[nn.Module], attn_half: AttnHalf, mlp_half: MlpHalf,
                opt: _Options, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """Run all blocks, reducing between attention and MLP. Returns (x, source)."""
    B, N, _ = x.shape
    size = x.new_ones(B, N)
    source = torch.arange(N, device=x.device).expand(B, N).clone()
    P = opt.num_protected
    for i, layer in enumerate(layers):
        bias = _attn_bias(size, valid, opt.prop_attn)
        h, q, k, scale = attn_half(layer, x, bias)
        if opt.tome_r[i] > 0:
            metric = k.mean(dim=1)              # keys as fed to attention, averaged over heads
            h, size, valid, source = tome_merge(h, size, opt.tome_r[i], metric, P, valid, source)
        if i in opt.evit_layers:
            cls_attn = cls_row_attention(q, k, scale, bias)  # same scale and bias as the block
            h, size, valid, source = evit_select(h, size, cls_attn, opt.keep_ratio, P,
                                                 opt.fuse, valid, source)
        x = mlp_half(layer, h)
    return x, source


def _split_heads(t: Tensor, heads: int, head_dim: int) -> Tensor:
    B, N, _ = t.shape
    return t.view(B, N, heads, head_dim).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------
# timm VisionTransformer / DeiT (pre-LN)
# ----------------------------------------------------------------------------------------------------
def _timm_attn_half(blk: nn.Module, x: Tensor, bias: Tensor | None
                    ) -> tuple[Tensor, Tensor, Tensor, float]:
    attn = blk.attn
    B, N, C = x.shape
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", C // heads)
    xn = blk.norm1(x)
    qkv = attn.qkv(xn).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = attn.norm(_attend(q, k, v, attn.scale, bias))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(xn).sigmoid()
    return x + blk.ls1(attn.proj(out)), q, k, attn.scale


def _timm_mlp_half(blk: nn.Module, h: Tensor) -> Tensor:
    return h + blk.ls2(blk.mlp(blk.norm2(h)))


def _timm_head(model: nn.Module, x: Tensor) -> Tensor:
    """timm's forward_head, re-written: pool -> fc_norm -> head_drop -> head (distilled: average)."""
    if getattr(model, "dist_token", None) is not None and hasattr(model, "head_dist"):
        return (model.head(model.head_drop(x[:, 0])) + model.head_dist(model.head_drop(x[:, 1]))) / 2
    if getattr(model, "attn_pool", None) is not None:
        raise NotImplementedError("attention-pool heads are not covered by the reference")
    pool = model.global_pool
    if pool == "token":
        x = x[:, 0]
    elif pool:
        if not getattr(model, "pool_include_prefix", False):
            x = x[:, model.num_prefix_tokens:]
        if pool == "avg":
            x = x.mean(dim=1)                     # plain mean, as timm (not size-weighted)
        elif pool == "avgmax":
            x = 0.5 * (x.amax(dim=1) + x.mean(dim=1))
        elif pool == "max":
            x = x.amax(dim=1)
        else:
            raise NotImplementedError(f"global_pool={pool!r}")
    return model.head(model.head_drop(model.fc_norm(x)))


@torch.no_grad()
def timm_vit_forward(model: nn.Module, x: Tensor, *, tome_r: Sequence[int] | None = None,
                     evit_layers: Sequence[int] | None = None, keep_ratio: float | None = None,
                     fuse: bool = True, prop_attn: bool | None = None, unmerge: bool = False,
                     num_protected: int | None = None) -> Tensor:
    """timm VisionTransformer (incl. distilled DeiT). Returns logits, or with ``unmerge=True`` the
    final normalised tokens ``model.norm(x)`` restored to the original token count."""
    model.eval()
    P = model.num_prefix_tokens if num_protected is None else num_protected
    opt = _make_options(len(model.blocks), tome_r, evit_layers, keep_ratio, fuse, prop_attn, P)
    x = model.patch_embed(x)
    x = model._pos_embed(x)          # prefix tokens (cls / dist / reg) + position embedding
    x = model.norm_pre(model.patch_drop(x))
    x, source = _run_blocks(x, list(model.blocks), _timm_attn_half, _timm_mlp_half, opt, None)
    x = model.norm(x)
    return unmerge_tokens(x, source) if unmerge else _timm_head(model, x)


# ----------------------------------------------------------------------------------------------------
# transformers ViT (pre-LN)
# ----------------------------------------------------------------------------------------------------
def _hf_vit_attn_half(layer: nn.Module, x: Tensor, bias: Tensor | None
                      ) -> tuple[Tensor, Tensor, Tensor, float]:
    attn = layer.attention                      # transformers 5.x: q_proj / k_proj / v_proj / o_proj
    heads, head_dim = attn.num_attention_heads, attn.head_dim
    xn = layer.layernorm_before(x)
    q = _split_heads(attn.q_proj(xn), heads, head_dim)
    k = _split_heads(attn.k_proj(xn), heads, head_dim)
    v = _split_heads(attn.v_proj(xn), heads, head_dim)
    scale = float(getattr(attn, "scaling", head_dim ** -0.5))
    return x + attn.o_proj(_attend(q, k, v, scale, bias)), q, k, scale


def _hf_vit_mlp_half(layer: nn.Module, h: Tensor) -> Tensor:
    return h + layer.mlp(layer.layernorm_after(h))


@torch.no_grad()
def hf_vit_forward(model: nn.Module, pixel_values: Tensor, *, tome_r: Sequence[int] | None = None,
                   evit_layers: Sequence[int] | None = None, keep_ratio: float | None = None,
                   fuse: bool = True, prop_attn: bool | None = None, unmerge: bool = False,
                   num_protected: int | None = None) -> Tensor:
    """transformers ViTModel / ViTForImageClassification. Returns logits (classifier on token 0) or
    ``last_hidden_state`` for ViTModel; with ``unmerge=True`` the final layernormed tokens restored to
    the original count."""
    model.eval()
    vit = getattr(model, "vit", model)
    layers = list(vit.layers if hasattr(vit, "layers") else vit.encoder.layer)
    P = 1 if num_protected is None else num_protected
    opt = _make_options(len(layers), tome_r, evit_layers, keep_ratio, fuse, prop_attn, P)
    x = vit.embeddings(pixel_values)
    x, source = _run_blocks(x, layers, _hf_vit_attn_half, _hf_vit_mlp_half, opt, None)
    x = vit.layernorm(x)
    if unmerge:
        return unmerge_tokens(x, source)
    return model.classifier(x[:, 0]) if hasattr(model, "classifier") else x


# ----------------------------------------------------------------------------------------------------
# transformers BERT (post-LN, padded batches)
# ----------------------------------------------------------------------------------------------------
def _bert_attn_half(layer: nn.Module, x: Tensor, bias: Tensor | None
                    ) -> tuple[Tensor, Tensor, Tensor, float]:
    sa, so = layer.attention.self, layer.attention.output
    heads, head_dim = sa.num_attention_heads, sa.attention_head_size
    q = _split_heads(sa.query(x), heads, head_dim)
    k = _split_heads(sa.key(x), heads, head_dim)
    v = _split_heads(sa.value(x), heads, head_dim)
    scale = float(getattr(sa, "scaling", head_dim ** -0.5))
    h = so.LayerNorm(x + so.dense(_attend(q, k, v, scale, bias)))  # h = norm1(x + attn(x))
    return h, q, k, scale


def _bert_mlp_half(layer: nn.Module, h: Tensor) -> Tensor:
    ffn = layer.output.dense(layer.intermediate(h))
    return layer.output.LayerNorm(h + ffn)                          # out = norm2(h + ffn(h))


@torch.no_grad()
def hf_bert_forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, *,
                    tome_r: Sequence[int] | None = None,
                    evit_layers: Sequence[int] | None = None, keep_ratio: float | None = None,
                    fuse: bool = True, prop_attn: bool | None = None, unmerge: bool = False,
                    num_protected: int | None = None) -> Tensor:
    """transformers BertModel. Padding comes from ``attention_mask`` (masked keys get -inf). Returns
    ``last_hidden_state`` (reduced), or restored to the original length with ``unmerge=True``."""
    model.eval()
    bert = getattr(model, "bert", model)
    layers = list(bert.encoder.layer)
    P = 1 if num_protected is None else num_protected
    opt = _make_options(len(layers), tome_r, evit_layers, keep_ratio, fuse, prop_attn, P)
    x = bert.embeddings(input_ids=input_ids)
    valid = attention_mask.bool()
    x, source = _run_blocks(x, layers, _bert_attn_half, _bert_mlp_half, opt, valid)
    return unmerge_tokens(x, source) if unmerge else x
