"""What every pass shares: the pass context, the result record, and node helpers."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from tokenreduce.analysis.encoder import ModelAnalysis
from tokenreduce.compiler.planner import BlockPlan
from tokenreduce.compiler.settings import Settings


@dataclass
class PassResult:
    name: str
    changed: bool
    rewrites: int = 0
    notes: list[str] = field(default_factory=list)


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
    settings: Settings
    analysis: ModelAnalysis
    plans: list[BlockPlan]
    original_tokens: int
    state: TokenState = field(default_factory=TokenState)
