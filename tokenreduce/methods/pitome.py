"""PiToMe: protect the isolated tokens, merge among the redundant ones (energy score + bipartite merging).

Source: Tran, Nguyen, Nguyen, Nguyen, Le, Xie, Sonntag, Zou, Nguyen, Niepert, "Accelerating Transformers with
Spectrum-Preserving Token Merging", NeurIPS 2024, and the arithmetic of its official code (hchautran/PiToMe,
`algo/pitome/merge.py`: `pitome_vision` for the energy, `pitome` and `pitome_bsm` for the merge;
`algo/pitome/patch/deit.py` for the margin schedule and which layers use which merge; read, not copied).
At a block that merges `r` tokens:

1. `metric` = the attention keys averaged over heads, L2-normalised; `sim = metric @ metric^T` over the
   candidate tokens (every token after the `P` protected leading ones).
2. Energy of token i: `mean_j elu(sim_ij - m, alpha)` over all candidates j (itself included, as the official
   code). The margin falls with depth: `m = 0.75 * (1 - l / L)` at block l of L (official ViT schedule), or one
   constant `margin` for every block (as the official `apply_patch(margin=...)`).
3. Rank the candidates by energy, highest first; ranks 0, 2, 4, ... are set A, ranks 1, 3, 5, ... set B.
4. Protect-and-merge (official `pitome`): only the `2r` highest ranks are split; every A token merges into its
   most similar B token, and the `N - P - 2r` lowest-energy (most isolated) tokens are kept untouched. Output
   order: protected leading tokens, kept tokens in energy order, B tokens.
   Energy-ordered matching (official `pitome_bsm`, the blocks in `bsm_layers`; by default the first half, as
   the official timm/DeiT patch): all candidates are split, and ToMe's matching merges the r most similar
   A -> B pairs (`kernels.plans.plan_from_matches`). Output order: protected, unmerged A, B.
   Both kinds decide "most similar" on the exact squared distance of each A token's two best B tokens by
   cosine (`best_matches`): a float32 cosine near 1 is too coarse to rank nearly parallel keys the same way in
   torch and onnxruntime (issue 12).
5. Size-weighted average, as ToMe.

The plan is a plain torch function (`pitome_plan`) emitted as one graph node: it traces into standard ops for
eager, inductor and ONNX (top-k with constant k, gathers, no scatter, no data-dependent shapes). The per-block
r schedule, its limits and `clamp_r` are ToMe's (`Pitome` subclasses `Tome`), because PiToMe merges r tokens per
block under the same bound `r <= (N - P) // 2`.

Deliberate differences from the official code, each documented in docs/methods.md ("PiToMe"):
* one formula for every model: the official text patches use a Gaussian-kernel energy with a halves split,
  and other official patches pick other layers for `pitome_bsm` (MAE: the second half; BLIP: none);
* all `P` protected leading tokens are excluded (the official code excludes the CLS token only);
* padding (the official vision code has none; its text code ignores the mask): energies are averaged over
  real tokens, padding tokens are ranked before any real token, and merges never average real tokens with
  padding (see `candidate_order`);
* proportional attention is on by default, as ToMe here (the official timm block never passes sizes to its
  attention; `prop_attn=False` matches it).

Refuses: `r` larger than `(N - P) // 2` at a block (the error names the largest valid r; `clamp_r=True`
merges as many as possible and the report says so); `margin` outside [-1, 1]; `alpha` not positive;
`bsm_layers` outside the model's blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tokenreduce.analysis.encoder import ModelAnalysis
from tokenreduce.kernels import reference as ref
from tokenreduce.kernels.plans import merge_metric, plan_from_matches
from tokenreduce.methods.base import (
    BlockPlan,
    Options,
    PlanNodes,
    Site,
    check_int_list,
    fail,
    option,
)
from tokenreduce.methods.tome import Tome, TomeOptions

MARGIN_START = 0.75  # official ViT schedule (patch/deit.py, patch/mae.py): m_l = 0.75 - 0.75 * l / L


def margin_schedule(index: int, num_blocks: int, margin: float | None = None) -> float:
    """The energy margin at block `index` of `num_blocks`: `margin` if given, else `0.75 * (1 - index / L)`."""
    if margin is not None:
        return float(margin)
    return MARGIN_START - MARGIN_START * index / num_blocks


def energy_score(metric: torch.Tensor, margin: float, alpha: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Energy of each token: `mean_j elu(cos(i, j) - margin, alpha)` -> `[B, M]`.

    Args:
        metric: `[B, M, d]` L2-normalised keys of the candidate tokens.
        valid: optional `[B, M]` bool; the mean runs over valid tokens j only (padding rows still get a value,
            which `candidate_order` ignores).
    """
    e = F.elu(metric @ metric.transpose(-1, -2) - margin, alpha=alpha)  # [B, M, M]
    if valid is None:
        return e.mean(dim=-1)
    w = valid[:, None, :].to(e.dtype)
    return (e * w).sum(dim=-1) / w.sum(dim=-1).clamp(min=1.0)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """`[B, M]` permutation rows -> their inverses (`out[b, perm[b, q]] = q`), by a constant-k top-k (no scatter)."""
    return perm.topk(perm.shape[-1], dim=-1, largest=False, sorted=True).indices


