"""PyramidDrop: several stages, each keeping a fraction of the remaining span.

Source: Xing, Chen, Zhang, Yin, Ma, Zhang, Wang, Jiang, Ma, "PyramidDrop: Accelerating Your Large
Vision-Language Models via Pyramid Visual Redundancy Reduction", 2024 (official code
Cooperx521/PyramidDrop, read, not copied). Defaults: stages at layers 8/16/24 of 32 (scaled to the depth),
lambda = 0.5. Shared ranking and span handling: `methods/prefill.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenreduce.methods.base import Options, Stage
from tokenreduce.methods.prefill import PrefillMethod, RatioOptions, checked_layers, ratio_stages

PYRAMID_FRACTIONS = (8 / 32, 16 / 32, 24 / 32)  # stage layers of the 32-layer LLaVA-1.5 setting


@dataclass(frozen=True)
class PyramidDropOptions(RatioOptions):
    pass


class PyramidDrop(PrefillMethod):
    name = "pyramiddrop"
    summary = "prune the span in stages, keeping a fraction at each (Xing et al., 2024)"
    options_type = PyramidDropOptions

    def default_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(sorted({max(1, min(num_layers - 1, round(f * num_layers))) for f in PYRAMID_FRACTIONS}))

    def stages(self, options: Options, num_layers: int, span: int) -> list[Stage]:
        assert isinstance(options, PyramidDropOptions)
        return ratio_stages(self.name, checked_layers(self, options, num_layers), span, options.keep_ratio)


METHOD = PyramidDrop()
