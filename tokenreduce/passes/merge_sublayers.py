"""Run sublayers of a denoiser's transformer blocks on merged tokens: merge before, unmerge before the residual.

The placement of tomesd (`methods/base.py`, `DenoiserMethod`): the token grid between blocks stays whole
(convolutions, resampling and the output read every position), and inside each planned block

    slot = method.emit_slots(options, site)                    # from the block input x [B, N, C], once per block
    for each merged sublayer (self-attention, cross-attention, MLP):
        m, _ = tokenreduce.apply_plan(merge_at, slot, None, None, N')   # mean of each group
        the sublayer's first projections read m instead of merge_at
        h' = h + unmerge(branch, slot)                         # every token takes its group's output

Joint text + image attention (SD3, Flux; `analysis/denoiser_joint.py`): only the image rows merge. A sublayer
whose input also holds text rows (Flux's single-stream `cat([text, image])`) merges `merge_at[:, offset:offset +
N]` and keeps the rest (`unmerge_rows` undoes it); the cuts of the joint sequence after the attention (`slice`,
`split_with_sizes` at the image's end) move from `offset + N` to `offset + N'`; per-token side inputs along the
joint sequence (rotary tables) are gathered by the token each slot stands for (`gather_positions`: a merged
token takes its destination's position), which the method emits (`emit_positions`; a method without it is
refused on such blocks).

Only the sublayer's own readers of `merge_at` are rewired; a later reader of the same tensor outside the
sublayer keeps the full tokens. A Flux single-stream block whose attention and MLP both merge is merged once
and unmerged after its shared output projection and gate (per token and per sample: the same numbers).
Shapes are not touched here: `fix_token_shapes` re-propagates them (the head
reshapes inside the sublayer) and, since every residual add sees N tokens again, nothing outside changes.
Refuses (TokenReduceError) a planned block whose sublayer the analysis found but which has no readers.
"""

from __future__ import annotations

import torch
from torch import fx

from tokenreduce.analysis.denoiser import DenoiserAnalysis, Sublayer
from tokenreduce.analysis.denoiser_joint import JointSpan
from tokenreduce.errors import TokenReduceError
from tokenreduce.ir.graph import Builder, call, nodes_between, shape, static_dim
from tokenreduce.kernels import ops as _ops  # noqa: F401  (registers torch.ops.tokenreduce)
from tokenreduce.kernels import reference as ref
from tokenreduce.methods import registry
from tokenreduce.methods.base import DenoiserMethod, MergeSite
from tokenreduce.passes.common import EncoderContext, PassResult

tr = torch.ops.tokenreduce
aten = torch.ops.aten


def replace_rows(t: torch.Tensor, axis: int, offset: int, n: int, new: torch.Tensor) -> torch.Tensor:
    """`t` with its rows `offset .. offset + n - 1` on `axis` (the image part of a joint sequence) replaced by
    `new` (of any length on `axis`); the rows before and after (text tokens) pass through."""
    parts = [t.narrow(axis, 0, offset)] if offset else []
    parts.append(new)
    tail = t.shape[axis] - offset - n
    if tail:
        parts.append(t.narrow(axis, offset + n, tail))
    return torch.cat(parts, dim=axis) if len(parts) > 1 else parts[0]


def unmerge_rows(y: torch.Tensor, slot: torch.Tensor, offset: int, n_out: int) -> torch.Tensor:
    """Unmerge the image rows `offset .. offset + n_out - 1` of `y [B, T', C]` (every original image token takes
    its slot's row); the rows before and after (text tokens) pass through."""
    return replace_rows(y, 1, offset, n_out, ref.unmerge(y.narrow(1, offset, n_out), slot, 1))


def gather_positions(t: torch.Tensor, rep: torch.Tensor, axis: int, offset: int, n: int) -> torch.Tensor:
    """A per-token side input `t [1|B, ..., T, ...]` (a rotary table) whose rows `offset .. offset + n - 1` on
    `axis` belong to the image tokens: those rows gathered by `rep [B, N']` (the token each merged slot stands for:
    a merged token takes its destination's position), the others kept. Returns `[B, ..., T - n + N', ...]`."""
    t = t.expand((rep.shape[0], *t.shape[1:]))
    return replace_rows(t, axis, offset, n, ref.gather_tokens(t.narrow(axis, offset, n), rep, dim=axis))


