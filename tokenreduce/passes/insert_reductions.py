"""Insert score -> plan -> apply at every planned block and thread the token state through later blocks.

One pass, because the two jobs depend on each other in block order: block j's attention needs the mask
and `log(size)` bias left by the reductions before it, and an EViT score at block j must use exactly that
bias. Walking the blocks once in order keeps that true by construction.

For a reducing block the pass adds, right after the block's reduction point (`h`):

    slot, weight, rep = method.emit(options, site)   # e.g. ToMe: tokenreduce.tome_plan(k, r, P, valid)
    x', size' = tokenreduce.apply_plan(h, slot, weight, size, N')   # or, for a dense plan [B, N', N]
                                                                     # (Token Transforming): apply_matrix
    valid' = valid[rep];  rep_total' = rep_total[rep];  source' = slot[source]

and every later use of `h` reads `x'`. For every attention after a reduction it replaces the mask with the
original mask gathered along both token axes by `rep_total` and, with proportional attention, with
`where(mask, log(size), min)` (SDPA `attn_mask`, or an add before the softmax of explicit attention).

Per-token side inputs (`Block.side_inputs`: rotary cos/sin tables, relative-position biases, position ids)
of every block after a reduction are gathered the same way, along each of their token axes, by
`rep_total`: a merged token takes its representative's position (docs/methods.md, "Side inputs under
reduction"). Only the block's own uses are rewired. A table covering the tokens after a prefix (EVA-02
rotates the patch tokens, not CLS: `q[:, :, 1:] * cos`) is gathered by the slots after that prefix, which
must be protected tokens (they keep their leading slots). Refuses (TokenReduceError naming the node) a side
input whose token axis has neither the original token count nor that count minus a protected prefix.

A method whose batches pad rows with empty slots (`pads_slots`, DyMU: each row keeps its own count, rows
are padded with size-0 slots that `log(size)` masks in every block) also gets, after the last reduction, every
mean / sum / amax / amin over the token axis (pooling: timm `x[:, P:].mean(1)`, HF DINOv2's patch mean) taken
over the row's own slots (`pool_own_slots`), and every attention after a reduction that no log(size) bias masks
(a block the method does not reduce, such as an attention-pooling head, or an SDPA outside the analysed blocks)
masked on the empty slots (`own_slot_keys`), so no padded slot reaches a real token or a pooled output. A tensor whose axis 1 has the original
token count, or that count minus at most the protected prefix, reached from the last reduction, carries
the token axis.

Shapes are not touched here: `fix_token_shapes` re-propagates them afterwards.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from tokenreduce.analysis.encoder import Block, SideInput
from tokenreduce.errors import TokenReduceError
from tokenreduce.ir.graph import Builder, args_of, call, descendants, module_path, reaches_matmul
from tokenreduce.kernels import ops as _ops  # noqa: F401  (registers torch.ops.tokenreduce)
from tokenreduce.kernels import reference as ref
from tokenreduce.methods import registry
from tokenreduce.methods.base import Site
from tokenreduce.passes.common import EncoderContext, PassResult

tr = torch.ops.tokenreduce
aten = torch.ops.aten
BROADCASTING = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.where.self,
                aten.mul_.Tensor, aten.add_.Tensor}  # users that broadcast a table against [B, H, N, d]


def gather_side_input(t: torch.Tensor, rep: torch.Tensor, axis: int, offset: int, rank: int) -> torch.Tensor:
    """`t` gathered along its token axis `axis` (negative) by the slots' original positions `rep [B, N']`.

    `offset`: `t` covers original positions `offset..` only (slots `offset..` of the reduced sequence,
    whose leading `offset` slots are protected and never move). `rank`: leading size-1 axes are added up
    to it first, so a batchless table (`[N, d]`, broadcast against `[B, H, N, d]`) gets its batch axis in
    front, where the per-sample order belongs. Returns `[B, ..., N' - offset, ...]`.
    """
    while t.dim() < rank:
        t = t.unsqueeze(0)
    index = rep[:, offset:] - offset if offset else rep
    bsz, lead = rep.shape[0], t.shape[0]
    if lead != 1 and lead != bsz:
        # batch and heads folded into one axis ([B*H, N, N]: DeBERTa's relative-position index for its bmm
        # layout), sample-major as `view(B, H, ..) -> view(B*H, ..)` makes it: gather per sample, fold back
        folded = t.reshape(bsz, lead // bsz, *t.shape[1:])
        out = ref.gather_tokens(folded, index, folded.dim() + axis)
        return out.reshape(lead, *out.shape[2:])
    return ref.gather_tokens(t, index, t.dim() + axis)


def fill_validity(condition: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`[B, N]` key validity from a `masked_fill` condition `[.., Nq|1, N]` (True = filled, i.e. masked)."""
    return ref.key_validity(~condition, like)


def _padding_fill(block: Block) -> fx.Node | None:
    """The boolean condition of a `masked_fill` on the block's logits, when it masks keys per sample
    (padding), else None."""
    for mod in block.attention.score_mods:
        val = mod.operand.meta.get("val") if mod.operand is not None else None
        if mod.kind == "masked_fill" and isinstance(val, torch.Tensor) and val.dtype == torch.bool and val.dim() >= 2:
            return mod.operand
    return None


def unfold_heads(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """q or k in a bmm layout `[B*H, N, d]` as `[B, H, N, d]` (the layout methods score on); `x [B, N, C]`
    gives the batch."""
    return t.reshape(x.shape[0], -1, t.shape[-2], t.shape[-1])


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


def _side_input_rank(side: SideInput, t: torch.Tensor) -> int:
    """Rank the gathered table needs: that of its broadcasting users' outputs when larger than its own."""
    ranks = [u.meta["val"].dim() for u in side.users
             if u.target in BROADCASTING and isinstance(u.meta.get("val"), torch.Tensor)]
    return max([t.dim(), *ranks])


def _gather_side_inputs(block: Block, graph: fx.Graph, ctx: EncoderContext, cache: dict) -> int:
    """Rewire the block's side inputs to their copies gathered by `rep_total`; returns how many."""
    st, n0, num_p = ctx.state, ctx.original_tokens, ctx.analysis.num_protected
    done = 0
    for side in block.side_inputs:
        t = side.node.meta.get("val")
        order = _order(graph)
        # a use before the current representative map belongs to an earlier block (the walk up from this
        # block's q/k/v can reach the previous block's logits): it keeps the table it had
        users = [u for u in _block_users(block, side)
                 if order(u) > order(st.rep) and u.target is not gather_side_input]  # never our own gathers
        if not isinstance(t, torch.Tensor) or not users:
            continue
        key = (st.epoch, side.node, side.axes)
        if key not in cache:
            rank = _side_input_rank(side, t)
            first = min(users, key=order)
            g = side.node
            with graph.inserting_before(first):
                for axis in side.axes:
                    size = t.shape[axis]
                    offset = n0 - int(size)
                    if not 0 <= offset <= num_p:
                        where = module_path(first)
                        raise TokenReduceError(
                            f"{side.kind} side input {side.node.name} of {block.name} "
                            f"({where[-1] if where else 'the model'}) has {size} positions on its token axis "
                            f"{axis}, but the sequence has {n0} tokens with {num_p} protected; tokenreduce can "
                            "gather a per-token table only over all tokens or the tokens after a protected prefix",
                            hint="protected_tokens=<the length of the prefix the table leaves out>")
                    g = call(graph, gather_side_input, (g, st.rep, axis, offset, rank), first)
            cache[key] = g
        for u in users:
            u.replace_input_with(side.node, cache[key])
        done += 1
    return done


def _block_users(block: Block, side: SideInput) -> list[fx.Node]:
    """The uses of the side input on this block's q/k/v paths: those the analysis listed, and any other use
    the q, k or v operand is computed from (a table shared by q and k, or by every block, is rewired only
    where this block reads it)."""
    att = block.attention
    near: set[fx.Node] = set()
    frontier = [att.q, att.k, att.v]
    for _ in range(16):  # levels up from the operands: a rotation sits a few ops above q/k
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in near and a is not side.node]
        near.update(frontier)
    found = [u for u in side.node.users if u in near or u in side.users]
    return [u for u in found if side.node in u.all_input_nodes]


def _reduce_masked_fill(block: Block, graph: fx.Graph, ctx: EncoderContext, cache: dict) -> int:
    """Gather the condition of every `masked_fill` on the block's logits (DeBERTa masks by `masked_fill`,
    not by an add) along both token axes by `rep_total`, as an additive mask is."""
    st, done = ctx.state, 0
    for mod in block.attention.score_mods:
        if mod.kind != "masked_fill" or mod.operand is None:
            continue
        key = (st.epoch, mod.operand)
        for node in mod.nodes:
            if mod.operand not in node.all_input_nodes:
                continue
            if key not in cache:
                with graph.inserting_before(node):
                    cache[key] = call(graph, ref.reduce_mask, (mod.operand, st.rep, ctx.original_tokens), node)
            node.replace_input_with(mod.operand, cache[key])
            done += 1
    return done


def _order(graph: fx.Graph):  # type: ignore[no-untyped-def]
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index[n]


POOLS = {aten.mean.dim: "mean", aten.sum.dim_IntList: "sum", aten.amax.default: "amax", aten.amin.default: "amin"}


def pool_own_slots(t: torch.Tensor, op: str, dims: list[int], keepdim: bool, size: torch.Tensor,
                   offset: int) -> torch.Tensor:
    """`t.<op>(dims, keepdim)` (op: mean, sum, amax, amin) where axis 1 (in `dims`) is the token axis of slots
    `offset..` of the final token state: an empty slot (`size [B, N']` == 0, a padded slot) is left out, so
    each row pools exactly its own slots. Other dims in `dims` are reduced afterwards as `op` does."""
    own = (size[:, offset:] > 0).reshape(size.shape[0], -1, *([1] * (t.dim() - 2)))
    if op in ("mean", "sum"):
        total = torch.where(own, t, torch.zeros_like(t)).sum(dim=1, keepdim=True)
        out = total / own.sum(dim=1, keepdim=True).to(t.dtype) if op == "mean" else total
    else:
        fill = torch.full_like(t, -torch.inf if op == "amax" else torch.inf)
        out = getattr(torch.where(own, t, fill), op)(dim=1, keepdim=True)
    rest = [d for d in dims if d != 1]
    if rest:
        out = getattr(out, op)(dim=rest, keepdim=True)
    return out if keepdim else out.squeeze(dims)


def own_slot_keys(size: torch.Tensor, mask: torch.Tensor | None, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """An SDPA mask over keys `offset..` of the final token state with the empty (padded) slots at -inf, added to
    the attention's own mask if it has one."""
    bias = torch.where(size[:, offset:] > 0, 0.0, -torch.inf).to(dtype)[:, None, None, :]
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, torch.full_like(bias, -torch.inf))
    return mask.to(dtype) + bias


def _token_offset(node: object, n0: int, num_p: int) -> int | None:
    """How many leading slots a tensor `[B, N' - offset, ...]` leaves out of the token state (None: its axis 1
    is not the token axis)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return None
    offset = n0 - int(val.shape[1])
    return offset if 0 <= offset <= num_p else None


def _pool_own_slots(graph: fx.Graph, ctx: EncoderContext, last: fx.Node) -> int:
    """After the last reduction: pool over the row's own slots, mask empty slots as keys of attention that is no
    analysed block's (the blocks' own are masked in block order)."""
    n0, num_p, size = ctx.original_tokens, ctx.analysis.num_protected, ctx.state.size
    blocks = {b.attention.node for b in ctx.analysis.blocks}
    after = descendants([last])
    done = 0
    for node in [n for n in graph.nodes if n in after]:
        args = args_of(node)
        if node.target in POOLS:
            t, dims = args[0], args[1] if len(args) > 1 else node.kwargs.get("dim")
            keepdim = bool(args[2] if len(args) > 2 else node.kwargs.get("keepdim", False))
            offset = _token_offset(t, n0, num_p)
            if offset is None or not dims:
                continue
            rank = t.meta["val"].dim()  # type: ignore[union-attr]
            dims = sorted(d % rank for d in dims)  # type: ignore[union-attr]
            if 1 not in dims:
                continue
            with graph.inserting_before(node):
                new = call(graph, pool_own_slots, (t, POOLS[node.target], dims, keepdim, size, offset), node)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            done += 1
        elif node.target is aten.scaled_dot_product_attention.default and node not in blocks:
            mask = args[3] if len(args) > 3 else node.kwargs.get("attn_mask")
            if (new_mask := _own_slot_mask(graph, node, args[1], mask, n0, num_p, size)) is not None:
                _set_sdpa_mask(node, new_mask)
                done += 1
    return done


def _own_slot_mask(graph: fx.Graph, before: fx.Node, k: object, mask: object, n0: int, num_p: int,
                   size: fx.Node | None) -> fx.Node | None:
    """An `own_slot_keys` node for an attention whose keys `k [B, H, N' - offset, d]` are token slots (None: they
    are not; a `[B*H, N, d]` layout would need its own mask layout, and no known model pools so)."""
    val = k.meta.get("val") if isinstance(k, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() != 4 or not 0 <= n0 - int(val.shape[-2]) <= num_p:
        return None
    with graph.inserting_before(before):
        return call(graph, own_slot_keys, (size, mask, n0 - int(val.shape[-2]), val.dtype), before)


def _set_sdpa_mask(node: fx.Node, mask: fx.Node) -> None:
    args, kwargs = list(args_of(node)), dict(node.kwargs)
    if len(args) > 3:
        args[3] = mask
    else:
        kwargs["attn_mask"] = mask
    node.args, node.kwargs = tuple(args), kwargs


def insert_reductions(gm: fx.GraphModule, ctx: EncoderContext) -> PassResult:
    result = PassResult("insert_reductions", changed=False)
    settings = ctx.settings
    method = registry.encoder(settings.method)
    if not method.moves_tokens or not any(p.reduces for p in ctx.plans):
        return result  # (a method that keeps the tokens, TempScale, rewrites its blocks in its own pass)
    graph = gm.graph
    st = ctx.state
    cache: dict = {}
    last: fx.Node | None = None  # the last reduction's output
    pads = method.pads_slots
    num_p = ctx.analysis.num_protected
    side_cache: dict = {}
    for block, bp in zip(ctx.analysis.blocks, ctx.plans):
        if st.epoch > 0 and block.side_inputs:
            result.rewrites += _gather_side_inputs(block, graph, ctx, side_cache)
        if st.epoch > 0:
            result.rewrites += _reduce_masked_fill(block, graph, ctx, side_cache)
        if block.reducible and st.epoch > 0:
            new_mask = _attention_bias(block, graph, ctx, cache)
            if new_mask is not block.attention.mask:
                _set_attention_mask(block, new_mask, graph, ctx)
                result.rewrites += 1
        elif st.epoch > 0 and pads:  # a block no method reduces (attention pooling) gets no log(size) bias
            att = block.attention
            before = att.node if att.kind == "sdpa" else (att.mask_add or att.node)
            if (own := _own_slot_mask(graph, before, att.k, att.mask, ctx.original_tokens, num_p, st.size)) is not None:
                _set_attention_mask(block, own, graph, ctx)
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
        elif st.epoch == 0 and (fill := _padding_fill(block)) is not None:
            st.valid = add(fill_validity, (fill, h))
        q, k = att.q, att.k
        if q.meta["val"].dim() == 3:  # bmm layout [B*H, N, d]: the methods score on [B, H, N, d]
            q, k = add(unfold_heads, (q, h)), add(unfold_heads, (k, h))
        site = Site(builder=builder, x=h, q=q, k=k, scale=att.scale, bias=current_mask_arg(block),
                    valid=st.valid, size=st.size, num_protected=num_p, plan=bp, block=block)
        emitted = method.emit(settings.opts, site)
        slot, weight, rep = emitted.slot, emitted.weight, emitted.rep
        if emitted.matrix is not None:  # a dense many-to-many plan [B, N', N]: one batched matmul
            applied = add(ref.apply_matrix, (h, emitted.matrix, st.size))
        else:
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
        last = x_new
    if last is not None and pads:
        result.rewrites += _pool_own_slots(graph, ctx, last)
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

