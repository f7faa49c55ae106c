"""Prune prefill tokens of a decoder (FastV, PyramidDrop, GemFilter, DivPrune, DART, VisionZip, SparseVLM,
VisionDrop) and carry positions and masks along.

Adds one graph input, `span [B, N]` bool (True = the token may be dropped: image tokens, or context the
user marked), and for every stage the method planned (`methods/fastv.py`, `pyramiddrop.py`, `gemfilter.py`):

    scores = tokenreduce.query_row_scores(q_L, k_L, mask_L, scale, -1)   # last query row, mean over heads
                                                                          # (capped_row_scores if soft-capped)
                                                                          # (window_scores: score_window > 1)
    scores = pool_scores(scores, w)                                       # only with score_pool=w > 1
    keep   = tokenreduce.keep_plan(scores, span_now, k, S)                # ascending indices, static length
    x'     = gather(x_first_reduced_block, keep)

A selection method (`methods/prefill.SelectionMethod`: DivPrune, DART, VisionZip) replaces the first two
lines: it emits its own `[B, N]` keep scores from the hidden states entering the stage's first pruned block
(`SelectionSite`: those hidden states, the span still present, and the scoring block's cached keys and
mask), and `keep_plan` turns them into the same kept indices. A method that reads the vision tower
(VisionZip) first gets its `VisionSite` (`vision_site`: the vision layer whose output features become the
span tokens); the features it returns (merged tokens) replace that layer's output for everything
downstream (projector, placeholder scatter), and its `[B, P]` patch scores become the span scores. A method
that merges inside the LLM (SparseVLM's recycled tokens, VisionDrop's contextual ones) also sets
`SelectionSite.merged`, the hidden states the kept tokens are gathered from instead of `x`.

Every block from the stage on then reads `x'`, and its per-token side inputs are gathered by the
composition of all keeps so far (`kept [B, M]`, original positions):

* every per-token side input of the block's q/k/v path along its token axes (rotary `cos`/`sin` along
  axis -2, mRoPE's too, since its 3-axis tables are combined before they reach q/k): a kept token keeps
  its original position, nothing is renumbered;
* the attention mask along both token axes, so causality, padding and a sliding window follow the
  original positions (a kept token's window is `window` original positions, not `window` kept tokens).

For GemFilter the ranking layer L comes *after* the first pruned block (block 0): the nodes computing
layer L's q and k from the embeddings are cloned, so the filter pass runs on all tokens and the original
blocks run on the kept ones. A stable topological sort puts the new nodes where they belong.

The pass records `kept` per block in `ctx.kept[block]` (None before the first stage) for the KV-cache
outputs. Shapes are left to `fix_token_shapes`.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._guards import detect_fake_mode

from tokenreduce.analysis.decoder import is_causal
from tokenreduce.analysis.encoder import analyse_block, find_attention
from tokenreduce.errors import TokenReduceError
from tokenreduce.ir.graph import Builder, call, nodes_between, reach, stable_toposort
from tokenreduce.kernels import decoder_ops as _dops  # noqa: F401  (registers keep_plan, capped_row_scores)
from tokenreduce.kernels import ops as _ops  # noqa: F401
from tokenreduce.kernels import reference as ref
from tokenreduce.kernels.plans import pool_scores
from tokenreduce.methods import registry
from tokenreduce.methods.prefill import (
    PrefillMethod,
    SelectionMethod,
    SelectionSite,
    VisionSite,
    eager_scores_input,
    last_query_scores,
)
from tokenreduce.passes.common import DecoderContext, PassResult

tr = torch.ops.tokenreduce


def _clone_path(graph: fx.Graph, sources: list[fx.Node], targets: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Copy every node on a path from `sources` to `targets` (sources themselves are shared)."""
    between = nodes_between(sources, targets)
    on_path = [n for n in graph.nodes if n in between and n not in sources]
    env: dict[fx.Node, fx.Node] = {}
    anchor = targets[-1]
    for n in on_path:
        with graph.inserting_after(anchor):
            c = graph.node_copy(n, lambda a: env.get(a, a))
        c.meta["tokenreduce"] = True
        c.meta["tokenreduce_clone_of"] = n.name
        env[n] = c
        anchor = c
    return env


