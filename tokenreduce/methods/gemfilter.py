"""GemFilter: run the first L layers, keep the top-k span tokens by layer L's last-query attention, then
run the whole model on the kept tokens only.

Source: Shi, Ye, Jin, Wang, Zhang, "Discovering the Gems in Early Layers: Accelerating Long-Context LLMs
with 1000x Input Token Reduction", 2024 (official code SalesforceAIResearch/GemFilter, read, not copied).
Defaults: the paper's filter layer 13 of 32 (scaled to the depth) and k = 1024, or a quarter of a shorter
span. Shared ranking and span handling: `methods/prefill.py`; the filter pass is a clone of the path from
the embeddings to layer L's q/k (`passes/prune_decoder_tokens.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenreduce.methods.base import Options, Stage, check_int, fail, option
from tokenreduce.methods.prefill import PrefillMethod, SpanOptions, checked_layers

GEMFILTER_FRACTION = 13 / 32  # the paper's filter layer for LLaMA-3.1-8B (32 layers)
GEMFILTER_KEEP_TOKENS = 1024


@dataclass(frozen=True)
class GemfilterOptions(SpanOptions):
    keep_tokens: int | None = option(None, "span tokens kept (the paper's k); default: 1024, or a quarter of a "
                                           "shorter span")

    def validate(self) -> None:
        super().validate()
        if self.keep_tokens is not None:
            check_int("keep_tokens", self.keep_tokens, lo=1)
        if self.layers is not None and len(self.layers) != 1:
            raise fail("layers", f"gemfilter uses one filter layer, got layers={list(self.layers)}")


class Gemfilter(PrefillMethod):
    name = "gemfilter"
    summary = "rank the span with an early layer's last query, run every layer on the top-k (Shi et al., 2024)"
    options_type = GemfilterOptions

    def default_layers(self, num_layers: int) -> tuple[int, ...]:
        return (max(0, min(num_layers - 1, round(GEMFILTER_FRACTION * num_layers))),)

    def stages(self, options: Options, num_layers: int, span: int) -> list[Stage]:
        assert isinstance(options, GemfilterOptions)
        layers = checked_layers(self, options, num_layers)
        # The paper's k = 1024 is for 32k-128k contexts; on shorter spans the default keeps a quarter.
        k = min(GEMFILTER_KEEP_TOKENS, math.ceil(span / 4)) if options.keep_tokens is None else options.keep_tokens
        if not 1 <= k <= span:
            raise fail("keep_tokens", f"keep_tokens={k} but the prompt's span has {span} tokens; choose 1..{span} "
                                      "(or a longer span)")
        return [Stage(score_block=layers[0], first_reduced_block=0, keep=k)]


METHOD = Gemfilter()
