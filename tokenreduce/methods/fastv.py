"""FastV: after layer K, drop a fraction of the span for every later layer, ranked by layer K's attention.

Source: Chen, Zhao, Chen, Liu, Bai, Lin, Zhou, Chang, "An Image is Worth 1/2 Tokens After Layer 2:
Plug-and-Play Inference Acceleration for Large Vision-Language Models", ECCV 2024 (official code
pkunlp-icler/FastV, read, not copied). Defaults: K=2, R=50%. Shared ranking and span handling:
`methods/prefill.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenreduce.methods.base import Options, Stage, fail
from tokenreduce.methods.prefill import PrefillMethod, RatioOptions, checked_layers, ratio_stages

FASTV_LAYER = 2  # "after layer 2" (the paper's K)


@dataclass(frozen=True)
class FastvOptions(RatioOptions):
    def validate(self) -> None:
        super().validate()
        if self.layers is not None and len(self.layers) != 1:
            raise fail("layers", f"fastv prunes once, after one layer K: give one layer, got {list(self.layers)} "
                                 "(several stages are method='pyramiddrop')")


class Fastv(PrefillMethod):
    name = "fastv"
    summary = "after layer K, keep the span tokens layer K-1's last query attends to most (Chen et al., ECCV 2024)"
    options_type = FastvOptions

    def default_layers(self, num_layers: int) -> tuple[int, ...]:
        return (min(FASTV_LAYER, num_layers - 1),)

    def stages(self, options: Options, num_layers: int, span: int) -> list[Stage]:
        assert isinstance(options, FastvOptions)
        return ratio_stages(self.name, checked_layers(self, options, num_layers), span, options.keep_ratio)


METHOD = Fastv()
