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

Joint text + image attention (SD3, Flux): only the image tokens merge (`analysis/denoiser_joint.py`); a merged
token's rotary position is its destination's (`emit_positions`). Flux's packed latent `[B, N, C]` has no grid in
the graph: `grid_h` x `grid_w` give it (refused when missing or not N; refused on a 4-D latent, whose grid is
known). The official package does not support these models; the tests hand-write its arithmetic.

Where the random destinations come from (`rand_stream`, `per_step`; docs/diffusion.md):

* `rand_stream="compile"` (default): drawn once, when compiling (`rand_seed`; None forks torch's global generator
  then, as tomesd forks it at its first call) and held as buffers, so one compiled graph uses the same
  destinations at every call where tomesd draws new ones per call;
* `rand_stream="call"`: tomesd's own stream. The draws are a graph input (`DRAWS_INPUT`, int64 `[cells of every
  merging block]`) that `ReducedModule` and the Dynamo backend fill at each call from a `DrawStream`: the same
  `torch.randint(sy * sx, (h // sy, w // sx, 1), generator=g)` per merging block in block order from one
  generator forked from torch's global one at the first call (or seeded by `rand_seed`), nothing drawn for an odd
  batch; an ONNX file takes it as an explicit input;
* `per_step=True`: derived in the graph from the timestep input (a new draw per denoising step, one graph, no
  random op; not tomesd's random stream).

`rand_seed`, not `seed`: the command line's `--seed` already seeds random weights and inputs. The order of merged
tokens differs (same groups; attention sums keys in another order: float rounding); `r` larger than a block's
sources is an error naming the largest valid ratio (tomesd clamps silently); a setting that merges no block at
all is an error, except `ratio=0`, which compiles the unreduced graph. The plan is plain torch (TopK with
constant k, gathers, no scatter, static shapes), emitted as
nodes and applied by `tokenreduce.apply_plan`; it exports to ONNX.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.utils import _pytree as pytree

from tokenreduce.analysis.denoiser import DenoiserAnalysis, DenoiserBlock
from tokenreduce.analysis.encoder import ModelAnalysis
from tokenreduce.errors import TokenReduceError
from tokenreduce.methods.base import (
    BlockPlan,
    DenoiserMethod,
    MergeSite,
    Options,
    check_bool,
    check_choice,
    check_int,
    fail,
    option,
)


def destination_perm(choice: torch.Tensor, h: int, w: int, sx: int, sy: int) -> torch.Tensor:
    """`[h * w]` token indices: the destinations (one per whole `sy x sx` cell, cell by cell) then the sources.

    `choice [cells]` int64: the destination's index inside each cell, row-major in the cell (0 = top-left).
    Tokens in the rows and columns past the last whole cell are sources. Gathers and static shapes only."""
    m, hc, wc = sx * sy, h // sy, w // sx
    dev = choice.device
    k = torch.arange(m, device=dev)
    rows = torch.arange(hc, device=dev)[:, None, None] * sy + k // sx
    cols = torch.arange(wc, device=dev)[None, :, None] * sx + k % sx
    members = (rows * w + cols).reshape(hc * wc, m)  # flat index of every token of every cell
    dst = members.gather(1, choice[:, None]).reshape(-1)
    j = torch.arange(m - 1, device=dev)[None, :]
    others = j + (j >= choice[:, None]).to(torch.int64)  # the m - 1 indices in the cell that are not the choice
    parts = [dst, members.gather(1, others).reshape(-1)]
    grid = torch.arange(h * w, device=dev).reshape(h, w)
    if hc * sy < h:  # rows below the last whole cell (no empty pieces: the ONNX exporter refuses them in a cat)
        parts.append(grid[hc * sy:, :].reshape(-1))
    if wc * sx < w:  # columns right of it
        parts.append(grid[:hc * sy, wc * sx:].reshape(-1))
    return torch.cat(parts)


def tomesd_plan(x: torch.Tensor, choice: torch.Tensor, h: int, w: int, sx: int, sy: int,
                r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged slot of every token of `x [B, N, C]` (the block input, `N = h * w`): `[B, N]` int64 in
    `0..N - r - 1`, and the token each slot stands for, `[B, N - r]` (a merged slot: its destination).
    Destinations from `choice [cells]` (`destination_perm`); each source's most cosine-similar destination, the
    `r` most similar sources merged. Slots: unmerged sources first (most similar first), then one per
    destination; a merged source takes its destination's slot. TopK with constant k ranks (an argsort exports
    with k read from a shape)."""
    perm = destination_perm(choice, h, w, sx, sy)
    n = x.shape[1]
    num_dst = choice.shape[0]
    num_src = n - num_dst
    inverse = perm.topk(n, largest=False).indices
    metric = x / x.norm(dim=-1, keepdim=True)
    dst = metric.index_select(1, perm[:num_dst])
    src = metric.index_select(1, perm[num_dst:])
    best, best_dst = (src @ dst.transpose(-1, -2)).max(dim=-1)  # [B, num_src]
    edge = best.topk(num_src, dim=-1).indices  # sources by similarity, most similar first
    rank = edge.topk(num_src, dim=-1, largest=False).indices  # the inverse permutation: 0 = most similar
    kept = num_src - r
    src_slot = torch.where(rank < r, kept + best_dst, rank - r)
    dst_slot = (kept + torch.arange(num_dst, device=x.device)).expand(x.shape[0], num_dst)
    slot = torch.cat([dst_slot, src_slot], dim=1).index_select(1, inverse)
    # slot s < kept: the unmerged source of rank r + s; slot kept + j: destination j
    kept_src = perm[num_dst:].index_select(0, edge[:, r:].reshape(-1)).reshape(x.shape[0], kept)
    rep = torch.cat([kept_src, perm[:num_dst].expand(x.shape[0], num_dst)], dim=1)
    return slot, rep


def tomesd_slots(x: torch.Tensor, choice: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int) -> torch.Tensor:
    """The slots of `tomesd_plan` alone."""
    return tomesd_plan(x, choice, h, w, sx, sy, r)[0]


def batch_choice(x: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
    """`choices [K, cells]`: K == 2 holds the random draw and top-left (zeros); an odd batch takes the second
    (tomesd: random destinations only for even batches). K == 1: always that one."""
    return choices.select(0, (x.shape[0] % 2) * (choices.shape[0] - 1))


# A multiplicative congruential generator (Park-Miller "minimal standard"): products stay below 2^47 in int64,
# so eager, inductor and onnxruntime compute the same integers.
MCG_MODULUS = 2_147_483_647
MCG_MULTIPLIER = 48_271


def step_choice(x: torch.Tensor, timestep: torch.Tensor, salt: int, cells: int, per_cell: int) -> torch.Tensor:
    """Destinations derived from the denoising step: `[cells]` in `0..per_cell - 1`, a function of the first
    sample's timestep (times 1000, truncated), the block's `salt` and the cell index; top-left for an odd
    batch. Integer arithmetic only, so the graph needs no random op and no extra input."""
    t = (timestep.reshape(-1)[:1].to(torch.float32) * 1000).to(torch.int64) % MCG_MODULUS
    j = torch.arange(cells, device=timestep.device)
    v = (t * 7919 + j * 104_729 + salt) % MCG_MODULUS + 1
    for _ in range(3):
        v = (v * MCG_MULTIPLIER) % MCG_MODULUS
    return (v // 65_536) % per_cell * ((x.shape[0] + 1) % 2)


def stream_choice(x: torch.Tensor, draws: torch.Tensor, offset: int, cells: int) -> torch.Tensor:
    """A block's destinations from the per-call draws input (`rand_stream="call"`): `draws[offset:offset +
    cells]`, top-left (zeros) for an odd batch whatever was fed (tomesd: no random destinations then)."""
    return draws.narrow(0, offset, cells) * ((x.shape[0] + 1) % 2)


DRAWS_INPUT = "tomesd_draws"  # the keyword input of a `rand_stream="call"` graph
CALL_INPUTS = "tokenreduce_call_inputs"  # GraphModule.meta key: {input name: the DrawStream that fills it}


class DrawStream:
    """tomesd's random destinations, drawn outside the graph at every call and fed as its `DRAWS_INPUT`.

    Drawn exactly as the package does (`tomesd/patch.py` `compute_merge`, `tomesd/merge.py`): one generator, made at
    the first call by forking torch's global generator of the call's device (`init_generator`: CPU or CUDA; a
    new fork when the device changes) or, with `seed`, seeded with it; then at every call with an even batch,
    per merging block in block order, `torch.randint(sy * sx, size=(h // sy, w // sx, 1), generator=g)`; at an
    odd batch nothing is drawn (zeros: top-left). The draws of a call are concatenated, cell by cell (row-major),
    block after block: `int64 [sum of cells]`. The generator lives as long as the stream (tomesd: as long as the
    patch); `reset()` forgets it, so the next call forks (or seeds) afresh."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self.blocks: list[tuple[int, int, int]] = []  # per merging block: (rows h // sy, cols w // sx, sy * sx)
        self._state: list[torch.Generator | None] = [None]  # shared with the streams that continue this one

    @property
    def size(self) -> int:
        return sum(hc * wc for hc, wc, _ in self.blocks)

    def add_block(self, rows: int, cols: int, per_cell: int) -> int:
        """Append a merging block's draw; returns its offset in the input."""
        offset = self.size
        self.blocks.append((rows, cols, per_cell))
        return offset

    def continue_from(self, other: DrawStream) -> None:
        """Share `other`'s generator (another specialisation of the same model: one stream, as tomesd has)."""
        self._state = other._state

    def reset(self) -> None:
        self._state[0] = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The stream's generator for a call on `device` (tomesd's `compute_merge`: made at the first call, made
        again when the device changes)."""
        gen = self._state[0]
        if gen is None or gen.device != device:
            gen = self._state[0] = self._new_generator(device, gen)
        return gen

    def _new_generator(self, device: torch.device, fallback: torch.Generator | None) -> torch.Generator:
        """tomesd's `init_generator`: a fork of torch's global CPU or CUDA generator; on other devices the
        previous generator, or the CPU one. With `seed`: a generator seeded with it instead of a fork."""
        if device.type not in ("cpu", "cuda"):
            if fallback is not None:
                return fallback
            device = torch.device("cpu")
        gen = torch.Generator(device=device)
        if self.seed is not None:
            return gen.manual_seed(self.seed)
        return gen.set_state(torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device))

    def __call__(self, batch: int, device: torch.device) -> torch.Tensor:
        """The draws of one call at this batch size on this device (the generator advances, as tomesd's)."""
        gen = self.generator(device)
        if batch % 2:
            return torch.zeros(self.size, dtype=torch.int64, device=device)
        parts = [torch.randint(m, size=(hc, wc, 1), device=gen.device, generator=gen).reshape(-1)
                 for hc, wc, m in self.blocks]
        return torch.cat(parts).to(device)

    def example(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Draws for example inputs (tracing, ONNX verification) from a generator of their own: the stream and
        torch's global generator do not move."""
        gen = torch.Generator().manual_seed(0)
        parts = [torch.randint(m, size=(hc * wc,), generator=gen) for hc, wc, m in self.blocks]
        return torch.cat(parts).to(device)


def call_inputs(gm: torch.nn.Module) -> dict[str, DrawStream]:
    """The inputs a reduced graph takes beyond the model's own, each with the stream that fills it per call."""
    meta = getattr(gm, "meta", None)
    return dict(meta.get(CALL_INPUTS, {})) if isinstance(meta, dict) else {}


def feed_call_inputs(streams: Mapping[str, DrawStream], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Fill `kwargs` (in place) with each stream's draws for this call; an input the caller gave is kept. The
    batch and device are those of the first tensor input with a batch dimension (the latent)."""
    leaf = next((t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    for name, stream in streams.items():
        if name in kwargs:
            continue
        if leaf is None:
            raise TokenReduceError(f"{name}: no tensor input with a batch dimension to size the draws by")
        kwargs[name] = stream(int(leaf.shape[0]), leaf.device)


def add_keyword_input(gm: fx.GraphModule, name: str, like: torch.Tensor) -> fx.Node:
    """A new placeholder `name` after the graph's inputs, with a fake value like `like`; on an exported module
    (pytree calling convention) it becomes a keyword input, so `gm(*args, **kwargs, name=value)` calls it."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if any(p.name == name for p in placeholders):
        raise TokenReduceError(f"the model already has an input named {name!r}; tomesd's rand_stream='call' adds "
                               "one of that name for its draws", setting="rand_stream")
    with graph.inserting_after(placeholders[-1]):
        node = graph.placeholder(name)
    fake_mode = detect_fake_mode([p.meta.get("val") for p in placeholders])
    assert fake_mode is not None, "captured graphs carry fake values (capture.py)"
    with fake_mode:
        node.meta["val"] = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    codegen: Any = graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None:  # an exported module: ((args...), {kwargs...}) -> add the keyword
        args, kwargs = pytree.tree_unflatten([0] * info.in_spec.num_leaves, info.in_spec)  # 0: any leaf
        _, in_spec = pytree.tree_flatten((args, {**kwargs, name: like}))
        codegen.pytree_info = info._replace(orig_args=[*info.orig_args, name], in_spec=in_spec)
    gm.recompile()
    return node


@dataclass
class TomesdPlan(BlockPlan):
    """A block's plan: its grid, its destinations (`choices`, see `batch_choice`; `salt` for per-step
    destinations, see `step_choice`; or its part of the per-call draws, `stream` from `draw_offset`, see
    `stream_choice`) and the sublayers it merges."""

    grid: tuple[int, int] = (0, 0)
    num_dst: int = 0
    choices: torch.Tensor | None = None
    salt: int | None = None
    stream: DrawStream | None = None
    draw_offset: int = 0
    sublayers: tuple[str, ...] = ()


RAND_STREAMS = ("compile", "call")


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
    rand_seed: int | None = option(None, "seed of the random destinations; None forks torch's global generator "
                                         "as tomesd does (when compiling; rand_stream='call': at the first call)")
    rand_stream: str = option("compile", "'compile': random destinations drawn once when compiling (every call "
                                         "uses them); 'call': tomesd's stream, new draws at every call, fed to the "
                                         "graph as its tomesd_draws input", choices=RAND_STREAMS)
    merge_attn: bool = option(True, "merge tokens for self-attention")
    merge_crossattn: bool = option(False, "merge tokens for cross-attention")
    merge_mlp: bool = option(False, "merge tokens for the MLP")
    per_step: bool = option(False, "new random destinations at every call, derived from the timestep input "
                                   "(compiled once; not tomesd's random stream); needs use_rand")
    grid_h: int | None = option(None, "packed-latent transformers (Flux, [B, N, C] input): rows of the image token "
                                      "grid, row-major (a Flux pipeline: image height // 16); others read it from "
                                      "the 4-D latent")
    grid_w: int | None = option(None, "packed-latent transformers: columns of the image token grid (a Flux "
                                      "pipeline: image width // 16)")

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
        for name in ("merge_attn", "merge_crossattn", "merge_mlp", "per_step"):
            check_bool(name, getattr(self, name))
        if not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise fail("merge_attn", "merge_attn, merge_crossattn and merge_mlp are all False: nothing would "
                                     "run on merged tokens")
        for name in ("grid_h", "grid_w"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), lo=1)
        if (self.grid_h is None) != (self.grid_w is None):
            raise fail("grid_h", "give both grid_h and grid_w (the packed latent's token rows and columns), or "
                                 "neither")
        if self.per_step and not self.use_rand:
            raise fail("per_step", "per_step=True draws random destinations per step; with use_rand=False they "
                                   "are always the top-left ones")
        check_choice("rand_stream", self.rand_stream, RAND_STREAMS)
        if self.rand_stream == "call" and not self.use_rand:
            raise fail("rand_stream", "rand_stream='call' feeds random destinations at every call; with "
                                      "use_rand=False they are always the top-left ones: drop rand_stream")
        if self.rand_stream == "call" and self.per_step:
            raise fail("rand_stream", "rand_stream='call' (tomesd's random stream, fed per call) and per_step=True "
                                      "(destinations derived from the timestep in the graph) are two sources of "
                                      "per-call destinations: choose one")


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
        packed = self._packed_grid(options, analysis)
        stream = DrawStream(options.rand_seed) if options.rand_stream == "call" else None
        if stream is not None:
            gen = None  # drawn per call
        elif options.rand_seed is not None:
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
            downsample, (h, w) = (1, packed) if packed else (b.downsample, b.grid)
            if downsample > options.max_downsample:
                bp.reason = f"downsample {downsample} > max_downsample {options.max_downsample}"
                continue
            r = int(n * options.ratio)
            if r <= 0:
                bp.reason = f"ratio {options.ratio} merges no token of {n}"
                continue
            num_dst = (h // options.sy) * (w // options.sx)
            if r > n - num_dst:
                too_many.append((b, r, n - num_dst))
                continue
            here = tuple(k for k in wanted if k in b.sublayers)
            missing = [k for k in wanted if k not in b.sublayers]
            if stream is not None:  # tomesd draws in every block it would merge, even one whose sublayers it skips
                bp.draw_offset = stream.add_block(h // options.sy, w // options.sx, options.sy * options.sx)
            if not here:
                bp.reason = f"no {' / '.join(missing)} sublayer found"
                continue
            if stream is not None:
                bp.stream = stream
            elif options.per_step:
                bp.salt = int(torch.randint(MCG_MODULUS, (1,), generator=gen))
            else:
                assert gen is not None
                rows = [torch.zeros(num_dst, dtype=torch.int64)]  # top-left: odd batches, or use_rand=False
                if options.use_rand:  # tomesd's draw: randint(sy * sx, (h // sy, w // sx, 1)), block by block
                    drawn = torch.randint(options.sy * options.sx, size=(h // options.sy, w // options.sx, 1),
                                          generator=gen)
                    rows.insert(0, drawn.reshape(-1))
                bp.choices = torch.stack(rows)
            bp.action, bp.r, bp.tokens_out = self.name, r, n - r
            bp.grid, bp.num_dst, bp.sublayers = (h, w), num_dst, here
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
        if not any(p.reduces for p in plans) and options.ratio > 0:  # ratio=0: the unreduced graph, as asked
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

    @staticmethod
    def _packed_grid(options: TomesdOptions, analysis: DenoiserAnalysis) -> tuple[int, int] | None:
        """The token grid of a packed latent `[B, N, C]` from `grid_h` x `grid_w`; None for a 4-D latent."""
        given = None if options.grid_h is None else (options.grid_h, options.grid_w)
        n = analysis.packed_tokens
        if not n:
            if given is not None:
                raise TokenReduceError(
                    f"grid_h/grid_w apply to packed-latent transformers ([B, N, C] input, Flux); this denoiser's "
                    f"grid is read from its {analysis.image_size[0]} x {analysis.image_size[1]} latent: drop them",
                    setting="grid_h")
            return None
        if given is None:
            raise TokenReduceError(
                f"tomesd picks destinations on the image's 2-D token grid, but this denoiser takes a packed latent "
                f"[B, {n}, C] (Flux) whose grid is not in the graph: give grid_h and grid_w (rows and columns of "
                f"its {n} image tokens, row-major; a Flux pipeline packs an H x W image into H // 16 x W // 16)",
                setting="grid_h", hint=_square_hint(n))
        gh, gw = given
        assert isinstance(gh, int) and isinstance(gw, int)
        if gh * gw != n:
            raise TokenReduceError(f"grid_h={gh} x grid_w={gw} = {gh * gw} tokens, but the packed latent holds {n}",
                                   setting="grid_h", hint=_square_hint(n))
        return gh, gw

    def emit_slots(self, options: Options, site: MergeSite) -> fx.Node:
        bp = site.plan
        assert isinstance(bp, TomesdPlan) and isinstance(options, TomesdOptions)
        b = site.builder
        (h, w), m = bp.grid, options.sx * options.sy
        if bp.salt is not None:
            if site.timestep is None:
                raise TokenReduceError(
                    "per_step=True derives the destinations from the timestep, but no graph input of this denoiser "
                    "reaches a sinusoidal timestep embedding (sin/cos)", setting="per_step")
            choice = b.add(step_choice, (site.x, site.timestep, bp.salt, bp.num_dst, m))
        elif bp.stream is not None:
            choice = b.add(stream_choice, (site.x, _draws_node(b.graph, bp.stream, site.x), bp.draw_offset,
                                           bp.num_dst))
        else:
            assert bp.choices is not None
            gm = b.graph.owning_module
            assert gm is not None
            name = f"tomesd_choices_{bp.index}"
            gm.register_buffer(name, bp.choices.clone(), persistent=False)
            with b.graph.inserting_after(b.anchor):
                choices = b.graph.get_attr(name)
            choices.meta["tokenreduce"] = True
            b.anchor = choices
            b.nodes.add(choices)
            choice = b.add(batch_choice, (site.x, choices))
        return b.add(tomesd_slots, (site.x, choice, h, w, options.sx, options.sy, bp.r))

    def emit_positions(self, options: Options, site: MergeSite, slot: fx.Node) -> tuple[fx.Node, fx.Node]:
        """`(slot, positions)`: the `slot` node that `emit_slots` emitted, turned into the plan that also gives
        `[B, N - r]`, the token each slot stands for (a merged slot: its destination). Per-token side inputs
        (Flux's rotary tables) are gathered by it. Only blocks that need positions pay for them."""
        assert slot.target is tomesd_slots
        b = site.builder
        plan = b.add(tomesd_plan, slot.args)
        new_slot, positions = b.item(plan, 0), b.item(plan, 1)
        slot.replace_all_uses_with(new_slot)
        b.graph.erase_node(slot)
        return new_slot, positions

    def action(self, bp: BlockPlan, analysis: ModelAnalysis) -> str:
        subs = ", ".join(bp.sublayers) if isinstance(bp, TomesdPlan) else ""
        return f"tomesd r={bp.r} ({subs})"

    def label(self, values: Mapping[str, Any]) -> str:
        return f"tomesd ratio={values.get('ratio', 0.5)}"

    def identity_reason(self, values: Mapping[str, Any]) -> str | None:
        if values.get("ratio", 0.5) == 0:
            return "ratio=0 merges nothing: tomesd needs ratio (fraction of tokens merged), e.g. ratio=0.5"
        return None


def _draws_node(graph: fx.Graph, stream: DrawStream, x: fx.Node) -> fx.Node:
    """The graph's per-call draws input, added (and its stream recorded in the module's meta) by the first block
    that reads it."""
    for n in graph.nodes:
        if n.op == "placeholder" and n.meta.get(CALL_INPUTS) is stream:
            return n
    gm = graph.owning_module
    assert isinstance(gm, fx.GraphModule)
    node = add_keyword_input(gm, DRAWS_INPUT, torch.zeros(stream.size, dtype=torch.int64,
                                                          device=x.meta["val"].device))
    node.meta[CALL_INPUTS] = stream
    node.meta["tokenreduce"] = True
    gm.meta.setdefault(CALL_INPUTS, {})[DRAWS_INPUT] = stream
    return node


def _square_hint(n: int) -> str | None:
    side = math.isqrt(n)
    return f"grid_h={side}, grid_w={side}" if side * side == n else None


METHOD = Tomesd()
