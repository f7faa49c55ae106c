"""The settings a tuning run may choose from: per registered encoder method, schedule families over the blocks.

A method is tunable through the options it declares, read from the registry, never from its name:

* a per-block merge count `r` (ToMe, PiToMe, any later merging method): the families below produce one `r`
  list per candidate;
* a `keep_ratio` with `layers` (EViT, any later pruning method): a grid of keep ratios at the method's default
  layers and at an earlier set of layers;
* neither: the method is left out, and the search says so in its notes.

Families of per-block `r` schedules (tokens after block l: `n_l`; `r_l = n_{l-1} - n_l`, never above a block's
limit `(n - P) // 2`, and blocks that cannot reduce get 0):

* `constant`: one r everywhere (ToMe's default);
* `decreasing`: ToMe's (r, -0.5) inflection schedule, 1.5 r in the first block falling to 0.5 r in the last;
* `sigmoid`: a parametric family in the style of P-Sigmoid: the fraction of candidate tokens removed by block l
  follows a logistic curve `(1 - rho) * (s(l) - s(-1)) / (s(L-1) - s(-1))`, `s(l) = sigmoid(k (l - c))`,
  with centre c (where most merging happens) and steepness k; rho = candidates kept at the end;
* `greedy`: a per-layer greedy search in the style of G-Search (`tuning/search.py`), built from this module's
  `clip_schedule` and `flops_proxy`.

Sources read for the schedule families: ToMe (Bolya et al., ICLR 2023; facebookresearch/ToMe) for the constant and
decreasing schedules; DiffRate (Chen et al., "DiffRate: Differentiable Compression Rate for Efficient Vision
Transformers", ICCV 2023; OpenGVLab/DiffRate `DiffRate/ddp.py`, read, not copied) for searching one rate per
block against a FLOPs target, which it does with gradients during training; here the same per-block rates are
searched without training, from measured fidelity. The greedy and sigmoid families follow the G-Search /
P-Sigmoid names the issue gives (a greedy layer-wise search and a logistic keep-rate curve).

`flops_proxy` estimates a schedule's FLOPs ratio from the token counts alone (attention projections and MLP
linear in tokens, attention scores quadratic), so candidates far from the budget are never compiled; the ratio
a plan reports is always the compiler's own count.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenreduce.analysis.encoder import ModelAnalysis
from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels.plans import max_r
from tokenreduce.methods import registry
from tokenreduce.methods.base import EncoderMethod

FAMILIES = ("constant", "decreasing", "sigmoid", "greedy", "keep-ratio")


@dataclass(frozen=True)
class Candidate:
    """One setting to evaluate: method, options (flat names, JSON values), family and a readable label."""

    method: str
    options: tuple[tuple[str, Any], ...]
    family: str
    label: str

    @property
    def settings(self) -> dict[str, Any]:
        return {"method": self.method, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.options}}

    @property
    def key(self) -> str:
        return json.dumps(self.settings, sort_keys=True)


def candidate(method: str, family: str, label: str, **options: Any) -> Candidate:
    opts = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
    return Candidate(method, opts, family, label)


# ------------------------------------------------------------------------------------------------ the model
@dataclass
class ModelShape:
    """What schedules need to know of a model: blocks, tokens, protected tokens, widths (from its analysis)."""

    num_blocks: int
    num_tokens: int
    num_protected: int
    reducible: list[bool]
    width: list[int]  # per block: heads * head dim (0 when unknown)
    other_flops: float = 0.0  # FLOPs outside the blocks' token-dependent work (patch embedding, head)
    block_flops_full: float = 0.0
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, analysis: ModelAnalysis, full_flops: float | None = None, batch: int = 1) -> ModelShape:
        """From the model's analysis; `full_flops`: the compiler's count for the full model at `batch`."""
        blocks = analysis.blocks
        n0 = next((b.num_tokens for b in blocks if b.reducible), 0)
        widths = []
        for b in blocks:
            val = b.attention.q.meta.get("val")
            widths.append(int(val.shape[1] * val.shape[3]) if val is not None and val.dim() == 4 else 0)
        shape = cls(len(blocks), n0, analysis.num_protected, [b.reducible for b in blocks], widths)
        shape.block_flops_full = shape.blocks_flops([n0] * len(blocks), [n0] * len(blocks))
        if full_flops:
            shape.other_flops = max(float(full_flops) / batch - shape.block_flops_full, 0.0)
        return shape

    def block_flops(self, i: int, n_in: int, n_out: int) -> float:
        """FLOPs of block i (2 per multiply-add): q/k/v/o projections and attention at n_in tokens, a 4x MLP at
        n_out tokens (the reduction sits between attention and MLP)."""
        c = self.width[i]
        return 2.0 * (4 * c * c * n_in + 2 * n_in * n_in * c + 8 * c * c * n_out)

    def blocks_flops(self, n_in: Sequence[int], n_out: Sequence[int]) -> float:
        return sum(self.block_flops(i, a, b) for i, (a, b) in enumerate(zip(n_in, n_out)))

    def tokens(self, r: Sequence[int]) -> tuple[list[int], list[int]]:
        n, ins, outs = self.num_tokens, [], []
        for i in range(self.num_blocks):
            ins.append(n)
            n -= r[i] if i < len(r) else 0
            outs.append(n)
        return ins, outs

    def flops_proxy(self, r: Sequence[int]) -> float:
        """Estimated FLOPs ratio of a per-block merge schedule."""
        ins, outs = self.tokens(r)
        full = self.other_flops + self.block_flops_full
        return (self.other_flops + self.blocks_flops(ins, outs)) / full if full else 1.0

    def flops_proxy_pruning(self, keep_ratio: float, layers: Sequence[int], fuse: bool = True) -> float:
        """Estimated FLOPs ratio of a keep-ratio pruning setting (EViT's token arithmetic)."""
        n, p, r = self.num_tokens, self.num_protected, []
        for i in range(self.num_blocks):
            out = n
            if i in layers and self.reducible[i]:
                k = math.ceil(keep_ratio * (n - p))
                if 0 < k < n - p and p + k + int(fuse) < n:
                    out = p + k + int(fuse)
            r.append(n - out)
            n = out
        return self.flops_proxy(r)

    def clip_schedule(self, r: Sequence[float]) -> list[int]:
        """Round a per-block schedule to ints each block can merge (0 where a block cannot reduce)."""
        n, out = self.num_tokens, []
        for i in range(self.num_blocks):
            want = int(round(r[i])) if i < len(r) else 0
            got = max(0, min(want, max_r(n, self.num_protected))) if self.reducible[i] else 0
            out.append(got)
            n -= got
        return out

    def largest_constant_r(self) -> int:
        best = 0
        for r in range(1, self.num_tokens):
            if self.clip_schedule([r] * self.num_blocks) != [r if on else 0 for on in self.reducible]:
                break
            best = r
        return best


# ------------------------------------------------------------------------------------------------ families
def sigmoid_schedule(shape: ModelShape, keep: float, centre: float, steepness: float) -> list[int]:
    """Per-block r of the logistic family: `keep` = fraction of candidate tokens left after the last block."""
    nb = shape.num_blocks
    cand = shape.num_tokens - shape.num_protected

    def s(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-steepness * (x - centre)))

    lo, hi = s(-1), s(nb - 1)
    left = [cand * (1.0 - (1.0 - keep) * (s(i) - lo) / (hi - lo)) for i in range(nb)]
    prev, r = float(cand), []
    for i in range(nb):
        r.append(round(prev) - round(left[i]))
        prev = left[i]
    return shape.clip_schedule(r)


