"""TempScale: divide the attention softmax input of chosen blocks by a temperature (no token is reduced).

Source: Zhou, Dai, Cao, Zhang, Xu, "Length-Induced Embedding Collapse in PLM-based Models", ACL 2025
(arXiv:2410.24200), and the arithmetic of its official code (Yuqi-Zhou/Length_Collapse, `src/model.py`, read, not
copied): self-attention acts as a low-pass filter whose attenuation grows with the sequence length, so long
inputs' embeddings collapse into a narrow cone; TempScale sharpens every self-attention softmax with a
temperature `tau < 1`: `softmax((Q K^T / sqrt(d) + mask) / tau)`. The official code divides the whole softmax
input (logits plus mask, and T5's position bias) by `tau` in every self-attention layer of BERT/RoBERTa/T5
sentence encoders; here the same rewrite runs on the captured graph of any encoder the analysis recognises
(`passes/scale_attention_logits.py`): explicit attention gets the division right before its softmax; fused SDPA
gets `q / tau` and a float mask `/ tau` (`(q k^T s + m) / tau = (q / tau) k^T s + m / tau`), so SDPA stays fused.
A masked entry divided by `tau < 1` would overflow to -inf; it is clamped to the dtype's lowest value, so a row
that is entirely masked stays as the unmodified model has it (uniform) rather than becoming NaN.

It is a method (`method="tempscale"`) rather than a common setting because it is chosen the same way (one
per compile, its own options, one report line per block); `EncoderMethod.moves_tokens = False` tells the
token-reduction pass to leave it alone, and the report lists every rewritten block (`tempscale tau=0.8`), with
the token counts unchanged.

Refuses: `temperature` that is not a finite number in (0, 10] (0 would make every row one-hot; the paper's useful
range is below 1); `layers` outside the model's blocks; `unmerge=True` (nothing is merged, so nothing to undo).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenreduce.analysis.encoder import ModelAnalysis
from tokenreduce.errors import TokenReduceError
from tokenreduce.methods.base import (
    BlockPlan,
    EncoderMethod,
    Options,
    PlanNodes,
    Site,
    check_int_list,
    check_layers,
    fail,
    option,
)

MAX_TEMPERATURE = 10.0


@dataclass(frozen=True)
class TempScaleOptions(Options):
    temperature: float = option(1.0, "divide the attention softmax input by this (tau; < 1 sharpens, the paper's "
                                     "useful range is about 0.5-0.9; 1 changes nothing), in (0, 10]")
    layers: tuple[int, ...] | None = option(None, "blocks (0-based) whose attention is rescaled; default: every "
                                                  "block (as the official code)")

    def validate(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise fail("temperature", f"temperature must be a finite number in (0, {MAX_TEMPERATURE:g}], got {t!r}")
        if not 0.0 < t <= MAX_TEMPERATURE:
            raise fail("temperature", f"temperature must be in (0, {MAX_TEMPERATURE:g}], got {t}")
        self.set("temperature", float(t))
        if self.layers is not None:
            self.set("layers", check_int_list("layers", self.layers, lo=None))


@dataclass
class TempScalePlan(BlockPlan):
    """A block whose attention softmax input is divided by `temperature` (tokens in == tokens out)."""

    temperature: float = 1.0


class TempScale(EncoderMethod):
    name = "tempscale"
    summary = "divide the attention softmax input by a temperature against long-input embedding collapse " \
              "(Zhou et al., ACL 2025); reduces no token"
    options_type = TempScaleOptions
    moves_tokens = False

    def check_common(self, options: Options, unmerge: bool) -> None:
        if unmerge:
            raise TokenReduceError("tempscale reduces no token, so unmerge=True has nothing to undo; drop unmerge",
                                   setting="unmerge", hint="unmerge=False")

    def plan_blocks(self, options: Options, analysis: ModelAnalysis) -> list[BlockPlan]:
        assert isinstance(options, TempScaleOptions)
        nb = len(analysis.blocks)
        if options.layers is not None:
            check_layers(options.layers, nb)
        chosen = set(range(nb)) if options.layers is None else set(options.layers)
        plans: list[BlockPlan] = []
        for b in analysis.blocks:
            bp = TempScalePlan(b.index, b.name, b.num_tokens, b.num_tokens)
            if b.index in chosen and options.temperature != 1.0:
                bp.action, bp.temperature = self.name, options.temperature
            plans.append(bp)
        return plans

    def emit(self, options: Options, site: Site) -> PlanNodes:
        raise TokenReduceError("tempscale moves no token: its blocks are rewritten by the scale_attention_logits "
                               "pass, never by insert_reductions")

    def action(self, bp: BlockPlan, analysis: ModelAnalysis) -> str:
        t = bp.temperature if isinstance(bp, TempScalePlan) else float("nan")
        return f"tempscale tau={t:g}"

    sweep_option = None  # not a reduction: `tokenreduce eval` sweeps r / keep_ratio; see benchmarks/tempscale_minilm.py

    def label(self, values: Mapping[str, Any]) -> str:
        return f"TempScale tau={values.get('temperature', TempScaleOptions.temperature):g}"

    def identity_reason(self, values: Mapping[str, Any]) -> str | None:
        if values.get("temperature", TempScaleOptions.temperature) == 1.0:
            return "temperature=1 changes nothing: tempscale needs a temperature other than 1, e.g. 0.8"
        return None

    def inspect_values(self, analysis: ModelAnalysis, given: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        return {"temperature": 0.8}, "example temperature 0.8 (the paper's useful range is about 0.5-0.9)"


METHOD = TempScale()
