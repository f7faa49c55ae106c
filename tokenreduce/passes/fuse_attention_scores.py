"""On GPU graphs, compute a block's attention and its token scores in one `attention_with_scores` node.

After `insert_reductions`, an EViT block (and any FastV-style one-row score) reads its attention twice:
the block's SDPA, and `query_row_scores(q, k, bias, scale, row)` recomputing one query row of the same
attention for the plan. On a GPU this pass replaces the pair with

    out, scores = tokenreduce.attention_with_scores(q, k, v, bias, scale, is_causal, row)

whose Triton kernel (FlashAttention-2 forward that also writes the chosen row, docs/kernels.md) streams
K once instead of twice. Every user of the SDPA reads `out`, every user of the scores reads `scores`.

Fires only on graphs whose tensors are on CUDA (`meta["val"].device` of `q`) while the Triton kernels are
chosen (not with `TOKENREDUCE_KERNELS=reference` / `kernels.use_reference_kernels()`, `kernels/dispatch.py`),
or with `force=True` (tests; the op's CPU implementation is the reference, so a forced CPU graph computes
the same values).
CPU graphs keep SDPA + `query_row_scores`: inductor inlines the reference there, and ONNX export inlines
every tokenreduce op to standard ops anyway (`passes/inline_reference_ops.py`, which also maps the fused
op back to SDPA + the reference row), so exported artefacts never depend on this pass.

Matches only the torch.export training-IR spelling `aten.scaled_dot_product_attention.default` (timm, HF
sdpa), the one the pipeline captures. Leaves a pair alone, with the reason in `PassResult.notes`, when:
the score's `q`/`k` feed no SDPA or several; the score's bias is not the SDPA's `attn_mask` node; the
scales differ; the SDPA has dropout or grouped-query heads; the attention is causal and the score row is
not the last row (the op's row would then be the causal row, not `query_row_scores`' full row); `q` is
not `[B, H, M, d]`.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode

from tokenreduce.ir.graph import args_of, call, stable_toposort
from tokenreduce.kernels import dispatch
from tokenreduce.kernels import ops as _ops  # noqa: F401  (registers torch.ops.tokenreduce)
from tokenreduce.passes.common import PassContext, PassResult

SDPA = torch.ops.aten.scaled_dot_product_attention.default
QUERY_ROW_SCORES = torch.ops.tokenreduce.query_row_scores.default
ATTENTION_WITH_SCORES = torch.ops.tokenreduce.attention_with_scores.default

# aten::scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0., is_causal=False, *,
#                                    scale=None, enable_gqa=False)
_SDPA_POSITIONAL = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_SDPA_DEFAULTS: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                                  "enable_gqa": False}


def _sdpa_args(node: fx.Node) -> dict[str, Any]:
    out = dict(_SDPA_DEFAULTS)
    out.update(zip(_SDPA_POSITIONAL, args_of(node)))
    out.update(node.kwargs)
    return out


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _match(qrs: fx.Node) -> tuple[fx.Node | None, str]:
    """The SDPA node computing the attention `qrs` scores one row of, or None and the reason."""
    q, k, bias, scale, row = args_of(qrs)
    sdpas = [u for u in q.users if u.target is SDPA and args_of(u)[0] is q and args_of(u)[1] is k]
    if len(sdpas) != 1:
        return None, f"its q/k feed {len(sdpas)} scaled_dot_product_attention nodes (need exactly one)"
    sdpa = sdpas[0]
    a = _sdpa_args(sdpa)
    if a["attn_mask"] is not bias:
        return None, f"its bias {bias} is not the attention mask {a['attn_mask']} of {sdpa.name}"
    if a["dropout_p"] != 0.0:
        return None, f"{sdpa.name} has dropout_p={a['dropout_p']}"
    if a["enable_gqa"]:
        return None, f"{sdpa.name} uses grouped-query attention"
    qv, kv = _val(q), _val(k)
    if qv is None or kv is None or qv.dim() != 4:
        return None, "q has no [B, H, M, d] fake value"
    sdpa_scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(qv.shape[-1])
    if not math.isclose(float(sdpa_scale), float(scale), rel_tol=1e-6):
        return None, f"its scale {scale} differs from the attention's {sdpa_scale}"
    if a["is_causal"]:
        m, n = qv.shape[-2], kv.shape[-2]
        if not (m == n and row in (-1, m - 1)):
            return None, f"{sdpa.name} is causal and row {row} is not the last of {m} rows (its causal row " \
                         "differs from query_row_scores' full row)"
    return sdpa, ""


def fuse_attention_scores(gm: fx.GraphModule, ctx: PassContext | None = None, *, force: bool = False) -> PassResult:
    """Replace `SDPA(q, k, v, bias)` + `query_row_scores(q, k, bias, scale, row)` by `attention_with_scores`
    on CUDA graphs (or everywhere with `force=True`)."""
    result = PassResult("fuse_attention_scores", changed=False)
    graph = gm.graph
    for qrs in [n for n in graph.nodes if n.op == "call_function" and n.target is QUERY_ROW_SCORES]:
        q, k, bias, scale, row = args_of(qrs)
        qv = _val(q)
        device = qv.device if qv is not None else None
        if not force and (device is None or device.type != "cuda"):
            result.notes.append(f"{qrs.name}: graph on {device}, kept SDPA + query_row_scores (fusion is for CUDA)")
            continue
        chosen = None if force else dispatch.reference_reason()  # raises on an invalid $TOKENREDUCE_KERNELS
        if chosen is not None:
            result.notes.append(f"{qrs.name}: kept SDPA + query_row_scores: {chosen}")
            continue
        sdpa, reason = _match(qrs)
        if sdpa is None:
            result.notes.append(f"{qrs.name}: not fused: {reason}")
            continue
        a = _sdpa_args(sdpa)
        fused_args = (q, k, a["value"], bias, float(scale), bool(a["is_causal"]), int(row))
        with graph.inserting_before(sdpa):
            fused = call(graph, ATTENTION_WITH_SCORES, fused_args, sdpa)
            out = call(graph, operator.getitem, (fused, 0), sdpa)
            scores = call(graph, operator.getitem, (fused, 1), qrs)
        fake_mode = detect_fake_mode([qv])
        vals = [_val(x) if isinstance(x, fx.Node) else x for x in fused_args]
        if fake_mode is not None:
            with fake_mode:
                fused.meta["val"] = ATTENTION_WITH_SCORES(*vals)
        else:  # values without a fake mode (hand-built graphs): the replaced nodes' values are the outputs'
            fused.meta["val"] = (sdpa.meta["val"], qrs.meta["val"])
        out.meta["val"], scores.meta["val"] = fused.meta["val"]
        sdpa.replace_all_uses_with(out)
        qrs.replace_all_uses_with(scores)
        graph.erase_node(qrs)
        graph.erase_node(sdpa)
        result.rewrites += 1
    if result.rewrites:
        result.changed = True
        stable_toposort(graph)  # the score's users may precede the SDPA (e.g. a plan placed right after k)
        graph.lint()
        gm.recompile()
    return result
