"""The compile pipelines: analyse -> the method plans -> named pass lists -> report.

`reduce_graph` is shared by `tokenreduce.compile` and the Dynamo backend: it takes a captured ATen graph
and returns it rewritten, with the plan and per-pass results, so both entry points behave identically.
`reduce_prefill` is the decoder prefill pipeline (`tokenreduce.reduce_decoder`). Both run through the one
pass manager (`passes/manager.py`: timing, `$TOKENREDUCE_DUMP_GRAPHS`, one cleanup) and build the one
`Report`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import fx

from tokenreduce.analysis.decoder import DecoderAnalysis, analyse_decoder
from tokenreduce.analysis.denoiser import analyse_denoiser
from tokenreduce.analysis.encoder import ModelAnalysis, analyse
from tokenreduce.compiler.report import BlockReport, Report
from tokenreduce.errors import TokenReduceError
from tokenreduce.methods import registry
from tokenreduce.methods.base import BlockPlan, Stage
from tokenreduce.methods.settings import Settings
from tokenreduce.passes.common import DecoderContext, EncoderContext, PassResult
from tokenreduce.passes.emit_kv_cache import emit_kv_cache
from tokenreduce.passes.fix_token_shapes import TokenShapeError, fix_token_shapes
from tokenreduce.passes.fuse_attention_scores import fuse_attention_scores
from tokenreduce.passes.insert_reductions import insert_reductions
from tokenreduce.passes.manager import Pass, run_passes
from tokenreduce.passes.merge_sublayers import merge_sublayers
from tokenreduce.passes.prune_decoder_tokens import prune_decoder_tokens
from tokenreduce.passes.scale_attention_logits import scale_attention_logits
from tokenreduce.passes.unmerge_outputs import unmerge_outputs

ENCODER_PASSES: list[tuple[str, Pass]] = [
    ("insert_reductions", insert_reductions),
    ("fix_token_shapes", fix_token_shapes),
    ("unmerge_outputs", unmerge_outputs),
    ("scale_attention_logits", scale_attention_logits),  # TempScale: no token moves
    ("fuse_attention_scores", fuse_attention_scores),  # GPU graphs only
]

# Denoisers (tomesd): sublayers run on merged tokens inside each block; the grid between blocks stays whole.
DENOISER_PASSES: list[tuple[str, Pass]] = [
    ("merge_sublayers", merge_sublayers),
    ("fix_token_shapes", fix_token_shapes),
]

DECODER_PASSES: list[tuple[str, Pass]] = [
    ("prune_decoder_tokens", prune_decoder_tokens),
    ("fuse_attention_scores", fuse_attention_scores),  # GPU graphs only: FastV-style score + SDPA in one kernel
    ("emit_kv_cache", emit_kv_cache),
    ("fix_token_shapes", fix_token_shapes),
]


@dataclass
class Reduced:
    gm: fx.GraphModule
    analysis: ModelAnalysis
    plans: list[BlockPlan]
    results: list[PassResult]


def refuse_before_windows(analysis: ModelAnalysis, mixes_tokens: bool) -> None:
    """Sliding-window attention and token reduction (docs/methods.md, "Side inputs under reduction").

    After a reduction every token keeps its representative's original position, and a windowed block's
    mask is gathered by those positions, so each token still sees the keys whose positions lie in its
    window. For pruning (kept tokens are original tokens) that is exactly the unreduced attention over the
    kept keys. A merged or fused token, though, mixes tokens from anywhere in the sequence: at a later
    windowed block it would carry content from outside the window of every token that sees it. So a method
    that mixes tokens may not reduce before the last windowed block; those blocks get a skip reason naming
    the windowed block. Reducing at the last windowed block itself is fine (its own attention runs on the
    tokens before the reduction)."""
    windowed = [b for b in analysis.blocks if b.attention.window is not None]
    if not mixes_tokens or not windowed:
        return
    last = windowed[-1]
    for b in analysis.blocks:
        if b.index < last.index and b.reducible:
            b.skip_reason = (
                f"a later block ({last.index}, {last.name}) uses sliding-window attention (window "
                f"{last.attention.window}); a merged token mixes tokens of different windows, so merging before it "
                f"would let tokens see past their window; reduce from block {last.index} on, or prune without "
                "fusing (evit with fuse=False)")


def snapshot(graph: fx.Graph) -> fx.Graph:
    """A copy of the graph's nodes (metadata dicts copied, values shared; no weights), to restore or probe."""
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    new._codegen = copy.deepcopy(graph._codegen)
    return new


