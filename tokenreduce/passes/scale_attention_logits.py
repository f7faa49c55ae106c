"""Divide the attention softmax input of the blocks a plan names by a temperature (TempScale).

For every block whose plan is a `TempScalePlan` with an action (`methods/tempscale.py`):

    explicit attention:  softmax(x)                  ->  softmax(temper(x, tau))
    fused SDPA:          sdpa(q, k, v, mask, scale)  ->  sdpa(q / tau, k, v, temper(mask, tau), scale)

`temper(x, tau) = max(x / tau, lowest)`: the division the official code does on the whole softmax input, with a
masked entry (the dtype's lowest value, or -inf) clamped to the lowest finite value instead of overflowing to
-inf, so an entirely masked row keeps the unmodified model's (uniform) softmax instead of NaN. A boolean mask is
left as it is. Only the block's own attention node reads the new values: a q or mask shared with other blocks or
with scoring ops keeps its other uses. New nodes take the `meta["val"]` of what they replace (same shape and
dtype), so the pass may run after `fix_token_shapes`.

Refuses nothing: any attention the analysis recognised can be rescaled. Does nothing for other methods' plans.
"""

from __future__ import annotations

import torch
from torch import fx

from tokenreduce.ir.graph import call
from tokenreduce.methods.tempscale import TempScalePlan
from tokenreduce.passes.common import EncoderContext, PassResult


def temper(x: torch.Tensor, tau: float) -> torch.Tensor:
    """`x / tau` for a float tensor, clamped below at the dtype's lowest finite value; a bool mask unchanged."""
    if x.dtype == torch.bool:
        return x
    return torch.clamp(x / tau, min=torch.finfo(x.dtype).min)


def _insert(graph: fx.Graph, before: fx.Node, target: object, args: tuple, like: fx.Node) -> fx.Node:
    with graph.inserting_before(before):
        node = call(graph, target, args, before)
    if "val" in like.meta:
        node.meta["val"] = like.meta["val"]
    return node


def scale_attention_logits(gm: fx.GraphModule, ctx: EncoderContext) -> PassResult:
    result = PassResult("scale_attention_logits", changed=False)
    graph = gm.graph
    taus = set()
    for block, bp in zip(ctx.analysis.blocks, ctx.plans):
        if not isinstance(bp, TempScalePlan) or not bp.reduces:
            continue
        att, tau = block.attention, bp.temperature
        taus.add(tau)
        node = att.node
        if att.kind == "sdpa":
            q = _insert(graph, node, torch.ops.aten.div.Tensor, (att.q, tau), att.q)
            node.replace_input_with(att.q, q)
            if att.mask is not None and att.mask in node.all_input_nodes:
                mask = _insert(graph, node, temper, (att.mask, tau), att.mask)
                node.replace_input_with(att.mask, mask)
        else:
            logits = node.all_input_nodes[0]
            tempered = _insert(graph, node, temper, (logits, tau), logits)
            node.replace_input_with(logits, tempered)
        result.rewrites += 1
        result.changed = True
    if result.changed:
        result.notes.append(f"tempscale: attention softmax input divided by tau={'/'.join(f'{t:g}' for t in taus)} "
                            f"in {result.rewrites} block(s)")
    return result
