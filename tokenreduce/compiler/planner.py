"""Plan schedule: how many tokens each block removes, checked against the model's real token counts.

Turns `Settings` + `ModelAnalysis` into one `BlockPlan` per block (tokens in/out, the constant arguments of
the reduction op, or why nothing happens there). Every impossible request is a `TokenReduceError` that
names the largest valid value; a requested block that cannot be reduced keeps its skip reason so the
report shows it. Nothing is clamped unless the user asked for it (`clamp_r`), and then the report says
how much each block actually merged.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenreduce.analysis.encoder import ModelAnalysis
from tokenreduce.compiler.settings import Settings
from tokenreduce.errors import TokenReduceError
from tokenreduce.methods import evit, tome


@dataclass
class BlockPlan:
    index: int
    name: str
    tokens_in: int
    tokens_out: int
    action: str  # "tome", "evit" or "none"
    r: int = 0  # ToMe merges
    keep: int = 0  # EViT kept candidates
    reason: str = ""  # why nothing happened, or a note (clamped)

    @property
    def reduces(self) -> bool:
        return self.action != "none"


def plan(settings: Settings, analysis: ModelAnalysis, clamp_r: bool = False) -> list[BlockPlan]:
    blocks = analysis.blocks
    nb = len(blocks)
    p = analysis.num_protected
    if settings.layers is not None:
        bad = [i for i in settings.layers if not 0 <= i < nb]
        if bad:
            raise TokenReduceError(
                f"layer(s) {bad} out of range: the model has {nb} transformer blocks (valid layers 0..{nb - 1})"
            )
    n0 = next((b.num_tokens for b in blocks if b.reducible), 0)
    plans: list[BlockPlan] = []
    n = n0

    if settings.method == "tome":
        rs = tome.r_schedule(settings.r, nb, settings.r_schedule)
        if settings.layers is not None:
            rs = [r if i in settings.layers else 0 for i, r in enumerate(rs)]
        for b, r in zip(blocks, rs):
            bp = BlockPlan(b.index, b.name, n, n, "none")
            if r and not b.reducible:
                bp.reason = f"skipped: {b.skip_reason}"
            elif r:
                limit = tome.max_r(n, p)
                if r > limit and not clamp_r:
                    active = [blk.reducible and (settings.layers is None or blk.index in settings.layers)
                              for blk in blocks]
                    best = tome.largest_constant_r(n0, p, active)
                    hint = f"; the largest constant r for this model is {best}" if isinstance(settings.r, int) else ""
                    raise TokenReduceError(
                        f"ToMe r={r} at block {b.index} ({b.name}) is too large: it has {n} tokens with {p} "
                        f"protected, so the largest valid r there is {limit}{hint} (or pass clamp_r=True to "
                        "merge as many as possible and have the report say so)"
                    )
                applied = min(r, limit)
                if applied < r:
                    bp.reason = f"clamped: asked r={r}, merged {applied} (block has {n} tokens)"
                if applied > 0:
                    bp.action, bp.r, bp.tokens_out = "tome", applied, n - applied
            elif not b.reducible:
                bp.reason = f"not reducible: {b.skip_reason}"
            plans.append(bp)
            n = bp.tokens_out
        return plans

    if settings.method == "evit":
        layers = list(settings.layers) if settings.layers is not None else evit.default_layers(nb)
        if p < 1:
            raise TokenReduceError(
                "EViT ranks tokens by the CLS token's attention, and this model has no protected leading "
                "token; pass protected_tokens=1 if its first token is a CLS token, or use method='tome'"
            )
        for b in blocks:
            bp = BlockPlan(b.index, b.name, n, n, "none")
            if b.index in layers:
                if not b.reducible:
                    bp.reason = f"skipped: {b.skip_reason}"
                else:
                    k = evit.keep_count(n, p, settings.keep_ratio)
                    out = p + k + (1 if settings.fuse else 0)
                    if k >= n - p or out >= n:
                        bp.reason = f"keep_ratio={settings.keep_ratio} keeps all {n - p} candidate tokens"
                    elif k < 1:
                        raise TokenReduceError(
                            f"EViT keep_ratio={settings.keep_ratio} keeps no token at block {b.index} ({n} tokens)"
                        )
                    else:
                        bp.action, bp.keep, bp.tokens_out = "evit", k, out
            elif not b.reducible:
                bp.reason = f"not reducible: {b.skip_reason}"
            plans.append(bp)
            n = bp.tokens_out
        return plans

    return [BlockPlan(b.index, b.name, n0, n0, "none", reason="" if b.reducible else f"not reducible: {b.skip_reason}")
            for b in blocks]