def decreasing_schedule(shape: ModelShape, r: int) -> list[int]:
    """ToMe's (r, -0.5) inflection schedule as a list (1.5 r falling linearly to 0.5 r; same total)."""
    nb = shape.num_blocks
    if nb == 1:
        return shape.clip_schedule([r])
    lo = int(r * 1.5)
    step = (2 * r - lo - lo) / (nb - 1)
    return shape.clip_schedule([int(lo + step * i) for i in range(nb)])


def r_label(name: str, family: str, r: Sequence[int]) -> str:
    if family == "constant":
        return f"{name} r={r[0] if r else 0}"
    return f"{name} {family} r={','.join(map(str, r))}"


def tunable(method: EncoderMethod) -> str | None:
    """How a method is tuned: "r" (per-block merges), "keep_ratio" (pruning ratio + layers), or None."""
    names = method.options_type.names()
    if "r" in names:
        return "r"
    if "keep_ratio" in names and "layers" in names:
        return "keep_ratio"
    return None


def schedule_candidates(shape: ModelShape, analysis: ModelAnalysis, methods: Sequence[str],
                        families: Sequence[str]) -> tuple[list[Candidate], list[str]]:
    """Every non-greedy candidate of the chosen methods and families, and notes on methods left out."""
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise TokenReduceError(f"unknown schedule family {bad[0]!r}; choose from {', '.join(FAMILIES)}",
                               setting="families")
    out: list[Candidate] = []
    notes: list[str] = []
    big = shape.largest_constant_r()
    for name in methods:
        method = registry.encoder(name)
        kind = tunable(method)
        if kind is None:
            notes.append(f"{name}: left out (it has neither a per-block r nor keep_ratio + layers to tune)")
            continue
        label = label_of(method)
        if kind == "r":
            schedules: list[tuple[str, list[int]]] = []
            if "constant" in families:
                schedules += [("constant", shape.clip_schedule([r] * shape.num_blocks)) for r in range(1, big + 1)]
            if "decreasing" in families:
                schedules += [("decreasing", decreasing_schedule(shape, r)) for r in range(1, big + 1)]
            if "sigmoid" in families:
                nb = shape.num_blocks
                schedules += [("sigmoid", sigmoid_schedule(shape, keep, centre, steep))
                              for keep in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
                              for centre in (nb * 0.25, nb * 0.5, nb * 0.75) for steep in (0.5, 1.5)]
            seen: set[tuple[int, ...]] = set()
            for family, r in schedules:
                if any(r) and tuple(r) not in seen:
                    seen.add(tuple(r))
                    value: Any = r[0] if family == "constant" else r
                    out.append(candidate(name, family, r_label(label, family, r), r=value))
        elif "keep-ratio" in families:
            default_layers = list(method.inspect_values(analysis, {})[0].get("layers") or [])
            if not default_layers:
                notes.append(f"{name}: left out (it names no default layers to prune at)")
                continue
            early = sorted({max(0, i - max(1, shape.num_blocks // 6)) for i in default_layers})
            layer_sets = [("default layers", default_layers)]
            if early != default_layers:
                layer_sets.append((f"layers {','.join(map(str, early))}", early))
            for keep in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
                for where, layers in layer_sets:
                    out.append(candidate(name, "keep-ratio", f"{label_of(method)} keep {keep:g} ({where})",
                                         keep_ratio=keep, layers=list(layers)))
    return out, notes


def label_of(method: EncoderMethod) -> str:
    """The method's display name ("ToMe", "Token Transforming"): its table label without the setting that
    follows the name ("r=0", "keep 0.7", "tau=1")."""
    label = method.label({}) or method.name
    return re.sub(r"(\s+(\S+=\S*|keep\s+\S+))+$", "", label) or method.name


def fuses(c: Candidate) -> bool:
    """Whether a keep-ratio candidate adds a fused token: its `fuse` option, else its method's default (EViT
    fuses by default; methods without the option, such as Zero-TPrune, never do)."""
    s = c.settings
    if "fuse" in s:
        return bool(s["fuse"])
    options = registry.get(c.method).options_type
    return bool(getattr(options(), "fuse", False))


def proxy_of(shape: ModelShape, c: Candidate) -> float:
    """Estimated FLOPs ratio of a candidate (before compiling it)."""
    s = c.settings
    if "r" in s:
        r = s["r"]
        return shape.flops_proxy(r if isinstance(r, list) else shape.clip_schedule([r] * shape.num_blocks))
    if "keep_ratio" in s:
        return shape.flops_proxy_pruning(s["keep_ratio"], s.get("layers") or [], fuses(c))
    return 1.0