def prune_decoder_tokens(gm: fx.GraphModule, ctx: DecoderContext) -> PassResult:
    result = PassResult("prune_decoder_tokens", changed=False)
    blocks = ctx.analysis.blocks
    ctx.kept = [None] * len(blocks)
    if not ctx.stages:
        return result
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        span = graph.placeholder("span")
    x0 = blocks[0].block.x_in
    assert x0 is not None
    fake_mode = detect_fake_mode([p.meta.get("val") for p in placeholders])
    assert fake_mode is not None, "captured graphs carry fake values (capture.py)"
    x0_val = x0.meta["val"]
    with fake_mode:
        span.meta["val"] = torch.empty(x0_val.shape[:2], dtype=torch.bool, device=x0_val.device)
    ctx.span = span
    by_first = {s.first_reduced_block: s for s in ctx.stages}
    droppable: fx.Node = span
    num_droppable = ctx.span_size
    kept: fx.Node | None = None
    gathered: dict[tuple[fx.Node, fx.Node], fx.Node] = {}
    mask_now: dict[int, fx.Node] = {}  # block -> its gathered mask

    def gather(node: fx.Node, index: fx.Node, dim: int, like: fx.Node) -> fx.Node:
        key = (node, index)
        if key not in gathered:
            with graph.inserting_after(node if node.op != "placeholder" else placeholders[-1]):
                gathered[key] = call(graph, ref.gather_tokens, (node, index, dim), like)
        return gathered[key]

    method = registry.decoder(ctx.settings.method)
    for db in blocks:
        stage = by_first.get(db.index)
        if stage is not None and isinstance(method, SelectionMethod) and method.selects_at(stage):
            h = db.block.x_in
            assert h is not None
            score_db = blocks[stage.score_block]
            b = Builder(graph, h, like=db.attention.node)
            site = SelectionSite(b, h, droppable, num_droppable, stage.keep,
                                 score_db.kv[0] if score_db.kv is not None else None,
                                 mask_now.get(stage.score_block, score_db.attention.mask))
            site.attention, site.embeddings, site.span, site.kept = score_db.attention, x0, span, kept
            eager = [p for p in placeholders if eager_scores_input(p)]
            if method.needs_vision and eager:  # scored (and merged) where the vision tower ran eagerly: Qwen2-VL
                site.patch_scores = eager[0]
            elif method.needs_vision:
                vsite = vision_site(gm, h, num_droppable)
                merged, site.patch_scores = method.emit_vision(ctx.settings.opts, vsite, stage.keep)
                result.notes.extend(vsite.notes)
                vsite.features.replace_all_uses_with(merged, delete_user_cb=vsite.builder.is_outside)
            scores = method.emit_scores(ctx.settings.opts, site)
            keep = b.add(tr.keep_plan.default, (scores, droppable, stage.keep, num_droppable))
            x_new = b.add(ref.gather_tokens, (h if site.merged is None else site.merged, keep, 1))
            h.replace_all_uses_with(x_new, delete_user_cb=b.is_outside)
            droppable = b.add(ref.gather_tokens, (droppable, keep, 1))
            kept = b.add(ref.compose_index, (kept, keep)) if kept is not None else keep
            num_droppable = stage.keep
            result.rewrites += 1
        elif stage is not None:
            scorer = blocks[stage.score_block].attention
            # the mask the scoring block's attention reads now (gathered if that block already runs pruned)
            q, k, mask = scorer.q, scorer.k, mask_now.get(stage.score_block, scorer.mask)
            h = db.block.x_in
            assert h is not None
            clones: dict[fx.Node, fx.Node] = {}
            if stage.score_block >= db.index:  # GemFilter: rank with a filter pass over all tokens
                clones = _clone_path(graph, [h], [q, k])
                q, k = clones.get(q, q), clones.get(k, k)
            window = method.score_window(ctx.settings.opts) if isinstance(method, PrefillMethod) else 1
            with graph.inserting_after(k):  # capped_row_scores if soft-capped; window_scores if score_window > 1
                scores = last_query_scores(graph, scorer, q, k, mask, window)
            if ctx.score_pool > 1:
                with graph.inserting_after(scores):
                    scores = call(graph, pool_scores, (scores, ctx.score_pool), scorer.node)
            with graph.inserting_after(scores):
                keep = call(graph, tr.keep_plan.default, (scores, droppable, stage.keep, num_droppable), scorer.node)
            with graph.inserting_after(keep):
                x_new = call(graph, ref.gather_tokens, (h, keep, 1), h)
            skip = set(clones.values()) | {x_new}
            h.replace_all_uses_with(x_new, delete_user_cb=_outside(skip))
            with graph.inserting_after(x_new):
                droppable = call(graph, ref.gather_tokens, (droppable, keep, 1), h)
            with graph.inserting_after(droppable):
                kept = call(graph, ref.compose_index, (kept, keep), h) if kept is not None else keep
            num_droppable = stage.keep
            result.rewrites += 1
        ctx.kept[db.index] = kept
        if kept is None:
            continue
        att = db.attention
        for side, axes, users in db.side_inputs():
            g = side
            for axis in axes:
                g = gather(g, kept, axis % side.meta["val"].dim(), att.node)
            for user in users:
                if user is not g:
                    user.replace_input_with(side, g)
        if att.mask is not None:
            key = (att.mask, kept)
            if key not in gathered:
                with graph.inserting_after(kept):
                    gathered[key] = call(graph, ref.reduce_mask, (att.mask, kept, ctx.analysis.num_tokens), att.node)
            consumer = att.mask_add if att.kind != "sdpa" and att.mask_add is not None else att.node
            consumer.replace_input_with(att.mask, gathered[key])
            mask_now[db.index] = gathered[key]
        result.rewrites += 1
    stable_toposort(graph)
    result.changed = True
    return result


