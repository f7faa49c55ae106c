"""DivPrune: keep the most diverse span tokens (max-min diversity, greedy k-center on cosine distance),
before the LLM, so its prefill and KV cache shrink from the first layer.

Source: Alvar, Singh, Akbari, Zhang, "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025 (official code vbdi/divprune, `LLaVA/llava/model/llava_arch.py`, read, not copied).
The paper selects among the projected visual tokens (the LLM's input embeddings of the image span) with
a greedy solution of the max-min diversity problem: first the token whose nearest other token is
farthest, then repeatedly the token farthest (in cosine distance) from everything selected; the kept
tokens stay in their original order and keep their original positions. Default keep ratio 0.098, the
official script's `SUBSET_RATIO`.

Where this departs from the official code, on purpose:

* the keep count is `ceil(keep_ratio * span)` like every prefill method here (the official code rounds;
  the two differ by at most one token);
* an already-selected token is never selected again (the official code relies on its distance to itself
  being exactly 0, which exact duplicates among the candidates break);
* batch > 1: each row selects among its own span tokens (the official code handles one prompt);
* `layers=[L]` selects on block L's input instead of the embeddings (the paper's layer-0 setting is the
  default; its ablation prunes inside the LLM the same way).

The selection is `tokenreduce::kcenter_scores` (`kernels/decoder_ops.py`): `keep` fixed steps of argmax,
so the graph is static and exports to ONNX. Refuses more than one layer, layers out of range, and keep
ratios outside (0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from tokenreduce.kernels import decoder_ops  # noqa: F401  (registers tokenreduce::kcenter_scores)
from tokenreduce.methods.base import Options, Stage, option
from tokenreduce.methods.prefill import SelectionMethod, SelectionOptions, SelectionSite, checked_layers, ratio_keep

tr = torch.ops.tokenreduce

DIVPRUNE_KEEP_RATIO = 0.098  # the official run script's SUBSET_RATIO (LLaVA-1.5: 56 of 576 visual tokens)


@dataclass(frozen=True)
class DivpruneOptions(SelectionOptions):
    keep_ratio: float = option(DIVPRUNE_KEEP_RATIO, "fraction of the span tokens kept, in (0, 1] (default: the "
                                                    "paper's 0.098)")


class Divprune(SelectionMethod):
    name = "divprune"
    summary = "keep the most diverse span tokens, greedy max-min on cosine distance, before the LLM (Alvar et al., " \
              "CVPR 2025)"
    options_type = DivpruneOptions

    def default_layers(self, num_layers: int) -> tuple[int, ...]:
        return (0,)

    def stages(self, options: Options, num_layers: int, span: int) -> list[Stage]:
        assert isinstance(options, DivpruneOptions)
        layer = checked_layers(self, options, num_layers)[0]
        return [Stage(score_block=layer, first_reduced_block=layer, keep=ratio_keep(options.keep_ratio, span))]

    def emit_scores(self, options: Options, site: SelectionSite) -> fx.Node:
        return site.builder.add(tr.kcenter_scores.default, (site.hidden, site.droppable, site.keep, site.num_droppable))


METHOD = Divprune()