def blocks_that_cannot_shrink(gm: fx.GraphModule, settings: Settings, analysis: ModelAnalysis) -> dict[int, str]:
    """Reducible blocks whose reduction the graph cannot follow, with why (block index -> skip reason).

    Probes on copies of the graph: one ToMe merge at every reducible block, then the shape pass. A node
    that fails on the changed token count (PVT-v2's MLP reshapes its tokens into the H x W grid of a
    depthwise convolution) is reached by every reduction before it in graph order; those blocks are
    refused and the probe runs again without them, until it goes through. Only run when a plan failed, so
    a model that compiles pays nothing for it."""
    refused: dict[int, str] = {}
    tome = registry.encoder("tome")
    probe_settings = Settings.from_options({"method": "tome", "r": 1, "clamp_r": True,
                                            "protected_tokens": settings.protected_tokens})
    for _ in range(len(analysis.blocks)):
        probe = fx.GraphModule(gm, snapshot(gm.graph))  # shares the weights; passes only touch the graph
        pa = analyse(probe, settings.protected_tokens)
        for b, orig in zip(pa.blocks, analysis.blocks):
            b.skip_reason = refused.get(b.index, orig.skip_reason)
        plans = tome.plan_blocks(probe_settings.opts, pa)
        if not any(p.reduces for p in plans):
            break
        n0 = next((b.num_tokens for b in pa.blocks if b.reducible), 0)
        ctx = EncoderContext(settings=probe_settings, analysis=pa, plans=plans, original_tokens=n0)
        try:
            run_passes("probe", ENCODER_PASSES[:2], probe, ctx)
        except TokenShapeError as exc:
            order = {n.name: i for i, n in enumerate(probe.graph.nodes)}
            at = order.get(exc.node, len(order))
            hit = [b for b, p in zip(pa.blocks, plans) if p.reduces and b.reduce_at is not None
                   and order.get(b.reduce_at.name, at) < at]
            if not hit:
                break
            for b in hit:
                refused[b.index] = f"its token count cannot change: {exc.message}"
            continue
        break
    return refused


def _skip_blocks_that_cannot_shrink(gm: fx.GraphModule, settings: Settings, analysis: ModelAnalysis) -> bool:
    """Give every block whose token count cannot change its skip reason; False when there is none."""
    refused = blocks_that_cannot_shrink(gm, settings, analysis)
    for b in analysis.blocks:
        b.skip_reason = refused.get(b.index, b.skip_reason)
    return bool(refused)


def reduce_denoiser(gm: fx.GraphModule, settings: Settings) -> Reduced:
    """A denoiser method (placement "denoiser", tomesd): its own analysis and pass list."""
    method = registry.encoder(settings.method)
    analysis = analyse_denoiser(gm)
    plans = method.plan_blocks(settings.opts, analysis)
    results = run_passes("denoiser", DENOISER_PASSES, gm, EncoderContext(settings, analysis, plans, 0))
    return Reduced(gm, analysis, plans, results)


