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
MATMUL = {aten.matmul.default, aten.bmm.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
SCALE_MUL = {aten.mul.Tensor, aten.mul.Scalar}
SCALE_DIV = {aten.div.Tensor, aten.div.Scalar}
ADD = {aten.add.Tensor}
TRANSPOSE = {aten.transpose.int, aten.t.default}
# Between softmax and the value matmul: dropout, and dtype casts (HF eager attention computes softmax
# in float32 and casts back: softmax -> to(dtype) -> dropout -> matmul).
DROPOUT = {aten.dropout.default, aten.native_dropout.default, aten.clone.default, aten.alias.default,
           aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default}

LINEAR = {aten.linear.default}
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
    aten.flatten.using_ints, aten.layer_norm.default,
}

# Ops that read only a tensor's size: the value-dependence analysis does not follow them.
SHAPE_ONLY = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}
