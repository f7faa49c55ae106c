"""VisionDrop: visual-only token dropping inside the LLM, in stages, with the dropped tokens merged by
similarity into a few contextual ones.

Source: Xu, Wang, Luo, Du, "Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment",
AAAI 2026 (arXiv 2506.22283; official code Ruixxxx/VisionDrop, `llava/model/modeling_llama_visiondrop.py`,
`visiondrop_rank_drop`; read, not copied). Text-guided scores suffer from the misalignment between text and
image tokens, so VisionDrop ranks visual tokens by **intra-modal** attention only: at each stage, the
head-averaged attention probabilities of the visual queries, restricted to the visual keys and averaged over
the visual queries (causal: a visual token is scored by the ones after it). Then, as VisionZip does in the
vision tower: the top `dominant` tokens are kept; among the others, in sequence order, every `R // contextual`-th
becomes a contextual target, each remaining token joins the target whose head-averaged key is most
cosine-similar, and a target's hidden state becomes `target + mean(joined)`. Stages at LLM layers 8/16/24 of
32 (the official `layer_list`), each keeping a share of the visual tokens still present.

Where this departs from the official code, on purpose:

* **Counts from one ratio.** The official code takes a per-stage list of (dominant, contextual) counts; here
  stage `s` of `S` keeps `ceil(span * keep_ratio ** (s / S))` span tokens (geometric, as the official 32-token
  schedule 48 -> 35 -> 26 -> 19 is), of which `round(contextual_ratio * keep)` are contextual targets
  (0.15 reproduces that schedule's 5/4/3). `keep_ratio` is the fraction of the span left after the last stage.
* **Scoring layer.** `layers` are the blocks whose input is pruned; the scores and keys are those of the
  block before, as the graph computes them (the official code recomputes the pruned block's own q and k
  on its input, an extra projection of every token).
* **No vision-tower stage.** The official pipeline first applies VisionZip in the vision encoder (e.g. 42
  dominant + 6 contextual tokens); that stage is `method="visionzip"` here, and the two are not combined in
  one call (docs/decoders.md).
* **Positions.** Kept and contextual tokens keep their original positions and order (the official code puts
  the contextual tokens after the dominant ones and renumbers the sequence).
* **Batch > 1.** Each row scores and merges its own visual tokens, padding excluded by the attention mask.

The plan is one op, `tokenreduce::visiondrop_plan` (defined here, with its pure-torch reference that ONNX
export inlines): top-k with constant k and one-hot matmuls, so the pruned prefill exports. Refuses: layer 0,
layers out of order or range, ratios out of range, attention whose queries are not `[B, H, N, d]`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from tokenreduce.kernels import decoder_ops
from tokenreduce.methods.base import Options, Stage, option
from tokenreduce.methods.prefill import SelectionMethod, SelectionSite
from tokenreduce.methods.sparsevlm import (
    NAMESPACE,
    attention_operands,
    attention_stages,
    check_staged,
    head_mean_probs,
    one_hot_rows,
    scaled_layers,
    take,
    to_sequence,
)

VISIONDROP_FRACTIONS = (8 / 32, 16 / 32, 24 / 32)  # layer_list [8, 16, 24] of LLaVA-1.5's 32 layers
VISIONDROP_KEEP_RATIO = 19 / 48  # the 32-token setting's LLM stages: 48 -> 35 -> 26 -> 19
VISIONDROP_CONTEXTUAL = 0.15  # round(0.15 * 35 / 26 / 19) = the official 5 / 4 / 3 contextual tokens


def visiondrop_plan_reference(hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None,
                              droppable: torch.Tensor, scale: float, softcap: float, causal: bool, dominant: int,
                              contextual: int, num_droppable: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One VisionDrop stage.

    Args:
        hidden: `[B, N, C]` hidden states entering the pruned block.
        q, k, bias, scale, softcap, causal: the previous block's attention (`sparsevlm.head_mean_probs`).
        droppable: `[B, N]` bool, exactly `num_droppable` span (visual) tokens per row.
        dominant, contextual: kept by score / contextual targets, `dominant + contextual` in 1..num_droppable.

    Returns:
        `scores [B, N]` float32 (1 for the dominant tokens and the targets, else 0) and `merged [B, N, C]`
        (`hidden` with each target replaced by `target + mean(joined)`).
    """
    s = num_droppable
    if not (0 <= dominant and 0 <= contextual and 1 <= dominant + contextual <= s):
        raise ValueError(f"dominant + contextual must be in 1..{s}, got {dominant} + {contextual}")
    idx = decoder_ops.span_positions(droppable, s)  # [B, S]
    probs = head_mean_probs(q, k, bias, scale, softcap, causal)  # [B, N, N]
    rows = probs.gather(1, idx[:, :, None].expand(-1, -1, probs.shape[-1]))  # visual queries [B, S, N]
    score = rows.gather(2, idx[:, None, :].expand(-1, s, -1)).mean(1)  # visual keys, mean over queries [B, S]
    bsz = hidden.shape[0]
    dom = score.topk(dominant, dim=-1).indices if dominant else idx.new_zeros(bsz, 0)
    dom_mask = one_hot_rows(dom, s).sum(1) > 0  # [B, S]
    feats = take(hidden, idx).float()
    rest = s - dominant
    if contextual == 0 or rest == contextual:  # nothing joins a target: a plain selection
        kept = dom_mask if contextual == 0 else torch.ones_like(dom_mask)
        return decoder_ops.from_span(kept.float(), droppable), hidden.clone()
    others_idx = decoder_ops.span_positions(~dom_mask, rest)  # [B, R] the non-dominant slots, ascending
    step = max(1, rest // contextual)
    targets = list(range(0, rest, step))[:contextual]
    joiners = [i for i in range(rest) if i not in targets]
    t_pos, o_pos = others_idx[:, targets], others_idx[:, joiners]
    keys = decoder_ops.unit_rows(take(k.float().mean(1), idx))  # [B, S, d] head-averaged keys, unit length
    sim = take(keys, o_pos) @ take(keys, t_pos).transpose(1, 2)  # [B, J, T]
    assign = one_hot_rows(sim.argmax(-1), len(targets))  # [B, J, T]
    added = assign.transpose(1, 2) @ take(feats, o_pos) / assign.sum(1).clamp_min(1.0)[:, :, None]  # [B, T, C]
    at = one_hot_rows(t_pos, s)  # [B, T, S]
    feats = feats + at.transpose(1, 2) @ added
    kept = dom_mask | (at.sum(1) > 0)
    return decoder_ops.from_span(kept.float(), droppable), to_sequence(feats, droppable, hidden)


@torch.library.custom_op(f"{NAMESPACE}::visiondrop_plan", mutates_args=())
def visiondrop_plan(hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None,
                    droppable: torch.Tensor, scale: float, softcap: float, causal: bool, dominant: int, contextual: int,
                    num_droppable: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`visiondrop_plan_reference` as one graph node -> (`[B, N]` scores, `[B, N, C]` merged)."""
    scores, merged = visiondrop_plan_reference(hidden, q, k, bias, droppable, scale, softcap, causal, dominant,
                                               contextual, num_droppable)
    return scores.contiguous(), merged.contiguous()


@visiondrop_plan.register_fake
def _(hidden, q, k, bias, droppable, scale, softcap, causal, dominant, contextual, num_droppable):
    return hidden.new_empty(hidden.shape[:2], dtype=torch.float32), torch.empty_like(hidden)


@dataclass(frozen=True)
class VisiondropOptions(Options):
    layers: tuple[int, ...] | None = option(None, "blocks (0-based, >= 1) whose input is pruned, ranked by the "
                                                  "block before; default: the paper's 8/16/24 of 32, scaled")
    keep_ratio: float = option(VISIONDROP_KEEP_RATIO, "fraction of the span tokens left after the last stage, "
                                                      "in (0, 1]; earlier stages keep the geometric steps "
                                                      "(default 19/48)")
    contextual_ratio: float = option(VISIONDROP_CONTEXTUAL, "share of each stage's kept tokens that are contextual "
                                                            "targets absorbing the dropped ones, in [0, 1] (0: plain "
                                                            "dropping; default 0.15)")

    def validate(self) -> None:
        check_staged(self, self.layers, self.keep_ratio, "contextual_ratio", self.contextual_ratio, "no merging")


class Visiondrop(SelectionMethod):
    name = "visiondrop"
    summary = "visual-only: visual tokens' attention among themselves drops them in stages inside the LLM, " \
              "dropped ones merged by similarity (Xu et al., 2025)"
    options_type = VisiondropOptions

    def default_layers(self, num_layers: int) -> tuple[int, ...]:
        return scaled_layers(VISIONDROP_FRACTIONS, num_layers)

    def stages(self, options: Options, num_layers: int, span: int) -> list[Stage]:
        assert isinstance(options, VisiondropOptions)
        return attention_stages(self, options, num_layers, span, options.keep_ratio)

    @staticmethod
    def split(options: VisiondropOptions, keep: int) -> tuple[int, int]:
        """(dominant, contextual) of a stage keeping `keep` span tokens."""
        contextual = min(keep, round(options.contextual_ratio * keep))
        return keep - contextual, contextual

    def emit_scores(self, options: Options, site: SelectionSite) -> fx.Node:
        assert isinstance(options, VisiondropOptions)
        q, k, scale, cap, causal = attention_operands(self.name, site)
        dominant, contextual = self.split(options, site.keep)
        b = site.builder
        plan = b.add(torch.ops.tokenreduce.visiondrop_plan.default,
                     (site.hidden, q, k, site.mask, site.droppable, scale, cap, causal, dominant, contextual,
                      site.num_droppable))
        site.merged = b.item(plan, 1)
        return b.item(plan, 0)

    def references(self) -> dict[Any, Callable[..., Any]]:
        return {**super().references(), torch.ops.tokenreduce.visiondrop_plan.default: visiondrop_plan_reference}


METHOD = Visiondrop()