def reduce_graph(gm: fx.GraphModule, settings: Settings) -> Reduced:
    method = registry.encoder(settings.method)
    if method.placement == "denoiser":
        return reduce_denoiser(gm, settings)
    analysis = analyse(gm, settings.protected_tokens)
    refuse_before_windows(analysis, method.merges or bool(getattr(settings.opts, "fuse", False)))
    try:
        plans = method.plan_blocks(settings.opts, analysis)
    except TokenReduceError:
        # a too-large setting names the largest valid value: make sure it counts only blocks that can shrink
        if not _skip_blocks_that_cannot_shrink(gm, settings, analysis):
            raise
        plans = method.plan_blocks(settings.opts, analysis)
    if not any(p.reduces for p in plans):
        return Reduced(gm, analysis, plans, [])
    captured = snapshot(gm.graph)
    n0 = next((b.num_tokens for b in analysis.blocks if b.reducible), 0)
    try:
        results = run_passes("encoder", ENCODER_PASSES, gm, EncoderContext(settings, analysis, plans, n0))
    except TokenShapeError:
        # a block's token count cannot change (a token grid after it): restore the captured graph, refuse
        # those blocks with the reason, and plan and rewrite again
        gm.graph = captured
        gm.recompile()
        analysis = analyse(gm, settings.protected_tokens)
        refuse_before_windows(analysis, method.merges or bool(getattr(settings.opts, "fuse", False)))
        if not _skip_blocks_that_cannot_shrink(gm, settings, analysis):
            raise
        plans = method.plan_blocks(settings.opts, analysis)
        n0 = next((b.num_tokens for b in analysis.blocks if b.reducible), 0)
        ctx = EncoderContext(settings, analysis, plans, n0)
        results = run_passes("encoder", ENCODER_PASSES, gm, ctx) if any(p.reduces for p in plans) else []
    return Reduced(gm, analysis, plans, results)


def make_report(red: Reduced, settings: Settings) -> Report:
    method = registry.encoder(settings.method)
    blocks = [BlockReport(bp.index, bp.name, bp.tokens_in, bp.tokens_out,
                          method.action(bp, red.analysis) if bp.reduces else "-", bp.reason) for bp in red.plans]
    return Report(
        method=settings.method,
        settings=settings.as_flat(),
        num_protected=red.analysis.num_protected,
        protected_reason=red.analysis.protected_reason,
        blocks=blocks,
        passes=[f"{r.name}: {r.rewrites} rewrites" for r in red.results],
        pass_seconds={r.name: r.seconds for r in red.results},
        notes=[n for r in red.results for n in r.notes],
    )


@dataclass
class ReducedPrefill:
    gm: fx.GraphModule
    analysis: DecoderAnalysis
    report: Report


def reduce_prefill(gm: fx.GraphModule, settings: Settings, span_size: int) -> ReducedPrefill:
    """Prune a captured decoder prefill graph (its `span` input marks the droppable tokens)."""
    method = registry.decoder(settings.method)
    analysis = analyse_decoder(gm)
    nb = len(analysis.blocks)
    stages = method.stages(settings.opts, nb, span_size)
    ctx = DecoderContext(settings=settings, analysis=analysis, stages=stages, span_size=span_size,
                         score_pool=method.score_pool(settings.opts))
    results = run_passes("decoder", DECODER_PASSES, gm, ctx)
    tokens = _tokens_per_block(analysis, stages, span_size)
    by_first = {s.first_reduced_block: s for s in stages}
    blocks = []
    for db, n in zip(analysis.blocks, tokens):
        s = by_first.get(db.index)
        action = f"{method.name} keep {s.keep} span tokens" if s is not None else "-"
        blocks.append(BlockReport(db.index, db.block.name, n, n, action))
    applied = settings.as_flat()
    applied["layers"] = list(method.layers(settings.opts, nb))
    if "keep_tokens" in applied and stages:
        applied["keep_tokens"] = stages[0].keep  # the default depends on the span
    report = Report(
        method=settings.method, settings=applied, blocks=blocks, num_tokens=analysis.num_tokens,
        span_tokens=span_size, stages=stages, skipped=analysis.skipped,
        passes=[f"{r.name}: {r.rewrites} rewrites" for r in results],
        pass_seconds={r.name: r.seconds for r in results}, notes=[n for r in results for n in r.notes])
    return ReducedPrefill(gm, analysis, report)


def _tokens_per_block(analysis: DecoderAnalysis, stages: list[Stage], span_size: int) -> list[int]:
    """Tokens each block runs on: all of them until the first stage, then the non-span tokens plus the
    stage's kept span tokens."""
    by_first = {s.first_reduced_block: s for s in stages}
    out, cur = [], analysis.num_tokens
    for db in analysis.blocks:
        if db.index in by_first:
            cur = analysis.num_tokens - span_size + by_first[db.index].keep
        out.append(cur)
    return out
