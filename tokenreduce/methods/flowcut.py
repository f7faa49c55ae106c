"""FlowCut: keep the image tokens with the most information flow through the vision tower's CLS token,
accumulated over its layers, before the LLM.

Source: Tong, Jin, Qin, Li, Zou, Li, Li, Li, "FlowCut: Rethinking Redundancy via Information Flow for
Efficient Vision-Language Models", 2025 (official code TungChintao/FlowCut, `flowcut/modeling_clip_flowcut.py`
and `flowcut/utils_flowcut.py`, read, not copied). At every vision layer a patch scores
`(a / sum a + s / sum s) * |v|_1`: `a` the CLS query's attention to it (head mean), `s` the softmax over
tokens of the CLS value's dot product with its value (per head, unscaled, then head mean), `|v|_1` the L1
norm of its head-averaged value; the scores accumulate as `c = 0.5 * c + 0.5 * score` from the first layer
on. The official code scores every layer before the one LLaVA's projector reads (CLIP-L: layers 0..21 of
the feature layer 22), so those are the default `vision_layers` here. The kept patches' features go through
the projector unchanged, and the LLM's prefill is pruned at layer 0 to them (kept tokens keep their
original positions), so its KV cache shrinks from the first layer. Default `keep_ratio` 128/576 (the
paper's main LLaVA-1.5 setting and its released 128-token checkpoint).

Where this departs from the official code, on purpose:

* **no progressive pruning inside the vision tower.** The official code drops patches between vision layers
  (at every other layer, an entropy-adaptive count, down to `keep` before the feature layer), so later
  layers run on fewer tokens and the feature layer itself runs on the kept ones only. Here the tower's
  token count never changes: every scored layer sees all patches, each layer's score is normalised over
  all patches (the official code: over the survivors), and the `keep` best patches of the final cumulative
  score are selected once, from the feature layer's output (like VisionZip). The vision tower therefore
  costs what it did; the LLM's prefill is what shrinks.
* the CLS token is not an LLM token in LLaVA (`vision_feature_select_strategy='default'`), so all `keep`
  kept tokens are patches (the official code keeps `keep` patches plus the CLS inside the tower);
* the per-layer weight of the running score is an option (`decay`, official 0.5); batch > 1: each row
  (one image per prompt) selects on its own image.

The plan is `tokenreduce::flowcut_plan` (`kernels/vision_ops.py`, with `flowcut_select` for callers outside
a graph): one top-k with constant k and one-hot comparisons, static shapes, so the pruned prefill exports.
Refuses: any LLM layer but 0, `vision_layers` empty, unordered or outside the layers feeding the LLM (a
one-layer tower has none before its feature layer: give `vision_layers=[0]`), VLMs whose vision encoder is not
in the captured graph or has no CLS token (the relay), and ratios outside (0, 1] / decays outside [0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from tokenreduce.methods.base import Options, check_int_list, fail, option
from tokenreduce.methods.hiprune import attention_map, vision_layers
from tokenreduce.methods.prefill import BeforeLlmMethod, BeforeLlmOptions, VisionSite

tr = torch.ops.tokenreduce

FLOWCUT_KEEP_RATIO = 128 / 576  # the paper's main LLaVA-1.5 setting (released llava-v1.5-7b-flowcut128)
FLOWCUT_DECAY = 0.5  # cumulative_scores = 0.5 * cumulative_scores + 0.5 * scores


@dataclass(frozen=True)
class FlowcutOptions(BeforeLlmOptions):
    keep_ratio: float = option(FLOWCUT_KEEP_RATIO, "fraction of the image tokens kept, in (0, 1] (default: the "
                                                   "paper's 128 of 576)")
    vision_layers: tuple[int, ...] | None = option(None, "vision layers (0-based, increasing) whose scores "
                                                         "accumulate; default: every layer before the one the "
                                                         "projector reads, as the official code")
    decay: float = option(FLOWCUT_DECAY, "weight of the running score at each layer, in [0, 1) (official 0.5)")

    def validate(self) -> None:
        super().validate()
        if self.vision_layers is not None:
            layers = check_int_list("vision_layers", self.vision_layers, lo=0)
            if not layers or any(b <= a for a, b in zip(layers, layers[1:])):
                raise fail("vision_layers", f"vision_layers must be strictly increasing and not empty, got "
                                            f"{list(layers)}")
            self.set("vision_layers", tuple(layers))
        d = self.decay
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0.0 <= float(d) < 1.0:
            raise fail("decay", f"decay must be a number in [0, 1), got {d!r}")
        self.set("decay", float(d))


class Flowcut(BeforeLlmMethod):
    name = "flowcut"
    summary = "keep the patches with the most information flow through the vision CLS token, accumulated over " \
              "vision layers, before the LLM (Tong et al., 2025)"
    options_type = FlowcutOptions

    @staticmethod
    def scored_layers(options: FlowcutOptions, feature_layer: int) -> tuple[int, ...]:
        """The vision layers whose scores accumulate, given the index of the layer the projector reads."""
        if options.vision_layers is None:
            if feature_layer == 0:
                raise fail("vision_layers", "flowcut accumulates the vision layers before the one the projector "
                                            "reads, and this tower's projector reads layer 0; give "
                                            "vision_layers=[0] to score that layer alone")
            return tuple(range(feature_layer))
        if options.vision_layers[-1] > feature_layer:
            raise fail("vision_layers", f"vision_layers must be vision layers feeding the LLM, 0..{feature_layer} "
                                        f"(the projector reads layer {feature_layer}), got "
                                        f"{list(options.vision_layers)}")
        return options.vision_layers

    def emit_vision(self, options: Options, site: VisionSite, keep: int) -> tuple[fx.Node, fx.Node]:
        assert isinstance(options, FlowcutOptions)
        atts = vision_layers(site)
        chosen = [atts[i] for i in self.scored_layers(options, len(atts) - 1)]
        rows = [attention_map(site, a, rows=1) for a in chosen]  # the CLS query's row: [B, 1, N]
        kept = site.builder.add(tr.flowcut_plan.default, (rows, [a.v for a in chosen], keep, options.decay, 1))
        return site.features, kept


METHOD = Flowcut()
