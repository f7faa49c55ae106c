"""VisionZip: keep the dominant image tokens (those the vision tower's CLS attends to most) and a few
contextual tokens that absorb the rest by similarity, before the LLM.

Source: Yang, Chen, Tian, Wang, Wang, Jia, "VisionZip: Longer is Better but Not Necessary in Vision
Language Models", CVPR 2025 (official code dvlab-research/VisionZip, `visionzip/clip_encoder.py` and
`utils.py`, read, not copied). At the vision layer whose output the projector reads (LLaVA's
`vision_feature_layer`), the dominant patches are the top ones by the CLS query's attention summed over
heads; the other patches are split, in order, into contextual targets (every `R // contextual`-th) and the
rest, each of which joins the target whose head-averaged key is most cosine-similar; a target's feature
becomes `target + mean(joined)`. The features are merged there, before the projector, exactly as the
official code does; the projector and the placeholder scatter then run unchanged (placeholder counts stay
consistent), and the LLM's prefill is pruned at layer 0 to the dominant patches and the targets, so its
KV cache shrinks from the first layer. Defaults: 64 of LLaVA-1.5's 576 image tokens (`keep_ratio` 0.111),
of which 10 contextual (`contextual_ratio` 10/64), the paper's smallest setting.

Where this departs from the official code, on purpose:

* the CLS token is not an LLM token: LLaVA's `vision_feature_select_strategy='default'` drops it, so all
  `keep` kept tokens are patches (the official code feeds the CLS feature as one of the dominant tokens);
* kept tokens keep their original positions and order (the official code puts the contextual tokens after
  all dominant ones and renumbers the shorter sequence);
* batch > 1: each row (one image per prompt) selects and merges on its own image.

The plan is `tokenreduce::visionzip_plan` (`kernels/decoder_ops.py`): top-k with constant k, one-hot
assignment matmuls, static shapes, so the pruned prefill exports. Refuses: any layer but 0, VLMs whose
vision encoder is not in the captured graph (Qwen2-VL's runs eagerly: its tokens would need the attention
received instead of CLS attention, not implemented), features that are not one image of `span` patches plus
a CLS token per prompt, and ratios outside (0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from tokenreduce.kernels import decoder_ops
from tokenreduce.methods.base import Options, Stage, check_ratio, fail, option
from tokenreduce.methods.prefill import SelectionMethod, SelectionOptions, SelectionSite, VisionSite, ratio_keep

tr = torch.ops.tokenreduce

VISIONZIP_KEEP_RATIO = 64 / 576  # LLaVA-1.5's smallest setting in the paper: 54 dominant + 10 contextual
VISIONZIP_CONTEXTUAL = 10 / 64  # 54 + 10, 108 + 20, 162 + 30: the contextual share of every paper setting


@dataclass(frozen=True)
class VisionzipOptions(SelectionOptions):
    keep_ratio: float = option(VISIONZIP_KEEP_RATIO, "fraction of the image tokens kept, in (0, 1] (default: the "
                                                     "paper's 64 of 576)")
    contextual_ratio: float = option(VISIONZIP_CONTEXTUAL, "share of the kept tokens that are contextual (merged) "
                                                           "tokens, in (0, 1] (default 10/64, as every paper setting)")

    def validate(self) -> None:
        super().validate()
        self.set("contextual_ratio", check_ratio("contextual_ratio", self.contextual_ratio))
        if self.layers is not None and tuple(self.layers) != (0,):
            raise fail("layers", f"visionzip selects before the LLM (layer 0), got layers={list(self.layers)}")


class Visionzip(SelectionMethod):
    name = "visionzip"
    summary = "keep the tokens the vision CLS attends to most and merge the rest into a few (Yang et al., CVPR 2025)"
    options_type = VisionzipOptions
    needs_vision = True

    def default_layers(self, num_layers: int) -> tuple[int, ...]:
        return (0,)

    def stages(self, options: Options, num_layers: int, span: int) -> list[Stage]:
        assert isinstance(options, VisionzipOptions)
        return [Stage(score_block=0, first_reduced_block=0, keep=ratio_keep(options.keep_ratio, span))]

    @staticmethod
    def split(options: VisionzipOptions, keep: int) -> tuple[int, int]:
        """(dominant, contextual) patch counts of `keep` kept tokens."""
        contextual = min(keep, round(options.contextual_ratio * keep))
        return keep - contextual, contextual

    def emit_vision(self, options: Options, site: VisionSite, keep: int) -> tuple[fx.Node, fx.Node]:
        assert isinstance(options, VisionzipOptions)
        dominant, contextual = self.split(options, keep)
        att = site.attention
        plan = site.builder.add(tr.visionzip_plan.default, (site.features, att.q, att.k, att.mask, att.scale, dominant,
                                                            contextual))
        return site.builder.item(plan, 0), site.builder.item(plan, 1)

    def emit_scores(self, options: Options, site: SelectionSite) -> fx.Node:
        assert site.patch_scores is not None
        return site.builder.add(decoder_ops.from_span, (site.patch_scores, site.droppable))


METHOD = Visionzip()
