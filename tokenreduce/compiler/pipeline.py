"""The compile pipeline: capture -> analyse -> plan -> passes -> report. One explicit ordered pass list.

`reduce_graph` is shared by `tokenreduce.compile` and the Dynamo backend: it takes a captured ATen graph
and returns it rewritten, with the plan and per-pass results, so both entry points behave identically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import fx

from tokenreduce.analysis.encoder import ModelAnalysis, analyse
from tokenreduce.compiler.planner import BlockPlan, plan
from tokenreduce.compiler.report import BlockReport, Report
from tokenreduce.compiler.settings import DECODER_METHODS, Settings
from tokenreduce.errors import TokenReduceError
from tokenreduce.passes.common import PassContext, PassResult
from tokenreduce.passes.fix_token_shapes import fix_token_shapes
from tokenreduce.passes.fuse_attention_scores import fuse_attention_scores
from tokenreduce.passes.insert_reductions import insert_reductions
from tokenreduce.passes.unmerge_outputs import unmerge_outputs

log = logging.getLogger("tokenreduce")

PASSES: list[tuple[str, Callable[[fx.GraphModule, PassContext], PassResult]]] = [
    ("insert_reductions", insert_reductions),
    ("fix_token_shapes", fix_token_shapes),
    ("unmerge_outputs", unmerge_outputs),
    ("fuse_attention_scores", fuse_attention_scores),
]


@dataclass
class Reduced:
    gm: fx.GraphModule
    analysis: ModelAnalysis
    plans: list[BlockPlan]
    results: list[PassResult]


def require_encoder_method(settings: Settings) -> None:
    if settings.method in DECODER_METHODS:
        raise TokenReduceError(f"{settings.method} prunes the prefill of a decoder LLM/VLM; use "
                               f"tokenreduce.reduce_decoder(model, method={settings.method!r}, ...) instead")


def reduce_graph(gm: fx.GraphModule, settings: Settings) -> Reduced:
    require_encoder_method(settings)
    analysis = analyse(gm, settings.protected_tokens)
    plans = plan(settings, analysis, clamp_r=settings.clamp_r)
    n0 = next((b.num_tokens for b in analysis.blocks if b.reducible), 0)
    ctx = PassContext(settings=settings, analysis=analysis, plans=plans, original_tokens=n0)
    results = []
    if any(p.reduces for p in plans):
        for name, fn in PASSES:
            res = fn(gm, ctx)
            log.debug("pass %s: changed=%s rewrites=%d", name, res.changed, res.rewrites)
            results.append(res)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return Reduced(gm, analysis, plans, results)


def make_report(red: Reduced, settings: Settings) -> Report:
    blocks = []
    for bp in red.plans:
        if bp.action == "tome":
            action = f"tome r={bp.r}"
        elif bp.action == "evit":
            action = f"evit keep {bp.keep}/{bp.tokens_in - red.analysis.num_protected}"
        else:
            action = "-"
        blocks.append(BlockReport(bp.index, bp.name, bp.tokens_in, bp.tokens_out, action, bp.reason))
    return Report(
        method=settings.method,
        settings={k: getattr(settings, k) for k in ("method", "r", "r_schedule", "keep_ratio", "layers",
                                                     "prop_attn", "protected_tokens", "fuse", "unmerge", "clamp_r",
                                                     "inner")},
        num_protected=red.analysis.num_protected,
        protected_reason=red.analysis.protected_reason,
        blocks=blocks,
        passes=[f"{r.name}: {r.rewrites} rewrites" for r in red.results],
    )