def candidate_order(energy: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the candidates for one PiToMe step: `(order, pos)`, `order [B, M]` the candidate at each
    position (merge candidates first), `pos [B, M]` each candidate's position (the inverse).

    Without padding the order is by energy, highest first. With padding (`valid [B, M]`) a row's padding
    tokens come first (by index), then its real tokens by energy. At a protect-and-merge step padding, which
    costs compute and carries nothing, is merged away before any real token, and a real A token always has a
    real B token right after it, so a real token is never merged into padding; the energy-ordered matching
    treats padding as ToMe does (cross-padding pairs last, merged with weight 0).
    """
    m = energy.shape[-1]
    if valid is None:
        order = energy.topk(m, dim=-1, largest=True, sorted=True).indices
        return order, inverse_permutation(order)
    key = energy.masked_fill(~valid, torch.finfo(energy.dtype).min)
    rank = inverse_permutation(key.topk(m, dim=-1, largest=True, sorted=True).indices)  # reals: 0..R-1
    pad = (~valid).long()
    pos = torch.where(valid, rank + pad.sum(dim=-1, keepdim=True), pad.cumsum(dim=-1) - 1)
    return inverse_permutation(pos), pos


def pitome_plan(
    metric: torch.Tensor,
    r: int,
    num_protected: int,
    margin: float,
    alpha: float = 1.0,
    valid: torch.Tensor | None = None,
    bsm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan one PiToMe merge step (same contract as `kernels.plans.bipartite_plan`).

    Args:
        metric: `[B, H, N, d]` attention keys (averaged over heads here) or `[B, N, d]` head-averaged keys.
        r: tokens to merge away (output has `N - r` tokens); `0 <= r <= (N - P) // 2`.
        num_protected: leading tokens kept in place and left out of the energy (CLS, distillation, registers).
        margin: energy margin `m` of this block.
        alpha: ELU alpha of the energy.
        valid: optional `[B, N]` bool, False for padding. Real and padding tokens never average together.
        bsm: False: protect the `N - P - 2r` lowest-energy tokens and merge every A of the `2r` highest into its
            best B (official `pitome`). True: split all candidates A/B by energy rank and merge the r most
            similar A -> B pairs, ToMe's matching (official `pitome_bsm`).

    Returns:
        slot: `[B, N]` int64, output slot of each input token.
        rep: `[B, N - r]` int64, representative input token of each output slot (the B token of a merge).
        keep: `[B, N]` merge-weight multiplier (metric dtype): 1, or 0 for a source merged across padding
            (a padding token with no padding partner; with `bsm`, also a real one when r leaves no choice).
    """
    metric = merge_metric(metric, r, num_protected, "PiToMe", setting="r")
    bsz, n, _ = metric.shape
    p = num_protected
    device = metric.device
    prot = torch.arange(p, device=device).expand(bsz, p)
    if r == 0:
        ident = torch.arange(n, device=device).expand(bsz, n)
        return ident, ident, torch.ones(bsz, n, dtype=metric.dtype, device=device)
    cand = F.normalize(metric[:, p:], p=2.0, dim=-1)  # [B, M, d]
    vc = valid[:, p:] if valid is not None else None
    order, pos = candidate_order(energy_score(cand, margin, alpha, vc), vc)
    step = _energy_bipartite if bsm else _protect_and_merge
    slot_c, rep_c, keep_c = step(cand, order, pos, r, vc)
    slot = torch.cat([prot, p + slot_c], dim=1)
    keep = torch.cat([torch.ones(bsz, p, dtype=keep_c.dtype, device=device), keep_c], dim=1)
    return slot, torch.cat([prot, p + rep_c], dim=1), keep


def _cross_padding(scores: torch.Tensor, va: torch.Tensor | None, vb: torch.Tensor | None) -> torch.Tensor:
    """A -> B scores `[B, nA, nB]` with cross-padding pairs below every cosine: -2 for padding into a real
    token, -3 for a real token into padding (as ToMe, `kernels.plans.bipartite_plan`)."""
    if va is None or vb is None:
        return scores
    scores = scores.masked_fill(~va[:, :, None] & vb[:, None, :], -2.0)
    return scores.masked_fill(va[:, :, None] & ~vb[:, None, :], -3.0)


def _protect_and_merge(cand: torch.Tensor, order: torch.Tensor, pos: torch.Tensor, r: int,
                       vc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official `pitome`: every A of the 2r first-ordered candidates merges into its best B; the rest are kept.
    Candidate-space `slot [B, M]`, `rep [B, M - r]`, `keep [B, M]`; output order: kept, then B."""
    bsz, m, _ = cand.shape
    a_idx, b_idx, kept = order[:, 0:2 * r:2], order[:, 1:2 * r:2], order[:, 2 * r:]  # [B, r], [B, r], [B, M-2r]
    va = vb = None
    if vc is not None:
        va, vb = vc.gather(1, a_idx), vc.gather(1, b_idx)
    _, dst = best_matches(cand, a_idx, b_idx, va, vb)  # [B, r] best B (index into b_idx) of each A
    keep_a = torch.ones(bsz, r, dtype=cand.dtype, device=cand.device)
    if va is not None and vb is not None:
        keep_a = keep_a.masked_fill(va != vb.gather(1, dst), 0.0)
    # Slot of each candidate from its position q: kept tokens (q >= 2r) first, in order; B tokens (odd q) last,
    # in rank order; an A token (even q < 2r) goes to its B's slot.
    is_a = (pos < 2 * r) & (pos % 2 == 0)
    a_of = torch.clamp(pos // 2, max=r - 1)  # A index of an A token (clamped for the others)
    b_of = torch.where(is_a, dst.gather(1, a_of), pos // 2)
    slot = torch.where(pos >= 2 * r, pos - 2 * r, m - 2 * r + b_of)
    keep = torch.where(is_a, keep_a.gather(1, a_of), torch.ones_like(keep_a[:, :1]))
    return slot, torch.cat([kept, b_idx], dim=1), keep


def _energy_bipartite(cand: torch.Tensor, order: torch.Tensor, pos: torch.Tensor, r: int,
                      vc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official `pitome_bsm`: ToMe's bipartite matching over the candidates in energy order (A = even ranks,
    B = odd ranks), through `kernels.plans.plan_from_matches` on that order. Output order: the unmerged A
    tokens (most similar edge first, as the official code), then B in rank order."""
    m = cand.shape[1]
    a_idx, b_idx = order[:, 0::2], order[:, 1::2]
    va = vb = v_ord = None
    if vc is not None:
        v_ord = vc.gather(1, order)
        va, vb = v_ord[:, 0::2], v_ord[:, 1::2]
    node_max, node_idx = best_matches(cand, a_idx, b_idx, va, vb)
    slot_o, rep_o, keep_o = plan_from_matches(node_max, node_idx, r, 0, v_ord, m, cand.dtype)  # in `order` space
    return slot_o.gather(1, pos), order.gather(1, rep_o), keep_o.gather(1, pos)


REFINE_K = 2
"""Best-B candidates per A token (by cosine) whose distance is recomputed exactly in `best_matches`."""


def best_matches(cand: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, va: torch.Tensor | None,
                 vb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each A token's most similar B token: `(score, index into b_idx)`, both `[B, nA]`.

    The ranking is by cosine, but not by the float32 dot product: for nearly parallel unit keys (cosines of
    0.998-0.9994 between the tokens of a random-init ViT-B, 1 - cos ~ 1e-3) a dot product keeps only about
    four significant digits of the dissimilarity (float32's spacing near 1 is 6e-8), and onnxruntime's and
    torch's matmuls, summing in different orders, differ by several of those steps. Coincident values and
    near-ties are then common, and which of two pairs merges (the edge ranking at the r boundary) was decided
    by rounding: eager and onnxruntime took different branches (issue 12: PiToMe r=16 on ViT-B/16, an exact
    float32 tie 0.9983498454 between two pairs whose float64 cosines differ by 1.4e-7). So the dot product
    only preselects the `REFINE_K` best B tokens of each A, and their squared distance `|a - b|^2`
    (= 2 - 2 cos for unit rows) is recomputed from the differences, exact to float32's relative precision of
    the small distance itself (~1e-10 here, against runtime differences of ~1e-9 coming from the keys).
    The score returned is `-|a - b|^2 / 4` (= (cos - 1) / 2, in [-1, 0]); cross-padding pairs keep
    `_cross_padding`'s sentinels (-2, -3), so `plan_from_matches`' tie rule (below -1.5) still finds them.
    Mathematically the same matching as the official argmax of cosines."""
    a, b = _rows(cand, a_idx), _rows(cand, b_idx)  # [B, nA, d], [B, nB, d]
    scores = _cross_padding(a @ b.transpose(-1, -2), va, vb)  # [B, nA, nB]
    bsz, n_a, n_b = scores.shape
    top, near = scores.topk(min(REFINE_K, n_b), dim=-1, largest=True, sorted=True)  # [B, nA, k]
    rows = _rows(b, near.reshape(bsz, -1)).reshape(bsz, n_a, near.shape[-1], -1)  # [B, nA, k, d]
    dist = (a[:, :, None, :] - rows).square().sum(dim=-1)  # [B, nA, k]
    refined = torch.where(top < -1.5, top, -0.25 * dist)
    best = refined.argmax(dim=-1, keepdim=True)  # ties: the first, i.e. the higher cosine, in torch and ONNX
    return refined.gather(-1, best)[..., 0], near.gather(-1, best)[..., 0]


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x [B, M, d]` rows picked by `index [B, K]` -> `[B, K, d]`."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


@dataclass(frozen=True)
class PitomeOptions(TomeOptions):
    margin: float | None = option(None, "energy margin m for every block; default: the official ViT schedule "
                                        "0.75 * (1 - l / L) at block l of L (high early, falling with depth)")
    alpha: float = option(1.0, "ELU alpha of the energy score (official default 1.0)")
    bsm_layers: tuple[int, ...] | None = option(
        None, "blocks (0-based) that merge by bipartite matching over all candidates split by energy rank "
              "(official pitome_bsm) instead of protecting the low-energy tokens; default: the first half, "
              "ceil(L / 2), as the official timm/DeiT patch; [] for the protect-and-merge step everywhere")

    def validate(self) -> None:
        super().validate()
        if self.margin is not None:
            self.set("margin", _finite("margin", self.margin))
            if not -1.0 <= self.margin <= 1.0:
                raise fail("margin", f"margin must be in [-1, 1] (it is compared with cosine similarities), "
                                     f"got {self.margin}")
        self.set("alpha", _finite("alpha", self.alpha))
        if self.alpha <= 0.0:
            raise fail("alpha", f"alpha must be > 0, got {self.alpha}")
        if self.bsm_layers is not None:
            self.set("bsm_layers", check_int_list("bsm_layers", self.bsm_layers, lo=None))


def bsm_blocks(num_blocks: int, bsm_layers: tuple[int, ...] | None) -> set[int]:
    """Blocks that use the energy-ordered bipartite matching: `bsm_layers`, else the first ceil(L / 2)."""
    return set(range(math.ceil(num_blocks / 2))) if bsm_layers is None else set(bsm_layers)


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise fail(name, f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass
class PitomePlan(BlockPlan):
    """ToMe's block plan plus this block's constant arguments of the plan node: the energy margin, and
    whether the block merges by energy-ordered bipartite matching (`bsm`)."""

    margin: float = 0.0
    bsm: bool = False


class Pitome(Tome):
    name = "pitome"
    summary = "protect low-energy (isolated) tokens, merge r per block among the rest (Tran et al., NeurIPS 2024)"
    options_type = PitomeOptions
    display_name = "PiToMe"
    merges = True

    def plan_blocks(self, options: Options, analysis: ModelAnalysis) -> list[BlockPlan]:
        assert isinstance(options, PitomeOptions)
        nb = len(analysis.blocks)
        bad = [i for i in options.bsm_layers or () if not 0 <= i < nb]
        if bad:  # check_layers would name `layers` as the setting at fault
            raise fail("bsm_layers", f"bsm_layers {bad} out of range: the model has {nb} transformer blocks "
                                     f"(valid 0..{nb - 1})")
        bsm = bsm_blocks(nb, options.bsm_layers)
        return [PitomePlan(**vars(bp), margin=margin_schedule(bp.index, nb, options.margin), bsm=bp.index in bsm)
                for bp in super().plan_blocks(options, analysis)]

    def emit(self, options: Options, site: Site) -> PlanNodes:
        assert isinstance(options, PitomeOptions) and isinstance(site.plan, PitomePlan)
        b = site.builder
        plan = b.add(pitome_plan, (site.k, site.plan.r, site.num_protected, site.plan.margin, options.alpha,
                                   site.valid, site.plan.bsm))
        slot, rep = b.item(plan, 0), b.item(plan, 1)
        weight = None  # sizes; with padding, sizes times the plan's keep (a padding source into a real B drops)
        if site.valid is not None:
            weight = b.add(ref.merge_weight, (site.size, b.item(plan, 2)))
        return PlanNodes(slot, weight, rep)

    def action(self, bp: BlockPlan, analysis: ModelAnalysis) -> str:
        if not isinstance(bp, PitomePlan):
            return f"pitome r={bp.r}"
        return f"pitome r={bp.r} m={bp.margin:.3g}" + (" bsm" if bp.bsm else "")


METHOD = Pitome()
