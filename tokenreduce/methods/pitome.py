"""PiToMe: protect the isolated tokens, merge among the redundant ones (energy score + bipartite merging).

Source: Tran, Nguyen, Nguyen, Nguyen, Le, Xie, Sonntag, Zou, Nguyen, Niepert, "Accelerating Transformers with
Spectrum-Preserving Token Merging", NeurIPS 2024, and the arithmetic of its official code (hchautran/PiToMe,
`algo/pitome/merge.py`: `pitome_vision` for the energy, `pitome` for the merge; `algo/pitome/patch/deit.py`
for the margin schedule; read, not copied). At a block that merges `r` tokens:

1. `metric` = the attention keys averaged over heads, L2-normalised; `sim = metric @ metric^T` over the
   candidate tokens (every token after the `P` protected leading ones).
2. Energy of token i: `mean_j elu(sim_ij - m, alpha)` over all candidates j (itself included, as the official
   code). The margin falls with depth: `m = 0.75 * (1 - l / L)` at block l of L (official ViT schedule), or one
   constant `margin` for every block (as the official `apply_patch(margin=...)`).
3. Rank the candidates by energy, highest first. The `2r` highest are merge candidates, split alternately
   (ranks 0, 2, 4, ... are set A, ranks 1, 3, 5, ... set B); the `N - P - 2r` lowest-energy (most isolated)
   tokens are kept untouched.
4. Every A token merges into its most similar B token (size-weighted average, as ToMe).
5. Output order (official): the protected leading tokens, the kept tokens in energy order, the B tokens.

The plan is a plain torch function (`pitome_plan`) emitted as one graph node: it traces into standard ops for
eager, inductor and ONNX (top-k with constant k, gathers, no scatter, no data-dependent shapes). The per-block
r schedule, its limits and `clamp_r` are ToMe's (`Pitome` subclasses `Tome`), because PiToMe merges r tokens per
block under the same bound `r <= (N - P) // 2`.

Deliberate differences from the official code, each documented in docs/methods.md ("PiToMe"):
* every reducing block runs the PiToMe merge; the official DeiT/MAE patches run plain bipartite matching
  (`pitome_bsm`) in half of the layers, the text patches a Gaussian-kernel energy with a halves split;
* all `P` protected leading tokens are excluded (the official code excludes the CLS token only);
* padding (the official vision code has none; its text code ignores the mask): energies are averaged over
  real tokens, padding tokens are merge candidates before any real token, and merges never average real
  tokens with padding (see `candidate_order`);
* proportional attention is on by default, as ToMe here (the official timm block never passes sizes to its
  attention; `prop_attn=False` matches it).

Refuses: `r` larger than `(N - P) // 2` at a block (the error names the largest valid r; `clamp_r=True`
merges as many as possible and the report says so); `margin` outside [-1, 1]; `alpha` not positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tokenreduce.analysis.encoder import ModelAnalysis
from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels import reference as ref
from tokenreduce.kernels.plans import max_r
from tokenreduce.methods.base import BlockPlan, Options, PlanNodes, Site, fail, option
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
    tokens come first (by index), then its real tokens by energy: padding, which costs compute and carries
    nothing, is merged away before any real token, and a real A token always has a real B token right after
    it, so a real token is never merged into padding.
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan one PiToMe merge step (same contract as `kernels.plans.bipartite_plan`).

    Args:
        metric: `[B, H, N, d]` attention keys (averaged over heads here) or `[B, N, d]` head-averaged keys.
        r: tokens to merge away (output has `N - r` tokens); `0 <= r <= (N - P) // 2`.
        num_protected: leading tokens kept in place and left out of the energy (CLS, distillation, registers).
        margin: energy margin `m` of this block.
        alpha: ELU alpha of the energy.
        valid: optional `[B, N]` bool, False for padding. Real and padding tokens never average together.

    Returns:
        slot: `[B, N]` int64, output slot of each input token.
        rep: `[B, N - r]` int64, representative input token of each output slot (the B token of a merge).
        keep: `[B, N]` merge-weight multiplier (metric dtype): 1, or 0 for a padding token merged into a real
            one (a row's only remaining padding token, which has no padding partner).
    """
    if metric.dim() == 4:
        metric = metric.mean(dim=1)
    bsz, n, d = metric.shape
    p = num_protected
    if r < 0 or r > max_r(n, p):
        raise TokenReduceError(f"PiToMe r={r} is too large for {n} tokens with {p} protected; "
                               f"the largest valid r is {max_r(n, p)}", setting="r")
    device = metric.device
    prot = torch.arange(p, device=device).expand(bsz, p)
    if r == 0:
        ident = torch.arange(n, device=device).expand(bsz, n)
        return ident, ident, torch.ones(bsz, n, dtype=metric.dtype, device=device)
    m = n - p
    cand = F.normalize(metric[:, p:], p=2.0, dim=-1)  # [B, M, d]
    vc = valid[:, p:] if valid is not None else None
    order, pos = candidate_order(energy_score(cand, margin, alpha, vc), vc)
    a_idx, b_idx, kept = order[:, 0:2 * r:2], order[:, 1:2 * r:2], order[:, 2 * r:]  # [B, r], [B, r], [B, M-2r]

    scores = _rows(cand, a_idx) @ _rows(cand, b_idx).transpose(-1, -2)  # [B, r, r] cosine A -> B
    keep_a = torch.ones(bsz, r, dtype=metric.dtype, device=device)
    if vc is not None:  # a same-kind B always beats a cross-padding one (cosines are >= -1)
        va, vb = vc.gather(1, a_idx), vc.gather(1, b_idx)
        scores = scores.masked_fill(~va[:, :, None] & vb[:, None, :], -2.0)
        scores = scores.masked_fill(va[:, :, None] & ~vb[:, None, :], -3.0)
    dst = scores.argmax(dim=-1)  # [B, r] best B (index into b_idx) of each A
    if vc is not None:
        keep_a = keep_a.masked_fill(va != vb.gather(1, dst), 0.0)

    # Output slot of each candidate from its position q: kept tokens (q >= 2r) follow the protected ones in
    # energy order; B tokens (odd q) come last, in rank order; an A token (even q < 2r) goes to its B's slot.
    first_b = p + m - 2 * r
    is_a = (pos < 2 * r) & (pos % 2 == 0)
    a_of = torch.clamp(pos // 2, max=r - 1)  # A index of an A token (clamped for the others)
    b_of = torch.where(is_a, dst.gather(1, a_of), pos // 2)
    slot_c = torch.where(pos >= 2 * r, p + pos - 2 * r, first_b + b_of)
    keep_c = torch.where(is_a, keep_a.gather(1, a_of), torch.ones_like(keep_a[:, :1]))
    slot = torch.cat([prot, slot_c], dim=1)
    keep = torch.cat([torch.ones(bsz, p, dtype=metric.dtype, device=device), keep_c], dim=1)
    rep = torch.cat([prot, p + kept, p + b_idx], dim=1)
    return slot, rep, keep


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x [B, M, d]` rows picked by `index [B, K]` -> `[B, K, d]`."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


@dataclass(frozen=True)
class PitomeOptions(TomeOptions):
    margin: float | None = option(None, "energy margin m for every block; default: the official ViT schedule "
                                        "0.75 * (1 - l / L) at block l of L (high early, falling with depth)")
    alpha: float = option(1.0, "ELU alpha of the energy score (official default 1.0)")

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


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise fail(name, f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass
class PitomePlan(BlockPlan):
    """ToMe's block plan plus this block's energy margin (a constant argument of the plan node)."""

    margin: float = 0.0


class Pitome(Tome):
    name = "pitome"
    summary = "protect low-energy (isolated) tokens, merge r per block among the rest (Tran et al., NeurIPS 2024)"
    options_type = PitomeOptions
    display_name = "PiToMe"
    merges = True

    def plan_blocks(self, options: Options, analysis: ModelAnalysis) -> list[BlockPlan]:
        assert isinstance(options, PitomeOptions)
        nb = len(analysis.blocks)
        return [PitomePlan(**vars(bp), margin=margin_schedule(bp.index, nb, options.margin))
                for bp in super().plan_blocks(options, analysis)]

    def emit(self, options: Options, site: Site) -> PlanNodes:
        assert isinstance(options, PitomeOptions) and isinstance(site.plan, PitomePlan)
        b = site.builder
        plan = b.add(pitome_plan, (site.k, site.plan.r, site.num_protected, site.plan.margin, options.alpha,
                                   site.valid))
        slot, rep = b.item(plan, 0), b.item(plan, 1)
        weight = None  # sizes; with padding, sizes times the plan's keep (a padding source into a real B drops)
        if site.valid is not None:
            weight = b.add(ref.merge_weight, (site.size, b.item(plan, 2)))
        return PlanNodes(slot, weight, rep)

    def action(self, bp: BlockPlan, analysis: ModelAnalysis) -> str:
        margin = f" m={bp.margin:.3g}" if isinstance(bp, PitomePlan) else ""
        return f"pitome r={bp.r}{margin}"


METHOD = Pitome()
