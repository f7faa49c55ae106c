"""What every pass shares: the result record and the pass contexts (settings, analysis, token state).

One signature for every pass: `(gm: fx.GraphModule, ctx: PassContext) -> PassResult`. The encoder and
decoder pipelines hand their passes a subclass of `PassContext` with what those passes need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from tokenreduce.analysis.decoder import DecoderAnalysis
from tokenreduce.analysis.encoder import ModelAnalysis
from tokenreduce.methods.base import BlockPlan, Stage
from tokenreduce.methods.settings import Settings


@dataclass
class PassResult:
    name: str
    changed: bool
    rewrites: int = 0
    notes: list[str] = field(default_factory=list)  # what a user should know (shown in the report)
    seconds: float = 0.0  # filled in by the pass manager

    def __str__(self) -> str:
        return f"{self.name}: {self.rewrites} rewrites ({self.seconds:.2f} s)"


@dataclass
class TokenState:
    """Graph nodes holding the token state after the latest reduction (see docs/design.md)."""

    size: fx.Node | None = None  # [B, N] tokens represented by each slot
    valid: fx.Node | None = None  # [B, N] bool key validity (None: no padding)
    rep: fx.Node | None = None  # [B, N] original token each slot stands for
    source: fx.Node | None = None  # [B, N0] original position -> slot (only when unmerging)
    epoch: int = 0  # number of reductions so far


@dataclass
class PassContext:
    """What every pipeline's passes read: the settings (method + its options)."""

    settings: Settings


@dataclass
class EncoderContext(PassContext):
    """Encoder pipeline: blocks, the method's per-block plans, and the token state threaded through them."""

    analysis: ModelAnalysis = field(default=None)  # type: ignore[assignment]
    plans: list[BlockPlan] = field(default_factory=list)
    original_tokens: int = 0
    state: TokenState = field(default_factory=TokenState)


@dataclass
class DecoderContext(PassContext):
    """Decoder prefill pipeline: decoder blocks, the method's stages, and what the passes record."""

    analysis: DecoderAnalysis = field(default=None)  # type: ignore[assignment]
    stages: list[Stage] = field(default_factory=list)
    span_size: int = 0  # droppable tokens per row (checked at run time by the caller)
    score_pool: int = 1  # max-pool window over the scores before ranking (1: off)
    kept: list[fx.Node | None] = field(default_factory=list)  # per decoder block: [B, M] original positions
    span: fx.Node | None = None
