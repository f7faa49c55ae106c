"""DART: duplication-aware token reduction around pivot tokens, at one layer inside the LLM.

Source: Wen, Gao, Wang, Zhang, Zhang, Li, He, Zhang, "Stop Looking for Important Tokens in Multimodal
Language Models: Duplication Matters More", 2025 (official code ZichenWen1/DART, read as the mirror
xqy1111111/DART: `llava/model/language_model/modeling_llama_self.py`, `get_retained_image_token`; read,
not copied). Before layer K (default 2), pivots are picked by the L1 norm of layer K-1's keys (after
rotary, all heads): `pivot_image_tokens` span tokens and `pivot_text_tokens` tokens of the question (the
real tokens after the span). The image pivots are kept; each pivot then keeps the span tokens least
cosine-similar to it (the ones it does not duplicate), measured on the hidden states entering layer K;
layers K.. run on the kept tokens, which keep their original positions. Defaults: K=2, 4 + 4 pivots,
keep ratio 0.222 (the official scripts' 128 of LLaVA-1.5's 576 image tokens).

Where this departs from the official code, on purpose:

* the keep count is exact: `ceil(keep_ratio * span)` span tokens, the image pivots included; the
  `keep - pivot_image_tokens` others are shared equally among all pivots, the remainder to the first
  (the official code gives each pivot `budget // pivots` and keeps the image pivots on top);
* pivots act in sequence order (the official code iterates a Python set of indices, whose order is the
  hash table's);
* cosine similarity on the hidden states as they enter layer K; the official code first applies the
  LLM's final RMSNorm, whose per-token scale cancels in the cosine but whose elementwise weight does not
  (the analysis does not expose the final norm's weight to apply it);
* batch > 1: each row picks its own pivots among its own span and question, padding excluded (read from
  the last query's row of layer K-1's attention mask, so on a sliding-window layer a question token outside
  the last token's window is not a pivot either); a row whose question has fewer such tokens than
  `pivot_text_tokens` repeats its best text pivot (the last prompt token always qualifies).

The selection is `tokenreduce::dart_scores` (`kernels/decoder_ops.py`): a fixed number of top-k steps with
constant k, so the graph is static and exports to ONNX. Refuses: more than one layer, layer 0 (the keys of
layer K-1 rank the pivots), keep counts below the image pivots, no pivots at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from tokenreduce.kernels import decoder_ops  # noqa: F401  (registers tokenreduce::dart_scores)
from tokenreduce.methods.base import Options, Stage, check_int, fail, option
from tokenreduce.methods.prefill import SelectionMethod, SelectionOptions, SelectionSite, checked_layers, ratio_keep

tr = torch.ops.tokenreduce

DART_LAYER = 2  # the official scripts' pruned_layer
DART_KEEP_RATIO = 0.222  # max_num_trunction 128 of 576 image tokens (LLaVA-1.5)
DART_PIVOTS = 4  # pivot_image_token = pivot_text_token = 4


@dataclass(frozen=True)
class DartOptions(SelectionOptions):
    keep_ratio: float = option(DART_KEEP_RATIO, "fraction of the span tokens kept, pivots included, in (0, 1] "
                                                "(default: the paper's 128 of 576, 0.222)")
    pivot_image_tokens: int = option(DART_PIVOTS, "pivots taken from the span (highest key L1 norm), kept")
    pivot_text_tokens: int = option(DART_PIVOTS, "pivots taken from the real tokens after the span (the question)")

    def validate(self) -> None:
        super().validate()
        check_int("pivot_image_tokens", self.pivot_image_tokens, lo=0)
        check_int("pivot_text_tokens", self.pivot_text_tokens, lo=0)
        if self.pivot_image_tokens + self.pivot_text_tokens < 1:
            raise fail("pivot_image_tokens", "dart needs at least one pivot: pivot_image_tokens + "
                                             "pivot_text_tokens must be >= 1")


class Dart(SelectionMethod):
    name = "dart"
    summary = "at layer K, keep pivot tokens and the span tokens that duplicate them least (Wen et al., 2025)"
    options_type = DartOptions

    def default_layers(self, num_layers: int) -> tuple[int, ...]:
        return (min(DART_LAYER, num_layers - 1),)

    def stages(self, options: Options, num_layers: int, span: int) -> list[Stage]:
        assert isinstance(options, DartOptions)
        layer = checked_layers(self, options, num_layers)[0]
        if layer < 1:
            raise fail("layers", f"dart picks its pivots with the keys of the layer before the pruned one: layers "
                                 f"must be >= 1, got [{layer}]")
        keep = ratio_keep(options.keep_ratio, span)
        if options.pivot_image_tokens > span:
            raise fail("pivot_image_tokens", f"pivot_image_tokens={options.pivot_image_tokens} but the prompt's span "
                                             f"has {span} tokens; choose 0..{span}")
        if keep < options.pivot_image_tokens:
            raise fail("keep_ratio", f"keep_ratio={options.keep_ratio} keeps {keep} of {span} span tokens, fewer than "
                                     f"the {options.pivot_image_tokens} image pivots (which are kept); raise keep_ratio "
                                     "or lower pivot_image_tokens")
        return [Stage(score_block=layer - 1, first_reduced_block=layer, keep=keep)]

    def emit_scores(self, options: Options, site: SelectionSite) -> fx.Node:
        assert isinstance(options, DartOptions)
        if site.keys is None:
            raise fail("method", "dart: the layer before the pruned one has no cached keys to rank pivots with")
        return site.builder.add(tr.dart_scores.default, (site.hidden, site.keys, site.droppable, site.mask, site.keep,
                                                          site.num_droppable, options.pivot_image_tokens,
                                                          options.pivot_text_tokens))


METHOD = Dart()
