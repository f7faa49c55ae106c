"""ToMe for diffusion denoisers (tomesd): merge tokens inside each transformer block, unmerge before the residual.

Source: Bolya and Hoffman, "Token Merging for Fast Stable Diffusion", CVPR Workshops 2023, and the arithmetic of
its official package (dbolya/tomesd 0.1.3, `tomesd/merge.py` `bipartite_soft_matching_random2d` and
`tomesd/patch.py` `compute_merge` / `apply_patch`; read, not copied). What is the same, so that outputs equal the
package's on the same weights (tests/diffusion/test_tomesd.py):

* per block, from the block input `x [B, N, C]`: `downsample = ceil(sqrt(H * W // N))` against the latent's
  `H x W`; a block merges only when `downsample <= max_downsample`, with `r = int(N * ratio)` and the grid
  `ceil(H / ds) x ceil(W / ds)`;
* destinations: one per `sy x sx` cell of the top-left `(h // sy * sy) x (w // sx * sx)` part of the grid, the
  cell's top-left token (`use_rand=False`) or a random one, drawn per block as `randint(sy * sx, (h // sy,
  w // sx, 1))` from a generator in block order; every other token is a source; a batch of odd size uses the
  top-left destinations whatever `use_rand` says (tomesd: prompted and unprompted halves must match);
* each source's most cosine-similar destination (`x / |x|`), the `r` sources with the highest similarity merged;
  merged tokens are the mean of the destination and its sources (tomesd's `scatter_reduce(mean)` including the
  destination), no token sizes and no proportional attention; unmerge gives every source its destination's value;
* one plan per block, shared by the merged sublayers: self-attention (`merge_attn`, on), cross-attention
  (`merge_crossattn`, off), MLP (`merge_mlp`, off); defaults `ratio=0.5, max_downsample=1, sx=sy=2,
  use_rand=True` as tomesd.

Departures (docs/diffusion.md): the random destinations are drawn once, when compiling (`rand_seed`; None forks
torch's global generator then, as tomesd forks it at its first call), so one compiled graph uses the same
destinations at every call where tomesd draws new ones per call (`rand_seed`, not `seed`: the command line's
`--seed` seeds random weights and inputs); the order of merged tokens differs (same
groups, attention sums keys in another order: float rounding); `r` larger than a block's sources is an error
naming the largest valid ratio (tomesd clamps silently); a setting that merges no block at all is an error.
The plan is plain torch (TopK with constant k, gathers, no scatter, static shapes), emitted as one node and applied by
`tokenreduce.apply_plan`; it exports to ONNX.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from tokenreduce.analysis.denoiser import DenoiserAnalysis, DenoiserBlock
from tokenreduce.analysis.encoder import ModelAnalysis
from tokenreduce.errors import TokenReduceError
from tokenreduce.methods.base import (
    BlockPlan,
    DenoiserMethod,
    MergeSite,
    Options,
    check_bool,
    check_int,
    fail,
    option,
)


def tomesd_slots(x: torch.Tensor, order: torch.Tensor, num_dst: int, r: int) -> torch.Tensor:
    """Merged slot of every token of `x [B, N, C]`: `[B, N]` int64 in `0..N - r - 1`.

    `order [K, 2, N]`: per choice of destinations, a permutation listing the destination tokens first (`num_dst`
    of them) then the sources, and its inverse. With `K == 2` the first is used for even batches and the second
    (top-left destinations) for odd ones. Slots: unmerged sources first (most similar first), then one per
    destination; a merged source takes its destination's slot.
    """
    sel = order.select(0, x.shape[0] % 2) if order.shape[0] == 2 else order.select(0, 0)
    perm, inverse = sel[0], sel[1]
    n = x.shape[1]
    num_src = n - num_dst
    metric = x / x.norm(dim=-1, keepdim=True)
    dst = metric.index_select(1, perm[:num_dst])
    src = metric.index_select(1, perm[num_dst:])
    best, best_dst = (src @ dst.transpose(-1, -2)).max(dim=-1)  # [B, num_src]
    # rank of each source, 0 = most similar; TopK with a constant k (an argsort exports with k read from a shape)
    edge = best.topk(num_src, dim=-1).indices
    rank = edge.topk(num_src, dim=-1, largest=False).indices  # the inverse permutation
    kept = num_src - r
    src_slot = torch.where(rank < r, kept + best_dst, rank - r)
    dst_slot = (kept + torch.arange(num_dst, device=x.device)).expand(x.shape[0], num_dst)
    return torch.cat([dst_slot, src_slot], dim=1).index_select(1, inverse)


def destination_order(h: int, w: int, sx: int, sy: int, choice: torch.Tensor | None) -> torch.Tensor:
    """`[2, h * w]`: destinations then sources (each in raster order), and the inverse permutation.

    `choice [h // sy, w // sx]`: index of the destination inside each `sy x sx` cell (row-major in the cell);
    None = 0, the cell's top-left token. Rows and columns past the last whole cell are sources."""
    hc, wc = h // sy, w // sx
    if choice is None:
        choice = torch.zeros(hc, wc, dtype=torch.int64)
    is_dst = torch.zeros(h, w, dtype=torch.bool)
    rows = torch.arange(hc)[:, None] * sy + choice // sx
    cols = torch.arange(wc)[None, :] * sx + choice % sx
    is_dst[rows, cols] = True
    flat = is_dst.flatten()
    idx = torch.arange(h * w)
    perm = torch.cat([idx[flat], idx[~flat]])
    return torch.stack([perm, perm.argsort()])