def vision_site(gm: fx.GraphModule, x0: fx.Node, span: int) -> VisionSite:
    """The vision layer whose output features become the span tokens (LLaVA: the layer `vision_feature_layer`
    names): the last bidirectional attention the LLM's input embeddings are computed from, and its block's
    output (the residual add after the MLP). Refuses graphs without one (Qwen2-VL's vision encoder runs
    eagerly, outside the graph), other block layouts, and features that are not one image of `span`
    patches plus a CLS token per row."""
    up = set(reach([x0], "all_input_nodes", None))
    atts = [a for a in find_attention(gm) if not is_causal(a) and a.node in up]
    if not atts:
        raise TokenReduceError("this method reads the vision tower's attention, but no bidirectional attention in the "
                               "captured prefill feeds the LLM's input embeddings (a text model, or a VLM whose vision "
                               "encoder runs eagerly outside the graph and that this method does not hook)",
                               setting="method")
    att = atts[-1]
    blk = analyse_block(0, att)
    outs = [u for u in (blk.residual_add.users if blk.residual_add is not None else ())
            if u.target is torch.ops.aten.add.Tensor and u in up]
    if blk.layout != "pre-ln" or len(outs) != 1:
        raise TokenReduceError(f"the vision layer feeding the LLM ({att.spelling or att.kind} attention) is not a pre-LN "
                               "block with one residual output; only CLIP-style vision towers are supported",
                               setting="method")
    feats = outs[0]
    fshape, xshape = tuple(feats.meta["val"].shape), tuple(x0.meta["val"].shape)
    if len(fshape) != 3 or fshape[0] != xshape[0] or fshape[1] != span + 1:
        raise TokenReduceError(
            f"the vision features are {list(fshape)} for {xshape[0]} prompts with {span} image tokens each; this "
            "method needs one image per prompt whose patches are its image tokens, plus a CLS token (LLaVA with "
            "vision_feature_select_strategy='default')", setting="method")
    return VisionSite(Builder(gm.graph, feats, like=att.node), feats, att)


def _outside(nodes: set[fx.Node]):  # type: ignore[no-untyped-def]
    """A `replace_all_uses_with` filter: rewrite every user except `nodes`."""
    return lambda user: user not in nodes