def _merge_input(graph: fx.Graph, sub: Sublayer, slot: fx.Node, n: int, n_out: int) -> fx.Node:
    """The sublayer's input with its image rows merged: `apply_plan` on them, text rows around them kept."""
    b = Builder(graph, sub.merge_at)
    ms = shape(sub.merge_at)
    total = static_dim(ms[1]) if ms is not None else None
    if sub.offset == 0 and total == n:
        return b.item(b.add(tr.apply_plan.default, (sub.merge_at, slot, None, None, n_out)), 0)
    if total is None:
        raise TokenReduceError(f"{sub.name}: the joint input {sub.merge_at.name} has a symbolic token count")
    image = b.add(aten.slice.Tensor, (sub.merge_at, 1, sub.offset, sub.offset + n))
    merged = b.item(b.add(tr.apply_plan.default, (image, slot, None, None, n_out)), 0)
    parts = [b.add(aten.slice.Tensor, (sub.merge_at, 1, 0, sub.offset))] if sub.offset else []
    parts.append(merged)
    if total > sub.offset + n:
        parts.append(b.add(aten.slice.Tensor, (sub.merge_at, 1, sub.offset + n, total)))
    return b.add(aten.cat.default, (parts, 1))


def _move_cuts(joint: JointSpan, n_out: int) -> None:
    """The slices / splits of the joint sequence after the attention: the image part is `n_out` long now."""
    old_end, new_end = joint.offset + joint.image, joint.offset + n_out
    for cut in joint.splits:
        args = list(cut.args)
        if cut.target is aten.slice.Tensor:
            for i in (2, 3):
                if i < len(args) and args[i] == old_end:
                    args[i] = new_end
        else:
            assert isinstance(args[1], (list, tuple))
            sizes, start = list(args[1]), 0
            for i, size in enumerate(sizes):
                if start == joint.offset and size == joint.image:
                    sizes[i] = n_out
                start += size
            args[1] = sizes
        cut.args = tuple(args)


def _gather_positions(graph: fx.Graph, sub: Sublayer, region: set[fx.Node], rep: fx.Node) -> int:
    assert sub.joint is not None
    order = {n: i for i, n in enumerate(graph.nodes)}
    count = 0
    for side, axis in sub.joint.positions:
        users = sorted((u for u in side.users if u in region), key=order.__getitem__)
        if not users:
            continue
        with graph.inserting_before(users[0]):
            gathered = call(graph, gather_positions, (side, rep, axis, sub.joint.offset, sub.joint.image), users[0])
        for u in users:
            u.replace_input_with(side, gathered)
        count += 1
    return count


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
        x, n = blk.x_in, blk.num_tokens
        xs = shape(x)
        if blk.x_offset or (xs is not None and static_dim(xs[1]) != n):  # the image rows of a [text; image] input
            x = Builder(graph, blk.x_in).add(aten.slice.Tensor, (blk.x_in, 1, blk.x_offset, blk.x_offset + n))
        site = MergeSite(Builder(graph, x), x, blk.grid, bp, analysis.timestep)
        slot = method.emit_slots(opts, site)
        kinds = [k for k in method.sublayers(opts) if k in blk.sublayers]
        subs = [(k, blk.sublayers[k]) for k in kinds]
        if blk.fused is not None and {"attn", "mlp"} <= set(kinds):  # one merge, unmerged after proj_out
            subs = [("attn+mlp", blk.fused)]
        rep = None
        if any((j := sub.joint) is not None and j.positions for _, sub in subs):
            slot, rep = method.emit_positions(opts, site, slot)  # refused by methods that cannot say
        for kind, sub in subs:
            if not sub.readers:
                raise TokenReduceError(f"block {blk.index} ({blk.name}): the {kind} sublayer's input "
                                       f"{sub.merge_at.name} has no reader inside it to rewire")
            region = nodes_between([sub.merge_at], [sub.branch])
            merged = _merge_input(graph, sub, slot, n, bp.tokens_out)
            for reader in sub.readers:
                reader.replace_input_with(sub.merge_at, merged)
            if sub.joint is not None:
                _move_cuts(sub.joint, bp.tokens_out)
                if rep is not None:
                    result.rewrites += _gather_positions(graph, sub, region, rep)
            bs = shape(sub.branch)
            with graph.inserting_before(sub.residual_add):
                if sub.offset == 0 and (bs is None or static_dim(bs[1]) == n):
                    full = call(graph, ref.unmerge, (sub.branch, slot, 1), sub.branch)
                else:
                    full = call(graph, unmerge_rows, (sub.branch, slot, sub.offset, bp.tokens_out), sub.branch)
            sub.residual_add.replace_input_with(sub.branch, full)
            result.rewrites += 1
    result.changed = result.rewrites > 0
    return result