@dataclass
class TomesdPlan(BlockPlan):
    """A block's plan: its grid, destinations per batch parity (`order`, see `tomesd_slots`), sublayers."""

    grid: tuple[int, int] = (0, 0)
    num_dst: int = 0
    order: torch.Tensor | None = None
    sublayers: tuple[str, ...] = ()


@dataclass(frozen=True)
class TomesdOptions(Options):
    ratio: float = option(0.5, "fraction of a block's tokens merged away (tomesd: r = int(N * ratio)); below "
                               "1 - 1/(sx*sy)")
    max_downsample: int = option(1, "merge only in blocks whose token grid is at most this many times coarser "
                                    "than the latent (1: the highest resolution; tomesd uses 1, 2, 4 or 8)")
    sx: int = option(2, "destination cell width in tokens (one destination per sy x sx cell)")
    sy: int = option(2, "destination cell height in tokens")
    use_rand: bool = option(True, "pick each cell's destination at random (False: its top-left token); odd "
                                  "batches always use top-left, as tomesd")
    rand_seed: int | None = option(None, "seed of the random destinations (drawn once when compiling); None "
                                         "forks torch's global generator as tomesd does")
    merge_attn: bool = option(True, "merge tokens for self-attention")
    merge_crossattn: bool = option(False, "merge tokens for cross-attention")
    merge_mlp: bool = option(False, "merge tokens for the MLP")

    def validate(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float) or not math.isfinite(self.ratio) \
                or not 0.0 <= float(self.ratio) < 1.0:
            raise fail("ratio", f"ratio must be a number in [0, 1), got {self.ratio!r}")
        self.set("ratio", float(self.ratio))
        check_int("max_downsample", self.max_downsample, lo=1)
        check_int("sx", self.sx, lo=1)
        check_int("sy", self.sy, lo=1)
        if self.sx * self.sy < 2:
            raise fail("sx", "sx * sy must be at least 2: with one token per cell every token is a destination "
                             "and none can merge")
        check_bool("use_rand", self.use_rand)
        if self.rand_seed is not None:
            check_int("rand_seed", self.rand_seed, lo=0)
        for name in ("merge_attn", "merge_crossattn", "merge_mlp"):
            check_bool(name, getattr(self, name))
        if not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise fail("merge_attn", "merge_attn, merge_crossattn and merge_mlp are all False: nothing would "
                                     "run on merged tokens")


