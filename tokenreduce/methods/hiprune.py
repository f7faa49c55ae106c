"""HiPrune: keep the image tokens a VLM's vision tower marks at two depths (anchors with their grid neighbours
from an object-centric middle layer, registers from the deep layer), before the LLM.

Source: Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision
Encoders", 2025 (official code Danielement321/HiPrune, `LLaVA/llava/model/llava_arch.py` `encode_images`,
read, not copied). A patch's score at a layer is the attention it receives, averaged over heads and over
every query token (the official code's "global attention"; its CLS-attention variant is commented out).
Anchors: the `round(keep * alpha / 5)` best patches of the object layer (LLaVA-1.5: layer 9 of CLIP-L's 24,
1-based); buffers: the anchors' neighbours on the patch grid; registers: the best other patches of the deep
layer (the one whose output the projector reads), until `keep` patches are kept. The kept patches' features
go through the projector unchanged, and the LLM's prefill is pruned at layer 0 to them (kept tokens keep
their original positions), so its KV cache shrinks from the first layer. Defaults: `keep_ratio` 192/576
(the official script's `HIPRUNE_RETENTION`), `anchor_ratio` (alpha) 0.1, `object_layer` 8 of 22 feature
layers (0-based, the official 9th layer), scaled to the tower's depth.

Where this departs from the official code, on purpose:

* buffers are the up/down/left/right neighbours *on the grid*; the official code adds -1, +1, -W, +W to
  the flat index and clamps, so a patch at a row's end gets the next row's first patch as a neighbour;
* anchors are capped at `keep // 5`, so anchors and buffers never exceed `keep`;
* kept tokens keep their original positions and order, as the official index mask does; batch > 1: each
  row (one image per prompt) selects on its own image.

The plan is `tokenreduce::hiprune_plan` (`kernels/vision_ops.py`, with `hiprune_select` for callers outside a
graph): two top-ks with constant k and one-hot comparisons, static shapes, so the pruned prefill exports.
Refuses: any LLM layer but 0, an `object_layer` outside the vision layers that feed the LLM, a patch count
that is no square grid, VLMs whose vision encoder is not in the captured graph (Qwen2-VL's runs eagerly),
features that are not one image of `span` patches plus a CLS token per prompt, and ratios outside (0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from tokenreduce.analysis.attention import Attention, find_attention
from tokenreduce.analysis.decoder import is_causal
from tokenreduce.ir.graph import reach
from tokenreduce.kernels import vision_ops
from tokenreduce.methods.base import Options, check_int, fail, option
from tokenreduce.methods.prefill import BeforeLlmMethod, BeforeLlmOptions, VisionSite

tr = torch.ops.tokenreduce

HIPRUNE_KEEP_RATIO = 192 / 576  # the official bench script's HIPRUNE_RETENTION for LLaVA-1.5
HIPRUNE_ALPHA = 0.1  # HIPRUNE_ALPHA: anchors + buffers ~ alpha * keep
HIPRUNE_OBJECT_LAYER = 8 / 22  # HIPRUNE_OBJECT_LAYER=9 (1-based) of CLIP-L, whose layer 22 (0-based) feeds LLaVA


@dataclass(frozen=True)
class HipruneOptions(BeforeLlmOptions):
    keep_ratio: float = option(HIPRUNE_KEEP_RATIO, "fraction of the image tokens kept, in (0, 1] (default: the "
                                                   "official 192 of 576)")
    anchor_ratio: float = option(HIPRUNE_ALPHA, "the paper's alpha: anchors + their buffers ~ anchor_ratio * kept, "
                                                "in [0, 1] (default 0.1)")
    object_layer: int | None = option(None, "vision layer (0-based) whose attention picks the anchors; default: "
                                            "the paper's layer 9 of 24 scaled to the tower (8/22 of the feature "
                                            "layer's index)")

    def validate(self) -> None:
        super().validate()
        r = self.anchor_ratio
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0.0 <= float(r) <= 1.0:
            raise fail("anchor_ratio", f"anchor_ratio must be a number in [0, 1], got {r!r}")
        self.set("anchor_ratio", float(r))
        if self.object_layer is not None:
            check_int("object_layer", self.object_layer, lo=0)


def vision_layers(site: VisionSite) -> list[Attention]:
    """The vision tower's attentions that feed the site's features, in order: entry `i` is vision layer `i`,
    the last is `site.attention` (the layer whose output the projector reads). Refuses attention whose
    q/k/v are not `[B, heads, tokens, head_dim]`."""
    gm = site.features.graph.owning_module
    assert isinstance(gm, fx.GraphModule)
    up = reach([site.features], "all_input_nodes", None)
    atts = [a for a in find_attention(gm) if not is_causal(a) and a.node in up]
    assert atts and atts[-1].node is site.attention.node, "the vision site's attention is the last one feeding it"
    for i, a in enumerate(atts):
        shapes = [tuple(n.meta["val"].shape) for n in (a.q, a.k, a.v)]
        if any(len(s) != 4 for s in shapes):
            raise fail("method", f"vision layer {i}'s attention has q/k/v {[list(s) for s in shapes]}; this method "
                                 "reads [B, heads, tokens, head_dim] (SDPA-style) attention only")
    return atts


def patch_grid(site: VisionSite) -> tuple[int, int]:
    """The square patch grid of the site's features (`[B, 1 + P, C]`, CLS first)."""
    p = int(site.features.meta["val"].shape[1]) - 1
    side = math.isqrt(p)
    if side * side != p:
        raise fail("method", f"the vision features hold {p} patches, which is no square grid; this method needs "
                             "the grid of one square image (LLaVA-1.5 style)")
    return side, side


def attention_map(site: VisionSite, att: Attention, rows: int | None = None) -> fx.Node:
    """Emit `[B, N, N]` head-averaged probabilities of `att` (`rows=1`: the CLS query's row only)."""
    q = att.q if rows is None else site.builder.add(torch.ops.aten.slice.Tensor, (att.q, 2, 0, rows))
    return site.builder.add(vision_ops.head_mean_attention, (q, att.k, att.mask, att.scale))


class Hiprune(BeforeLlmMethod):
    name = "hiprune"
    summary = "keep anchors + grid neighbours from a middle vision layer and registers from the deep one, before " \
              "the LLM (Liu et al., 2025)"
    options_type = HipruneOptions

    @staticmethod
    def object_layer(options: HipruneOptions, feature_layer: int) -> int:
        """The object layer (0-based) given the index of the layer the projector reads."""
        layer = round(HIPRUNE_OBJECT_LAYER * feature_layer) if options.object_layer is None else options.object_layer
        if not 0 <= layer <= feature_layer:
            raise fail("object_layer", f"object_layer must be a vision layer feeding the LLM, 0..{feature_layer} "
                                       f"(the projector reads layer {feature_layer}), got {layer}")
        return layer

    def emit_vision(self, options: Options, site: VisionSite, keep: int) -> tuple[fx.Node, fx.Node]:
        assert isinstance(options, HipruneOptions)
        atts = vision_layers(site)
        rows, cols = patch_grid(site)
        mid = attention_map(site, atts[self.object_layer(options, len(atts) - 1)])
        deep = attention_map(site, atts[-1])
        anchors = vision_ops.hiprune_anchors(keep, options.anchor_ratio)
        kept = site.builder.add(tr.hiprune_plan.default, (mid, deep, rows, cols, keep, anchors, 1))
        return site.features, kept


METHOD = Hiprune()
