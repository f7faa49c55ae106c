"""The compile pipelines: analyse -> the method plans -> named pass lists -> report.

`reduce_graph` is shared by `tokenreduce.compile` and the Dynamo backend: it takes a captured ATen graph
and returns it rewritten, with the plan and per-pass results, so both entry points behave identically.
`reduce_prefill` is the decoder prefill pipeline (`tokenreduce.reduce_decoder`). Both run through the one
pass manager (`passes/manager.py`: timing, `$TOKENREDUCE_DUMP_GRAPHS`, one cleanup) and build the one
`Report`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from tokenreduce.analysis.decoder import DecoderAnalysis, analyse_decoder
from tokenreduce.analysis.encoder import ModelAnalysis, analyse
from tokenreduce.compiler.report import BlockReport, Report
from tokenreduce.methods import registry
from tokenreduce.methods.base import BlockPlan, Stage
from tokenreduce.methods.settings import Settings
from tokenreduce.passes.common import DecoderContext, EncoderContext, PassResult
from tokenreduce.passes.emit_kv_cache import emit_kv_cache
from tokenreduce.passes.fix_token_shapes import fix_token_shapes
from tokenreduce.passes.fuse_attention_scores import fuse_attention_scores
from tokenreduce.passes.insert_reductions import insert_reductions
from tokenreduce.passes.manager import Pass, run_passes
from tokenreduce.passes.prune_decoder_tokens import prune_decoder_tokens
from tokenreduce.passes.unmerge_outputs import unmerge_outputs

ENCODER_PASSES: list[tuple[str, Pass]] = [
    ("insert_reductions", insert_reductions),
    ("fix_token_shapes", fix_token_shapes),
    ("unmerge_outputs", unmerge_outputs),
    ("fuse_attention_scores", fuse_attention_scores),  # GPU graphs only
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


def reduce_graph(gm: fx.GraphModule, settings: Settings) -> Reduced:
    method = registry.encoder(settings.method)
    analysis = analyse(gm, settings.protected_tokens)
    plans = method.plan_blocks(settings.opts, analysis)
    n0 = next((b.num_tokens for b in analysis.blocks if b.reducible), 0)
    ctx = EncoderContext(settings=settings, analysis=analysis, plans=plans, original_tokens=n0)
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
