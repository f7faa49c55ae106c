"""`method="none"`: capture, analyse and compile without reducing anything.

The baseline every benchmark compares against (same capture, same graph, same compiler), and what
`inspect` uses to show a model's blocks. Works for encoders (`tokenreduce.compile`) and decoder prefills
(`tokenreduce.reduce_decoder`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from tokenreduce.analysis.encoder import ModelAnalysis
from tokenreduce.methods.base import BlockPlan, DecoderMethod, EncoderMethod, Options, Placement, Stage, walk_blocks


@dataclass(frozen=True)
class NoneOptions(Options):
    pass


class NoReduction(EncoderMethod, DecoderMethod):
    name = "none"
    summary = "capture and compile only (the baseline)"
    placement: ClassVar[Placement] = "any"
    options_type = NoneOptions

    def plan_blocks(self, options: Options, analysis: ModelAnalysis) -> list[BlockPlan]:
        return walk_blocks(analysis, lambda b: False, lambda b, bp: None)

    def label(self, values: Mapping[str, Any]) -> str:
        return "no reduction"

    def default_layers(self, num_layers: int) -> tuple[int, ...]:
        return ()

    def stages(self, options: Options, num_layers: int, span: int) -> list[Stage]:
        return []


METHOD = NoReduction()
