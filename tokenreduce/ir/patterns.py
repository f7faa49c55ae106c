"""Declarative tables of the graph spellings the analysis recognises.

Attention appears in ATen graphs in several spellings; each entry says where q, k, v, the mask and the
scale live, so the matcher has one code path. Add a spelling here, not an `if` in the matcher.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

aten = torch.ops.aten


@dataclass(frozen=True)
class SdpaSpelling:
    """Where the operands of one fused-attention op spelling are."""

    target: object
    mask_pos: int | None  # positional index of attn_mask, if positional
    mask_kw: str | None  # keyword name of attn_mask
    causal_pos: int | None
    tuple_output: bool  # output 0 of a tuple is the attention result
    origin: str


SDPA_SPELLINGS: dict[object, SdpaSpelling] = {
    s.target: s
    for s in (
        # torch.export training IR and dynamo graphs re-exported: every F.scaled_dot_product_attention.
        SdpaSpelling(aten.scaled_dot_product_attention.default, 3, "attn_mask", 5, False, "F.scaled_dot_product_attention (timm, HF sdpa)"),
        # post-dispatch CPU spelling (inductor pre-grad graphs, export after run_decompositions on CPU).
        SdpaSpelling(aten._scaled_dot_product_flash_attention_for_cpu.default, None, "attn_mask", 4, True, "SDPA lowered for CPU"),
        # post-dispatch CUDA math/efficient spelling.
        SdpaSpelling(aten._scaled_dot_product_efficient_attention.default, 3, None, 6, True, "SDPA lowered for CUDA (efficient)"),
    )
}

# Explicit attention: matmul(q, k^T) -> (scale, mask add)* -> softmax -> (dropout)* -> matmul(., v).
# Seen in timm with fused_attn=False, HF "eager" attention, ToMe/EViT-era model code.
# `bmm` is the [B*H, N, d] spelling (DeBERTa, older HF code). In-place variants appear in training-IR graphs
# (MPNet `scores += bias`, `masked_fill_`): each set below lists both.
MATMUL = {aten.matmul.default, aten.bmm.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
SCALE_MUL = {aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.mul_.Scalar}
SCALE_DIV = {aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, aten.div_.Scalar}
ADD = {aten.add.Tensor, aten.add_.Tensor}
TRANSPOSE = {aten.transpose.int, aten.t.default}
PERMUTE = {aten.permute.default}
# Score modifiers between q @ k^T and softmax besides scale and additive terms.
MASKED_FILL = {aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.masked_fill_.Scalar, aten.masked_fill_.Tensor}
TANH = {aten.tanh.default}
# Ops that use a tensor's values as indices into a table: a position comparison feeding one is a bucket
# computation (T5 relative attention), not a mask.
LOOKUP = {aten.embedding.default, aten.gather.default, aten.index_select.default}  # soft-capping: tanh(logits / c) * c (Gemma 2)
# Ops on the logits (or probabilities) that move no value between query/key positions: views between the
# [B*H, N, N] and [B, H, N, N] spellings, dtype casts, copies.
LOGIT_LAYOUT = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.contiguous.default,
                aten.clone.default, aten.alias.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
                aten.type_as.default}
SLIDING_COMPARE = {aten.le.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.gt.Tensor,
                   aten.le.Scalar, aten.lt.Scalar, aten.ge.Scalar, aten.gt.Scalar}
# Between softmax and the value matmul: dropout, and dtype casts (HF eager attention computes softmax
# in float32 and casts back: softmax -> to(dtype) -> dropout -> matmul).
DROPOUT = {aten.dropout.default, aten.native_dropout.default, aten.clone.default, aten.alias.default,
           aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default}

LINEAR = {aten.linear.default}
# Projections: `linear`, and matrix products with a parameter (GPT-2's Conv1D: `addmm(bias, x2d, W)`;
# `mm(x2d, W)`; `matmul(x, W)`). The operand positions of the activation and the weight per spelling.
PROJECTION_OPERANDS: dict[object, tuple[int, int]] = {
    aten.linear.default: (0, 1), aten.addmm.default: (1, 2), aten.mm.default: (0, 1), aten.matmul.default: (0, 1),
}
# Ops a projection's activation passes through between the [B, N, C] hidden state and a 2-D matrix product.
FLATTEN = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
           aten.contiguous.default}
# Ops that shrink a token grid (PVT's spatial-reduction attention computes keys from a strided conv / pool).
SPATIAL_REDUCE = {aten.convolution.default, aten.conv2d.default, aten.avg_pool2d.default,
                  aten.adaptive_avg_pool2d.default, aten.max_pool2d.default}
# Statistics that only a normalisation computes (RMSNorm / LayerNorm spelled out as elementwise ops).
NORM_STATS = {aten.rsqrt.default, aten.var_mean.correction, aten.var_mean.dim, aten.var.correction}
LAYER_NORM = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}
EMBEDDING = {aten.embedding.default}
CAT = {aten.cat.default}
SLICE = {aten.slice.Tensor}

# Ops that act on each token independently (or broadcast a token-independent operand): protected-token
# detection looks through them.
PER_TOKEN = {
    aten.dropout.default, aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
    aten.clone.default, aten.contiguous.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
    aten.gelu.default, aten.alias.default, aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor,
    aten.div.Tensor, aten.type_as.default,
}
GETITEM = operator.getitem

# Ops the forward walk from an attention output to its residual add passes through.
ATTN_OUT_CHAIN = {
    aten.transpose.int, aten.permute.default, aten.reshape.default, aten.view.default, aten._unsafe_view.default,
    aten.contiguous.default, aten.clone.default, aten.linear.default, aten.dropout.default, aten.mul.Tensor,
    aten.flatten.using_ints, aten.layer_norm.default, aten.addmm.default, aten.mm.default, aten.rms_norm.default,
    aten.to.dtype, aten._to_copy.default, aten.type_as.default,
}

# Ops that read only a tensor's size: the value-dependence analysis does not follow them.
SHAPE_ONLY = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}
