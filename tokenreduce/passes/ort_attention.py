"""Export attention as onnxruntime's fused `com.microsoft.MultiHeadAttention` (ONNX target, opt-in).

The standard ONNX export of `F.scaled_dot_product_attention` is `MatMul -> Softmax -> MatMul` over a
materialised `[B, H, N, M]` score tensor. At diffusion resolutions that tensor dominates: a 1024-px SD UNet's
finest level attends over 16384 tokens, 8 heads, so one call holds an 8.6 GB fp32 score tensor (and its
softmax), which does not fit a 24 GB machine beside two sessions. onnxruntime's contrib op
`MultiHeadAttention` runs attention fused (on CPU a flash-attention loop over key blocks when there is no mask
or bias): the same 16384-token attention adds ~0.2 GB, and at 4096 tokens it adds 0.06 GB against 1.09 GB and
runs 1.29x faster than the unfused graph (measured on this machine: docs/benchmarks.md "Fused attention on
onnxruntime").

`ort_fused_attention(gm)` rewrites each `aten.scaled_dot_product_attention` node that the contrib op computes
exactly (same numbers up to float summation order) into a call of `ort_attention`. Eager, it is
`F.scaled_dot_product_attention` (the rewritten copy still runs); under `torch.onnx.export` it emits

    q, k, v [B, H, N, D] -> transpose + reshape to [B, N, H*D] -> MultiHeadAttention(num_heads=H, scale)
    -> [B, N, H*D] -> reshape + transpose back to [B, H, N, D]

through `torch.onnx.ops.symbolic` (the exporter's optimizer then cancels the transposes against the model's
own). A node is left to the standard export, with the reason recorded, when it has an attention mask, dropout,
`is_causal` or GQA, when q/k/v are not 4-D with the same static head count and head size, or when it is not
fp32. The file then needs onnxruntime (a contrib op): the option is off by default, and the TensorRT target,
which reads standard ONNX, refuses it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from tokenreduce.passes.common import PassResult

SDPA = torch.ops.aten.scaled_dot_product_attention.default
DOMAIN_OP = "com.microsoft::MultiHeadAttention"


def ort_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, scale=scale)` for q/k/v `[B, H, N|M, D]`, exported as
    onnxruntime's `com.microsoft.MultiHeadAttention`."""
    if not torch.onnx.is_in_onnx_export():
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    b, heads, n, d = q.shape

    def bsh(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], x.shape[1] * x.shape[3])

    y = torch.onnx.ops.symbolic(DOMAIN_OP, [bsh(q), bsh(k), bsh(v)], {"num_heads": int(heads), "scale": float(scale)},
                                dtype=q.dtype, shape=(b, n, heads * d), version=1)
    return y.view(b, n, heads, d).transpose(1, 2)


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def unfusable(node: fx.Node) -> str | None:
    """Why the contrib op cannot compute this SDPA node exactly (None: it can)."""
    if _arg(node, 3, "attn_mask", None) is not None:
        return "it has an attention mask"
    if _arg(node, 4, "dropout_p", 0.0) != 0.0:
        return "it has dropout"
    if _arg(node, 5, "is_causal", False):
        return "it is causal"
    if node.kwargs.get("enable_gqa", False):
        return "it uses enable_gqa"
    vals = [val for a in node.args[:3] if isinstance(val := getattr(a, "meta", {}).get("val"), torch.Tensor)]
    if len(vals) != 3:
        return "its q/k/v shapes are unknown"
    q, k, v = vals
    if any(t.dim() != 4 for t in vals):
        return f"q/k/v are not 4-D ({q.dim()}/{k.dim()}/{v.dim()})"
    if any(t.dtype != torch.float32 for t in vals):
        return f"it is not fp32 ({q.dtype})"
    dims = [(t.shape[1], t.shape[3]) for t in vals]
    if not all(isinstance(x, int) for pair in dims for x in pair):
        return "its head count or head size is symbolic"
    if len(set(dims)) != 1:
        return f"q/k/v (heads, head size) differ: {dims}"
    return None


def ort_fused_attention(gm: fx.GraphModule) -> PassResult:
    """Rewrite every SDPA node the contrib op computes exactly into `ort_attention`; notes say which stay."""
    result = PassResult("ort_fused_attention", changed=False)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not SDPA:
            continue
        reason = unfusable(node)
        if reason is not None:
            result.notes.append(f"{node.name}: {reason}")
            continue
        q = node.args[0].meta["val"]  # type: ignore[union-attr]
        scale = node.kwargs.get("scale")
        node.target = ort_attention
        node.args = (*node.args[:3], float(scale) if scale is not None else float(q.shape[-1]) ** -0.5)
        node.kwargs = {}
        result.rewrites += 1
    if result.rewrites:
        result.changed = True
        gm.recompile()
    return result
