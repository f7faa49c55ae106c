"""Insert score -> plan -> apply at every planned block and thread the token state through later blocks.

One pass, because the two jobs depend on each other in block order: block j's attention needs the mask
and `log(size)` bias left by the reductions before it, and an EViT score at block j must use exactly that
bias. Walking the blocks once in order keeps that true by construction.

For a reducing block the pass adds, right after the block's reduction point (`h`):

    slot, weight, rep = method.emit(options, site)   # e.g. ToMe: tokenreduce.tome_plan(k, r, P, valid)
    x', size' = tokenreduce.apply_plan(h, slot, weight, size, N')
    valid' = valid[rep];  rep_total' = rep_total[rep];  source' = slot[source]

and every later use of `h` reads `x'`. For every attention after a reduction it replaces the mask with the
original mask gathered along both token axes by `rep_total` and, with proportional attention, with
`where(mask, log(size), min)` (SDPA `attn_mask`, or an add before the softmax of explicit attention).

Shapes are not touched here: `fix_token_shapes` re-propagates them afterwards.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from tokenreduce.analysis.encoder import Block
from tokenreduce.ir.graph import Builder, args_of, call, reaches_matmul
from tokenreduce.kernels import ops as _ops  # noqa: F401  (registers torch.ops.tokenreduce)
from tokenreduce.kernels import reference as ref
from tokenreduce.methods import registry
from tokenreduce.methods.base import Site
from tokenreduce.passes.common import EncoderContext, PassResult

tr = torch.ops.tokenreduce


def _set_attention_mask(block: Block, new_mask: fx.Node | None, graph: fx.Graph, ctx: EncoderContext) -> None:
    att = block.attention
    if att.kind == "sdpa":
        node = att.node
        args, kwargs = list(args_of(node)), dict(node.kwargs)
        if att.mask is not None and att.mask in args[3:4]:
            args[3] = new_mask
        else:
            kwargs["attn_mask"] = new_mask
        node.args, node.kwargs = tuple(args), kwargs
        return
    if att.mask_add is not None and att.mask is not None:
        att.mask_add.replace_input_with(att.mask, new_mask)  # type: ignore[arg-type]
        return
    if new_mask is not None:
        softmax = att.node
        logits = args_of(softmax)[0]
        with graph.inserting_before(softmax):
            biased = call(graph, torch.ops.aten.add.Tensor, (logits, new_mask), softmax)
        softmax.replace_input_with(logits, biased)  # type: ignore[arg-type]


def _attention_bias(block: Block, graph: fx.Graph, ctx: EncoderContext, cache: dict) -> fx.Node | None:
    """The mask/bias block's attention must use given the reductions so far (None: leave as is)."""
    st = ctx.state
    att = block.attention
    if st.epoch == 0:
        return att.mask
    key = (st.epoch, att.mask)
    if key in cache:
        return cache[key]
    dtype = att.q.meta["val"].dtype
    with graph.inserting_before(att.node if att.kind == "sdpa" else (att.mask_add or att.node)):
        mask = att.mask
        if mask is not None:
            mask = call(graph, ref.reduce_mask, (mask, st.rep, ctx.original_tokens), att.node)
        if registry.encoder(ctx.settings.method).prop_attn(ctx.settings.opts):
            mask = call(graph, ref.size_bias, (st.size, mask, dtype), att.node)
    cache[key] = mask
    return mask


def insert_reductions(gm: fx.GraphModule, ctx: EncoderContext) -> PassResult:
    result = PassResult("insert_reductions", changed=False)
    if not any(p.reduces for p in ctx.plans):
        return result
    graph = gm.graph
    st = ctx.state
    cache: dict = {}
    settings = ctx.settings
    method = registry.encoder(settings.method)
    num_p = ctx.analysis.num_protected
    for block, bp in zip(ctx.analysis.blocks, ctx.plans):
        if block.reducible and st.epoch > 0:
            new_mask = _attention_bias(block, graph, ctx, cache)
            if new_mask is not block.attention.mask:
                _set_attention_mask(block, new_mask, graph, ctx)
                result.rewrites += 1
        if not bp.reduces:
            continue
        att = block.attention
        h = block.reduce_at
        assert h is not None
        builder = Builder(graph, h)
        add = builder.add

        if st.epoch == 0 and att.mask is not None:
            st.valid = add(ref.key_validity, (att.mask, h))
        site = Site(builder=builder, x=h, q=att.q, k=att.k, scale=att.scale, bias=current_mask_arg(block),
                    valid=st.valid, size=st.size, num_protected=num_p, plan=bp, block=block)
        emitted = method.emit(settings.opts, site)
        slot, weight, rep = emitted.slot, emitted.weight, emitted.rep
        applied = add(tr.apply_plan.default, (h, slot, weight, st.size, bp.tokens_out))
        x_new = add(operator.getitem, (applied, 0))
        size_new = add(operator.getitem, (applied, 1))
        if st.valid is not None:
            st.valid = add(ref.compose_index, (st.valid, rep))
        st.rep = add(ref.compose_index, (st.rep, rep)) if st.rep is not None else rep
        if settings.unmerge:
            source = st.source if st.source is not None else add(ref.init_source, (h,))
            st.source = add(ref.compose_index, (slot, source))
        h.replace_all_uses_with(x_new, delete_user_cb=builder.is_outside)
        st.size = size_new
        st.epoch += 1
        result.rewrites += 1
        result.changed = True
    return result


def current_mask_arg(block: Block) -> fx.Node | None:
    """The mask the block's attention uses now (after any rewrite), for scores that must match it."""
    att = block.attention
    if att.kind == "sdpa":
        node = att.node
        m = args_of(node)[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        return m if isinstance(m, fx.Node) else None
    if att.mask_add is not None:
        a, b = args_of(att.mask_add)[0], args_of(att.mask_add)[1]
        return b if reaches_matmul(a) is not None else a  # type: ignore[return-value]
    sm_in = args_of(att.node)[0]
    if isinstance(sm_in, fx.Node) and sm_in.meta.get("tokenreduce") and sm_in.target is torch.ops.aten.add.Tensor:
        return args_of(sm_in)[1]  # type: ignore[return-value]
    return None

