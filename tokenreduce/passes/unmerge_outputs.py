"""Restore the original token count at the model outputs (`unmerge=True`).

Runs after `fix_token_shapes`, so every output's reduced shape is known. An output dimension whose size
changed and was the original token count gets `unmerge(x, source, dim)`: each original position takes the
value of the slot it was merged into. Refuses an output whose changed dimension is not a plain token axis.
"""

from __future__ import annotations

from torch import fx

from tokenreduce.errors import TokenReduceError
from tokenreduce.ir.graph import args_of, call, same_dim
from tokenreduce.kernels import reference as ref
from tokenreduce.passes.common import EncoderContext, PassResult
from tokenreduce.passes.fix_token_shapes import fix_token_shapes


def unmerge_outputs(gm: fx.GraphModule, ctx: EncoderContext) -> PassResult:
    result = PassResult("unmerge_outputs", changed=False)
    if not ctx.settings.unmerge or ctx.state.source is None:
        return result
    graph = gm.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    source = ctx.state.source

    def restore(node: fx.Node) -> fx.Node:
        orig, new = node.meta.get("tokenreduce_orig_val"), node.meta.get("val")
        if orig is None or new is None or not hasattr(new, "shape"):
            return node
        changed = [d for d in range(len(orig.shape)) if not same_dim(orig.shape[d], new.shape[d])]
        if not changed:
            return node
        for d in changed:
            if orig.shape[d] != ctx.original_tokens:
                raise TokenReduceError(
                    f"output {node.name} has a reduced dimension {d} of size {orig.shape[d]} that is not the "
                    f"token axis ({ctx.original_tokens} tokens); unmerge cannot restore it"
                )
        with graph.inserting_before(out_node):
            for d in changed:
                node = call(graph, ref.unmerge, (node, source, d), node)
        result.rewrites += 1
        return node

    out_node.args = (fx.node.map_arg(args_of(out_node)[0], restore),)
    result.changed = result.rewrites > 0
    if result.changed:
        fix_token_shapes(gm, ctx)  # give the unmerge nodes their shapes (nothing else changes)
    return result
