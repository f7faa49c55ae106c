"""Run sublayers of a denoiser's transformer blocks on merged tokens: merge before, unmerge before the residual.

The placement of tomesd (`methods/base.py`, `DenoiserMethod`): the token grid between blocks stays whole
(convolutions, resampling and the output read every position), and inside each planned block

    slot = method.emit_slots(options, site)                    # from the block input x [B, N, C], once per block
    for each merged sublayer (self-attention, cross-attention, MLP):
        m, _ = tokenreduce.apply_plan(merge_at, slot, None, None, N')   # mean of each group
        the sublayer's first projections read m instead of merge_at
        h' = h + unmerge(branch, slot)                         # every token takes its group's output

Only the sublayer's own readers of `merge_at` are rewired; a later reader of the same tensor outside the
sublayer keeps the full tokens. Shapes are not touched here: `fix_token_shapes` re-propagates them (the head
reshapes inside the sublayer) and, since every residual add sees N tokens again, nothing outside changes.
Refuses (TokenReduceError) a planned block whose sublayer the analysis found but which has no readers.
"""

from __future__ import annotations

import torch
from torch import fx

from tokenreduce.analysis.denoiser import DenoiserAnalysis
from tokenreduce.errors import TokenReduceError
from tokenreduce.ir.graph import Builder, call
from tokenreduce.kernels import ops as _ops  # noqa: F401  (registers torch.ops.tokenreduce)
from tokenreduce.kernels import reference as ref
from tokenreduce.methods import registry
from tokenreduce.methods.base import DenoiserMethod, MergeSite
from tokenreduce.passes.common import EncoderContext, PassResult

tr = torch.ops.tokenreduce


def merge_sublayers(gm: fx.GraphModule, ctx: EncoderContext) -> PassResult:
    result = PassResult("merge_sublayers", changed=False)
    method = registry.get(ctx.settings.method)
    analysis = ctx.analysis
    if not isinstance(method, DenoiserMethod) or not isinstance(analysis, DenoiserAnalysis):
        return result
    graph = gm.graph
    opts = ctx.settings.opts
    for blk, bp in zip(analysis.dblocks, ctx.plans):
        if not bp.reduces:
            continue
        assert blk.x_in is not None
        slot = method.emit_slots(opts, MergeSite(Builder(graph, blk.x_in), blk.x_in, blk.grid, bp, analysis.timestep))
        for kind in method.sublayers(opts):
            sub = blk.sublayers.get(kind)
            if sub is None:
                continue
            if not sub.readers:
                raise TokenReduceError(f"block {blk.index} ({blk.name}): the {kind} sublayer's input "
                                       f"{sub.merge_at.name} has no reader inside it to rewire")
            b = Builder(graph, sub.merge_at)
            merged = b.item(b.add(tr.apply_plan.default, (sub.merge_at, slot, None, None, bp.tokens_out)), 0)
            for reader in sub.readers:
                reader.replace_input_with(sub.merge_at, merged)
            with graph.inserting_before(sub.residual_add):
                full = call(graph, ref.unmerge, (sub.branch, slot, 1), sub.branch)
            sub.residual_add.replace_input_with(sub.branch, full)
            result.rewrites += 1
    result.changed = result.rewrites > 0
    return result
