"""What the decoder prefill methods share: span options, stage checks, and last-query ranking.

FastV, PyramidDrop and GemFilter (one file each) all rank the *span* tokens (image tokens of a VLM, or
the context a user marks) by the attention the last query token pays them at one layer (probabilities,
averaged over heads), keep the best in their original order (`keep_plan` in `kernels/plans.py`), and never
touch tokens outside the span (system prompt, the question at the end, padding). They differ in where the
ranking happens and which layers run on the kept tokens. Positions are never renumbered: a kept token
keeps its original position id (rotary), which is what all three official implementations do.

`score_pool` and `score_window` are opt-in extensions shared by the three, not part of their papers, both
from SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", 2024; official
code FasterDecoding/SnapKV, read, not copied): `score_pool` max-pools the scores over neighbouring tokens
so a selected token brings its neighbours along (multi-token facts stay whole; SnapKV average-pools);
`score_window=W` ranks by the attention of the last W query tokens (SnapKV's observation window: the
question) summed over those rows, instead of the last token's alone. Each row's softmax is its own
causal one; the scores are still averaged over heads (one kept set for all heads, where SnapKV keeps a
set per KV head). W is a constant of the graph (`tokenreduce::window_scores`), so the prefill still
exports with static shapes; W=1 emits exactly the papers' one-row op.

The selection methods (DivPrune, DART; one file each) do not rank by last-query attention: they choose
span tokens from the hidden states entering the first pruned block (`SelectionMethod.emit_keep`, given a
`SelectionSite`), and the pass around them gathers and carries positions and masks exactly as for the
three above. SparseVLM and VisionDrop (one file each) read the whole attention map of the block before each
stage (`SelectionSite.attention`) and merge the tokens they drop into kept ones (`SelectionSite.merged`).

Refuses: layers out of order or out of range, keep counts outside `1 .. span`, an even `score_pool`,
a `score_window` below 1 or longer than the prompt.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx

from tokenreduce.analysis.encoder import Attention
from tokenreduce.ir.graph import Builder, call
from tokenreduce.kernels import decoder_ops, vision_ops
from tokenreduce.kernels import ops as _ops  # noqa: F401  (registers torch.ops.tokenreduce.query_row_scores)
from tokenreduce.methods.base import (
    DecoderMethod,
    Options,
    Stage,
    check_int,
    check_int_list,
    check_layers,
    check_ratio,
    fail,
    option,
)

tr = torch.ops.tokenreduce


class PrefillMethod(DecoderMethod):
    """What the three prefill methods share beyond options: the soft-capped scoring op's reference (a
    Gemma 2 graph ranks with `tokenreduce::capped_row_scores`, which ONNX export inlines)."""

    def references(self) -> dict[Any, Callable[..., Any]]:
        return dict(decoder_ops.REFERENCES)

    def score_window(self, options: Options) -> int:
        return int(getattr(options, "score_window", 1))


def last_query_scores(graph: fx.Graph, scorer: Attention, q: fx.Node, k: fx.Node, mask: fx.Node | None,
                      window: int) -> fx.Node:
    """Emit (at the graph's insert point) the `[B, N]` ranking scores of the scoring block's attention
    `scorer`, read from `q`/`k`/`mask` (the filter pass's clones for GemFilter, the gathered mask after an
    earlier stage): the last query row (`query_row_scores`, or `capped_row_scores` where the model
    soft-caps its logits) for `window=1`, else the last `window` rows summed (`window_scores`)."""
    if window == 1:
        if scorer.softcap is None:
            return call(graph, tr.query_row_scores.default, (q, k, mask, scorer.scale, -1), scorer.node)
        return call(graph, tr.capped_row_scores.default, (q, k, mask, scorer.scale, scorer.softcap, -1),
                    scorer.node)
    rows = q.meta["val"].shape[-2]
    if not 1 <= window <= rows:
        raise fail("score_window", f"score_window={window} but the prompt has {rows} tokens at the scoring block; "
                                   f"choose 1..{rows} (the question's length is the usual choice)")
    return call(graph, tr.window_scores.default,
                (q, k, mask, scorer.scale, scorer.softcap, window, mask is None and scorer.is_causal), scorer.node)


@dataclass(frozen=True)
class SpanOptions(Options):
    """Options every prefill method takes (each method adds its keep count)."""

    layers: tuple[int, ...] | None = option(None, "decoder blocks (0-based) where the method acts; default: the "
                                                  "paper's choice scaled to the depth")
    score_pool: int = option(1, "max-pool the last-query scores over this many neighbouring tokens before ranking "
                                "(odd; 1 = the papers' ranking; SnapKV-style extension)")
    score_window: int = option(1, "rank by the attention of the last W query tokens (the question), summed over "
                                  "them (1 = the papers' last-query ranking; SnapKV's observation window)")

    def validate(self) -> None:
        if self.layers is not None:
            self.set("layers", check_int_list("layers", self.layers, lo=None))
        check_int("score_pool", self.score_pool, lo=1)
        check_int("score_window", self.score_window, lo=1)
        if self.score_pool % 2 == 0:
            raise fail("score_pool", f"score_pool must be an odd int >= 1 (1 = off), got {self.score_pool}")


def checked_layers(method: DecoderMethod, options: Options, num_layers: int) -> tuple[int, ...]:
    """The user's layers (strictly increasing, in range) or the method's defaults."""
    layers = method.layers(options, num_layers)
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise fail("layers", f"layers must be strictly increasing, got {list(layers)}")
    check_layers(layers, num_layers, "decoder blocks")
    return tuple(layers)


def ratio_stages(method: str, layers: Sequence[int], span: int, keep_ratio: float) -> list[Stage]:
    """FastV / PyramidDrop stages: `layers` are the blocks whose input is pruned (block K-1's attention
    ranks, as FastV's "after layer K"); each stage keeps `ceil(keep_ratio * remaining)` span tokens."""
    if layers[0] < 1:
        raise fail("layers", f"{method} prunes after a layer has ranked the tokens: layers must be >= 1, "
                             f"got {list(layers)}")
    out, remaining = [], span
    for layer in layers:
        remaining = math.ceil(keep_ratio * remaining)
        out.append(Stage(score_block=layer - 1, first_reduced_block=layer, keep=remaining))
    return out


@dataclass(frozen=True)
class RatioOptions(SpanOptions):
    keep_ratio: float = option(0.5, "fraction of the span tokens kept at each stage, in (0, 1]")

    def validate(self) -> None:
        super().validate()
        self.set("keep_ratio", check_ratio("keep_ratio", self.keep_ratio))


def ratio_keep(keep_ratio: float, span: int) -> int:
    """Span tokens kept at `keep_ratio`: `ceil(keep_ratio * span)` (1.0 keeps every one)."""
    return max(1, math.ceil(keep_ratio * span))


@dataclass
class SelectionSite:
    """What a selection method reads where it prunes, and the builder it emits through.

    `hidden [B, N, C]` are the hidden states entering the first pruned block (the LLM's input embeddings
    at block 0); `droppable [B, N]` bool marks the span tokens still present (`num_droppable` per row);
    `keys [B, H_kv, N, d]` and `mask` are the cached keys and the attention mask of the stage's
    `score_block` (None where the site has none). The builder inserts right after `hidden`; its nodes
    keep reading the unpruned hidden states.
    """

    builder: Builder
    hidden: fx.Node
    droppable: fx.Node
    num_droppable: int
    keep: int
    keys: fx.Node | None
    mask: fx.Node | None
    patch_scores: fx.Node | None = None  # `[B, P]` from `emit_vision` (one image of P patches per row)
    # For methods that score with the whole attention map or the prompt's embeddings (SparseVLM, VisionDrop):
    attention: Attention | None = None  # the score block's attention (q, k, scale, softcap; `mask` above is current)
    embeddings: fx.Node | None = None  # `[B, N0, C]` the LLM's input embeddings, never pruned
    span: fx.Node | None = None  # `[B, N0]` the original span (every span token, before any stage)
    kept: fx.Node | None = None  # `[B, N]` original positions of the current tokens (None before the first stage)
    merged: fx.Node | None = None  # set by a method that merges: `[B, N, C]` replacing `hidden` before the gather


@dataclass
class VisionSite:
    """One vision-tower layer of a VLM whose image features feed the span (LLaVA: the layer the projector
    reads). `features [B, 1 + P, C]` is the layer's output (CLS first), `attention` its attention (q, k,
    mask, scale); the builder inserts right after `features`. A method that changes the tower itself (FlowCut's
    progressive pruning) says what in `notes`, which go into the report."""

    builder: Builder
    features: fx.Node
    attention: Attention
    notes: list[str] = field(default_factory=list)


# The graph input holding `[B, N]` keep scores a method computed where a VLM's vision tower ran eagerly, outside
# the captured prefill (Qwen2-VL: `SelectionMethod.eager_vision`); the pass hands it over as the patch scores.
VISION_SCORES = "vision_scores"


def eager_scores_input(node: fx.Node) -> bool:
    """Is `node` the `VISION_SCORES` graph input (scores computed where the vision tower ran eagerly)?"""
    return node.op == "placeholder" and node.target == VISION_SCORES


class SelectionMethod(PrefillMethod):
    """A prefill method that selects span tokens from hidden states (not last-query attention): it emits
    `[B, N]` keep scores (> 0 for the selected span tokens, exactly `keep` of them), which the pass turns
    into the kept indices with `tokenreduce::keep_plan`.

    A method with `needs_vision` first gets the vision layer (`emit_vision`): it returns the features that
    replace the layer's output (merged tokens) and `[B, P]` patch scores, which its `emit_scores` maps onto
    the span (`SelectionSite.patch_scores`)."""

    needs_vision: ClassVar[bool] = False

    def selects_at(self, stage: Stage) -> bool:
        """Whether this method's own selection (`emit_scores`) makes `stage`, rather than the last-query ranking
        FastV uses (`BeforeLlmMethod` with `llm_layers`: only its first stage is its own)."""
        return True

    def emit_vision(self, options: Options, site: VisionSite, keep: int) -> tuple[fx.Node, fx.Node]:
        raise NotImplementedError(f"{type(self).__name__} does not read the vision tower")

    def eager_vision(self, options: Options, model: torch.nn.Module, input_ids: torch.Tensor,
                     extra: dict[str, torch.Tensor]
                     ) -> contextlib.AbstractContextManager[Callable[[], torch.Tensor]] | None:
        """For a VLM whose vision tower runs eagerly before the captured prefill (Qwen2-VL): a context that
        hooks the tower for the model's own run (`extra`: its image/video inputs) and yields a function giving
        the `[B, N]` keep scores after it (the `VISION_SCORES` graph input). None: this method does not."""
        return None

    def emit_scores(self, options: Options, site: SelectionSite) -> fx.Node:
        raise NotImplementedError(f"{type(self).__name__} must emit its selection scores")


@dataclass(frozen=True)
class SelectionOptions(Options):
    """Options of the selection methods: one layer and the kept fraction of the span."""

    layers: tuple[int, ...] | None = option(None, "the one decoder block (0-based) whose input is pruned; default: "
                                                  "the paper's")
    keep_ratio: float = option(0.5, "fraction of the span tokens kept, in (0, 1]")

    def validate(self) -> None:
        if self.layers is not None:
            self.set("layers", check_int_list("layers", self.layers, lo=None))
            if len(self.layers) != 1:
                raise fail("layers", f"this method prunes once, at one block: give one layer, got {list(self.layers)}")
        self.set("keep_ratio", check_ratio("keep_ratio", self.keep_ratio))


LLM_KEEP_RATIO = 0.5  # FastV's default R, for the `llm_layers` stages after a selection before the LLM


@dataclass(frozen=True)
class BeforeLlmOptions(SelectionOptions):
    """Options of the methods that select image tokens from the vision tower before the LLM (VisionZip, HiPrune,
    FlowCut): the LLM is pruned at its input, so `layers` may only be `[0]`. `llm_layers` combines the selection
    with FastV-style pruning inside the LLM (as the VisionZip paper pairs VisionZip with FastV): at each of these
    LLM layers the kept image tokens are ranked by the previous layer's last-query attention and
    `ceil(llm_keep_ratio * remaining)` of them go on."""

    llm_layers: tuple[int, ...] | None = option(None, "also prune inside the LLM, FastV-style, at these decoder "
                                                      "blocks (>= 1, increasing); default: only before the LLM")
    llm_keep_ratio: float = option(LLM_KEEP_RATIO, "with llm_layers: fraction of the remaining image tokens kept at each, in "
                                        "(0, 1] (FastV's default 0.5)")

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__.removesuffix("Options").lower()
        if self.layers is not None and tuple(self.layers) != (0,):
            raise fail("layers", f"{name} selects before the LLM (layer 0), got layers={list(self.layers)}; "
                                 f"to prune inside the LLM as well, give llm_layers")
        self.set("llm_keep_ratio", check_ratio("llm_keep_ratio", self.llm_keep_ratio))
        if self.llm_layers is None:
            if self.llm_keep_ratio != LLM_KEEP_RATIO:
                raise fail("llm_keep_ratio", f"llm_keep_ratio applies to the LLM layers of llm_layers, which is not "
                                             f"set; give llm_layers=[K] to prune inside the LLM after {name}")
            return
        layers = check_int_list("llm_layers", self.llm_layers, lo=1)
        if not layers or any(b <= a for a, b in zip(layers, layers[1:])):
            raise fail("llm_layers", f"llm_layers must be strictly increasing decoder blocks >= 1 (block K-1's "
                                     f"attention ranks for block K), got {list(layers)}")
        self.set("llm_layers", tuple(layers))


class BeforeLlmMethod(SelectionMethod):
    """A selection read from the vision tower (`emit_vision`) whose kept image tokens enter the LLM at layer 0:
    one stage, scored and pruned at block 0."""

    needs_vision = True

    def default_layers(self, num_layers: int) -> tuple[int, ...]:
        return (0,)

    def stages(self, options: Options, num_layers: int, span: int) -> list[Stage]:
        assert isinstance(options, BeforeLlmOptions)
        first = Stage(score_block=0, first_reduced_block=0, keep=ratio_keep(options.keep_ratio, span))
        if options.llm_layers is None:
            return [first]
        check_layers(options.llm_layers, num_layers, "decoder blocks", setting="llm_layers")
        return [first, *ratio_stages(self.name, options.llm_layers, first.keep, options.llm_keep_ratio)]

    def selects_at(self, stage: Stage) -> bool:
        """The first stage is this method's selection; the `llm_layers` stages rank by last-query attention."""
        return stage.first_reduced_block == 0

    def emit_scores(self, options: Options, site: SelectionSite) -> fx.Node:
        """The `[B, P]` patch scores of `emit_vision` placed on the span; scores that come in as the
        `VISION_SCORES` input (computed where Qwen's tower ran eagerly) are `[B, N]` already."""
        assert site.patch_scores is not None
        if eager_scores_input(site.patch_scores):
            return site.patch_scores
        return site.builder.add(decoder_ops.from_span, (site.patch_scores, site.droppable))

    def references(self) -> dict[Any, Callable[..., Any]]:
        return {**super().references(), **vision_ops.REFERENCES}
