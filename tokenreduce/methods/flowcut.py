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

Two forms:

* `progressive=True` (the official code's form): patches are dropped *inside the vision tower*, between its
  layers, so later vision layers run on fewer tokens. After each prune layer (default: the official ones, every
  other layer counting back from the one before the feature layer: `F-1, F-3, ...`) the best surviving patches
  by the running score are kept (CLS always; survivors keep their order); later layers score the survivors
  only (normalised over them, as the official code), the last prune keeps `keep`, and the feature layer runs
  on those. Their features are placed back at their original patch indices (`vision_ops.place_patches`) and
  the LLM's prefill is pruned at layer 0 to them, as below. Departure: the official count at each prune layer
  is entropy-adaptive, `(n - keep) / sqrt(remaining prune layers) * (1 - H(cls attention)^2 / log(n)^2)`, a
  data-dependent shape (and a max over the batch); a compiled, exported graph needs fixed counts, so here they
  fall linearly from all patches to `keep` over the prune layers (`prune_keep` sets them).
* `progressive=False` (default): the tower's token count never changes: every scored layer sees all patches,
  each layer's score is normalised over all patches, and the `keep` best patches of the final cumulative
  score are selected once, from the feature layer's output (like VisionZip). The vision tower costs what it
  did; the LLM's prefill is what shrinks, and the kept features are the unpruned tower's.
* the CLS token is not an LLM token in LLaVA (`vision_feature_select_strategy='default'`), so all `keep`
  kept tokens are patches (the official code keeps `keep` patches plus the CLS inside the tower);
* the per-layer weight of the running score is an option (`decay`, official 0.5); batch > 1: each row
  (one image per prompt) selects on its own image.

The plan is `tokenreduce::flowcut_plan` (`kernels/vision_ops.py`, with `flowcut_select` for callers outside
a graph): one top-k with constant k and one-hot comparisons, static shapes, so the pruned prefill exports.
Refuses: any LLM layer but 0, `vision_layers` empty, unordered or outside the layers feeding the LLM (a
one-layer tower has none before its feature layer: give `vision_layers=[0]`), VLMs whose vision encoder is not
in the captured graph or has no CLS token (the relay), and ratios outside (0, 1] / decays outside [0, 1).
Progressive: `prune_layers` outside `0..F-1` or before the first scored layer, a scored layer after the last
prune layer (its score would select nothing), `prune_keep` counts that rise, leave `1..P` or do not end at the
kept count, and either of them without `progressive=True`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from tokenreduce.analysis.attention import Attention
from tokenreduce.analysis.blocks import analyse_block
from tokenreduce.ir.graph import Builder, reach
from tokenreduce.kernels import reference as ref
from tokenreduce.kernels import vision_ops
from tokenreduce.methods.base import Options, check_bool, check_int_list, fail, option
from tokenreduce.methods.hiprune import attention_map, vision_layers
from tokenreduce.methods.prefill import BeforeLlmMethod, BeforeLlmOptions, VisionSite

tr = torch.ops.tokenreduce
aten = torch.ops.aten

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
    progressive: bool = option(False, "drop patches inside the vision tower between layers, as the official code "
                                      "(later vision layers run on fewer tokens); default: select once at the "
                                      "feature layer")
    prune_layers: tuple[int, ...] | None = option(None, "progressive: vision layers (0-based, increasing, before the "
                                                        "feature layer) after which patches are dropped; default: "
                                                        "the official every other layer back from the one before "
                                                        "the feature layer")
    prune_keep: tuple[int, ...] | None = option(None, "progressive: patches kept after each prune layer "
                                                      "(non-increasing, the last = the kept count); default: "
                                                      "falling linearly to the kept count")

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
        check_bool("progressive", self.progressive)
        for name in ("prune_layers", "prune_keep"):
            if getattr(self, name) is not None and not self.progressive:
                raise fail(name, f"{name} sets FlowCut's pruning inside the vision tower: it needs progressive=True")
        if self.prune_layers is not None:
            layers = check_int_list("prune_layers", self.prune_layers, lo=0)
            if not layers or any(b <= a for a, b in zip(layers, layers[1:])):
                raise fail("prune_layers", f"prune_layers must be strictly increasing and not empty, got {list(layers)}")
            self.set("prune_layers", tuple(layers))
        if self.prune_keep is not None:
            counts = check_int_list("prune_keep", self.prune_keep, lo=1)
            if not counts:
                raise fail("prune_keep", "prune_keep must give one count per prune layer, got none")
            self.set("prune_keep", tuple(counts))  # their order and last value are checked against the schedule


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

    @staticmethod
    def prune_schedule(options: FlowcutOptions, scored: tuple[int, ...], feature_layer: int, patches: int,
                       keep: int) -> list[tuple[int, int]]:
        """Progressive: (vision layer, patches kept after it) per prune layer, in order; the last keeps `keep`."""
        if options.prune_layers is None:
            layers = [i for i in range(scored[0], feature_layer) if (feature_layer - 1 - i) % 2 == 0]
        else:
            layers = list(options.prune_layers)
            if layers[-1] >= feature_layer or layers[0] < scored[0]:
                raise fail("prune_layers", f"prune_layers must be vision layers {scored[0]}..{feature_layer - 1}: at "
                                           f"or after the first scored layer ({scored[0]}) and before the one the "
                                           f"projector reads ({feature_layer}), got {layers}")
        if not layers:
            raise fail("prune_layers", f"no vision layer lies between the first scored layer ({scored[0]}) and the "
                                       f"one the projector reads ({feature_layer}) to prune after")
        if scored[-1] > layers[-1]:
            raise fail("vision_layers", f"vision layer {scored[-1]} is scored after the last prune layer "
                                        f"{layers[-1]}, so its score would select nothing; score layers up to "
                                        f"{layers[-1]} or prune later")
        if options.prune_keep is None:
            m = len(layers)
            counts = [patches - round((patches - keep) * (j + 1) / m) for j in range(m)]
        else:
            counts = list(options.prune_keep)
            if (len(counts) != len(layers) or counts[-1] != keep or counts[0] > patches
                    or any(b > a for a, b in zip(counts, counts[1:]))):
                raise fail("prune_keep", f"prune_keep must give one count per prune layer ({len(layers)}: "
                                         f"{layers}), non-increasing, at most the {patches} patches and ending at "
                                         f"the kept count {keep}, got {counts}")
        return list(zip(layers, counts))

    def emit_vision(self, options: Options, site: VisionSite, keep: int) -> tuple[fx.Node, fx.Node]:
        assert isinstance(options, FlowcutOptions)
        atts = vision_layers(site)
        scored = self.scored_layers(options, len(atts) - 1)
        if options.progressive:
            return self._emit_progressive(options, site, atts, scored, keep)
        chosen = [atts[i] for i in scored]
        rows = [attention_map(site, a, rows=1) for a in chosen]  # the CLS query's row: [B, 1, N]
        kept = site.builder.add(tr.flowcut_plan.default, (rows, [a.v for a in chosen], keep, options.decay, 1))
        return site.features, kept

    def _emit_progressive(self, options: FlowcutOptions, site: VisionSite, atts: list[Attention],
                          scored: tuple[int, ...], keep: int) -> tuple[fx.Node, fx.Node]:
        """Score each scored layer on its survivors, prune after each prune layer (the layer's output is
        replaced by the CLS and the kept patches, so the next layers run on them; `fix_token_shapes` rewrites
        their shapes), then place the feature layer's outputs back at their patches' original indices."""
        patches = int(site.features.meta["val"].shape[1]) - 1
        steps = self.prune_schedule(options, scored, len(atts) - 1, patches, keep)
        schedule = dict(steps)
        site.notes.append(f"flowcut: vision tower pruned in {len(steps)} steps, patches kept "
                          + ", ".join(f"after layer {i}: {n}" for i, n in steps)
                          + f" (of {patches}); vision layers {steps[0][0] + 1}..{len(atts) - 1} run on the survivors")
        graph = site.features.graph
        up = set(reach([site.features], "all_input_nodes", None))
        cum: fx.Node | None = None
        origins: fx.Node | None = None
        layers = [i for i in range(max(schedule) + 1) if i in scored or i in schedule]
        outputs = {i: layer_output(atts[i], up, i) for i in layers}  # read before any rewiring
        for i in layers:
            att, out = atts[i], outputs[i]
            b = Builder(graph, out, like=att.node)
            if i in scored:
                q = b.add(aten.slice.Tensor, (att.q, 2, 0, 1))  # the CLS query's row
                row = b.add(vision_ops.head_mean_attention, (q, att.k, att.mask, att.scale))
                score = b.add(vision_ops.flowcut_layer_scores, (row, att.v, 1))
                cum = score if cum is None else b.add(vision_ops.flowcut_accumulate, (cum, score, options.decay))
            if i in schedule:
                assert cum is not None  # the schedule starts at or after the first scored layer
                if origins is None:
                    origins = b.add(vision_ops.patch_origins, (out, 1))
                index = b.add(vision_ops.flowcut_prune_index, (cum, schedule[i]))
                pruned = b.add(vision_ops.keep_patches, (out, index, 1))
                out.replace_all_uses_with(pruned, delete_user_cb=b.is_outside)
                cum = b.add(ref.gather_tokens, (cum, index, 1))
                origins = b.add(ref.gather_tokens, (origins, index, 1))
        assert origins is not None
        placed = site.builder.add(vision_ops.place_patches, (site.features, origins, patches, 1))
        kept = site.builder.add(vision_ops.origins_mask, (origins, patches))
        return placed, kept


def layer_output(att: Attention, up: set[fx.Node], index: int) -> fx.Node:
    """The output of the pre-LN vision layer around `att` (the residual add after its MLP) among `up`."""
    blk = analyse_block(index, att)
    outs = [u for u in (blk.residual_add.users if blk.residual_add is not None else ())
            if u.target is aten.add.Tensor and u in up]
    if blk.layout != "pre-ln" or len(outs) != 1:
        raise fail("progressive", f"vision layer {index} is not a pre-LN block with one residual output, so FlowCut "
                                  "cannot prune after it; use progressive=False (select once at the feature layer)")
    return outs[0]


METHOD = Flowcut()