class Tomesd(DenoiserMethod):
    name = "tomesd"
    summary = "merge tokens inside diffusion denoiser blocks, unmerge before the residual (Bolya & Hoffman, 2023)"
    options_type = TomesdOptions
    sweep_option = None  # quality sweeps (`eval`) need a diffusion metric; not built yet

    def check_common(self, options: Options, unmerge: bool) -> None:
        if unmerge:
            raise fail("unmerge", "tomesd always unmerges inside each block (the denoiser's output keeps its "
                                  "grid); drop unmerge=True")

    def sublayers(self, options: Options) -> tuple[str, ...]:
        assert isinstance(options, TomesdOptions)
        flags = (("attn", options.merge_attn), ("crossattn", options.merge_crossattn), ("mlp", options.merge_mlp))
        return tuple(k for k, on in flags if on)

    def plan_blocks(self, options: Options, analysis: ModelAnalysis) -> list[BlockPlan]:
        assert isinstance(options, TomesdOptions)
        if not isinstance(analysis, DenoiserAnalysis):
            raise TokenReduceError("tomesd reduces diffusion denoisers (a UNet or diffusion transformer taking a "
                                   "[B, C, H, W] latent); this graph was analysed as an encoder", setting="method")
        wanted = self.sublayers(options)
        if options.rand_seed is not None:
            gen = torch.Generator().manual_seed(options.rand_seed)
        else:
            gen = torch.Generator().set_state(torch.get_rng_state())
        plans: list[BlockPlan] = []
        too_many: list[tuple[DenoiserBlock, int, int]] = []
        for b in analysis.dblocks:
            n = b.num_tokens
            bp = TomesdPlan(b.index, b.name, n, n)
            plans.append(bp)
            if not b.reducible:
                bp.reason = f"not reducible: {b.skip_reason}"
                continue
            if b.downsample > options.max_downsample:
                bp.reason = f"downsample {b.downsample} > max_downsample {options.max_downsample}"
                continue
            r = int(n * options.ratio)
            if r <= 0:
                bp.reason = f"ratio {options.ratio} merges no token of {n}"
                continue
            h, w = b.grid
            num_dst = (h // options.sy) * (w // options.sx)
            if r > n - num_dst:
                too_many.append((b, r, n - num_dst))
                continue
            here = tuple(k for k in wanted if k in b.sublayers)
            missing = [k for k in wanted if k not in b.sublayers]
            if not here:
                bp.reason = f"no {' / '.join(missing)} sublayer found"
                continue
            orders = []
            if options.use_rand:
                choice = torch.randint(options.sy * options.sx, size=(h // options.sy, w // options.sx, 1),
                                       generator=gen)
                orders.append(destination_order(h, w, options.sx, options.sy, choice[..., 0]))
            orders.append(destination_order(h, w, options.sx, options.sy, None))
            bp.action, bp.r, bp.tokens_out = self.name, r, n - r
            bp.grid, bp.num_dst, bp.order, bp.sublayers = (h, w), num_dst, torch.stack(orders), here
            if missing:
                bp.reason = f"no {' / '.join(missing)} sublayer in this block"
        if too_many:
            b, r, sources = too_many[0]
            best = min(src / blk.num_tokens for blk, _, src in too_many)
            raise TokenReduceError(
                f"tomesd ratio={options.ratio} merges r={r} of {b.num_tokens} tokens at block {b.index} ({b.name}), "
                f"but its {b.grid[0]} x {b.grid[1]} grid with {options.sy} x {options.sx} cells has only {sources} "
                f"sources; the largest valid ratio for these blocks is {math.floor(best * 1000) / 1000} "
                "(tomesd clamps r silently; we refuse)", setting="ratio")
        if not any(p.reduces for p in plans):
            merging = [b for b in analysis.dblocks if b.reducible]
            if merging and all(b.downsample > options.max_downsample for b in merging):
                finest = min(b.downsample for b in merging)
                raise TokenReduceError(
                    f"tomesd merges in no block: every transformer block's downsample (token grid vs the "
                    f"{analysis.image_size[0]} x {analysis.image_size[1]} latent) exceeds max_downsample="
                    f"{options.max_downsample}; the finest is {finest} (patchified transformers, SDXL's first level "
                    f"without attention)", setting="max_downsample", hint=f"max_downsample={finest}")
            reasons = sorted({p.reason for p in plans if p.reason})
            raise TokenReduceError(f"tomesd merges in no block: {'; '.join(reasons) or 'no transformer block'}",
                                   setting="ratio")
        return plans

    def emit_slots(self, options: Options, site: MergeSite) -> fx.Node:
        bp = site.plan
        assert isinstance(bp, TomesdPlan) and bp.order is not None
        b = site.builder
        gm = b.graph.owning_module
        assert gm is not None
        name = f"tomesd_order_{bp.index}"
        gm.register_buffer(name, bp.order.clone(), persistent=False)
        with b.graph.inserting_after(b.anchor):
            order = b.graph.get_attr(name)
        order.meta["tokenreduce"] = True
        b.anchor = order
        b.nodes.add(order)
        return b.add(tomesd_slots, (site.x, order, bp.num_dst, bp.r))

    def action(self, bp: BlockPlan, analysis: ModelAnalysis) -> str:
        subs = ", ".join(bp.sublayers) if isinstance(bp, TomesdPlan) else ""
        return f"tomesd r={bp.r} ({subs})"

    def label(self, values: Mapping[str, Any]) -> str:
        return f"tomesd ratio={values.get('ratio', 0.5)}"

    def identity_reason(self, values: Mapping[str, Any]) -> str | None:
        if values.get("ratio", 0.5) == 0:
            return "ratio=0 merges nothing: tomesd needs ratio (fraction of tokens merged), e.g. ratio=0.5"
        return None


METHOD = Tomesd()
