"""VisionZip: keep the dominant image tokens (those the vision tower's CLS attends to most, or, in a CLS-free
tower such as Qwen2-VL's, those that receive the most attention) and a few contextual tokens that absorb the
rest by similarity, before the LLM.

Source: Yang, Chen, Tian, Wang, Wang, Jia, "VisionZip: Longer is Better but Not Necessary in Vision
Language Models", CVPR 2025 (official code dvlab-research/VisionZip, `visionzip/clip_encoder.py` and
`utils.py`, read, not copied). At the vision layer whose output the projector reads (LLaVA's
`vision_feature_layer`), the dominant patches are the top ones by the CLS query's attention summed over
heads; the other patches are split, in order, into contextual targets (every `R // contextual`-th) and the
rest, each of which joins the target whose head-averaged key is most cosine-similar; a target's feature
becomes `target + mean(joined)`. The features are merged there, before the projector, exactly as the
official code does; the projector and the placeholder scatter then run unchanged (placeholder counts stay
consistent), and the LLM's prefill is pruned at layer 0 to the dominant patches and the targets, so its
KV cache shrinks from the first layer. Defaults: 64 of LLaVA-1.5's 576 image tokens (`keep_ratio` 0.111),
of which 10 contextual (`contextual_ratio` 10/64), the paper's smallest setting.

Where this departs from the official code, on purpose:

* the CLS token is not an LLM token: LLaVA's `vision_feature_select_strategy='default'` drops it, so all
  `keep` kept tokens are patches (the official code feeds the CLS feature as one of the dominant tokens);
* kept tokens keep their original positions and order (the official code puts the contextual tokens after
  all dominant ones and renumbers the shorter sequence);
* batch > 1: each row (one image per prompt) selects and merges on its own image.

The plan is `tokenreduce::visionzip_plan` (`kernels/decoder_ops.py`): top-k with constant k, one-hot
assignment matmuls, static shapes, so the pruned prefill exports.

Qwen2-VL / Qwen2.5-VL (`qwen_vision_hooks`). Their vision tower runs eagerly, before the captured prefill
(its token count depends on `image_grid_thw` values, which torch.export cannot specialise a graph on), so the
scores are computed where it runs, by hooks during the model's own run, rather than by bringing the tower
into the graph; the LLM's prefill is then pruned in the graph from the `vision_scores` input (`[B, N]`, 1 for
a kept token), exactly as for LLaVA. The tower is CLS-free, so a token's rank is the attention it
*receives*: the softmax of the scoring block (the last block, which the merger reads; Qwen2.5-VL: the last
full-attention block, the last block in the released models) averaged over heads and over the queries of its
attention segment (an image, or one temporal patch of a video: Qwen attends per frame). Every score, count
and merge is per LLM visual token, i.e. per 2x2 merger group: a group's score sums its four patches', its
similarity key averages their head-averaged keys, and a contextual target's four patch features each add
the mean of the joined groups' corresponding patches, before the merger (the official CLIP path merges
before the projector too). Qwen2.5-VL's tower runs in window order; selection runs in the raster order the
LLM sees. Placeholder counts do not change (the model scatters all its tokens; the graph prunes them), and
kept tokens keep their original 3-axis (mRoPE) positions. Source for this path: the official repository
(dvlab-research/VisionZip, stored snapshot 3151f6d) has only the LLaVA path; a third-party Qwen2-VL port
(Hanjiangli/VisionZip-Qwen2VL, read) ranks patches of layer -2 by the attention *of* patch 0 as if it were
a CLS token and selects before the 2x2 merger, which breaks its groups; neither is followed there.

Departures for Qwen, on purpose: the kept count of a row (`ceil(keep_ratio * vision tokens)`) is split over
its images and video frames in proportion to their token counts (largest remainder, ties to the earlier),
and each segment then splits its share into dominant and contextual tokens and selects among its own tokens
(the official code runs one image with fixed counts); rows may differ in image count and size as long as
their vision-token totals agree (the keep counts are static).

Refuses: any layer but 0; LLaVA-style features that are not one image of `span` patches plus a CLS token per
prompt (`vision_site`); for a grid-input VLM, a tower without Qwen's `blocks` / `merger` /
`spatial_merge_size` or its rotary function, grids whose token counts disagree with the prompt's
placeholders, an image spanning two rows, and a span other than exactly the vision tokens (`decoder_api`);
ratios outside (0, 1].
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from tokenreduce.methods.base import Options, check_ratio, fail, option
from tokenreduce.methods.prefill import (
    BeforeLlmMethod,
    BeforeLlmOptions,
    VisionSite,
    ratio_keep,
)

tr = torch.ops.tokenreduce

VISIONZIP_KEEP_RATIO = 64 / 576  # LLaVA-1.5's smallest setting in the paper: 54 dominant + 10 contextual
VISIONZIP_CONTEXTUAL = 10 / 64  # 54 + 10, 108 + 20, 162 + 30: the contextual share of every paper setting


@dataclass(frozen=True)
class VisionzipOptions(BeforeLlmOptions):
    keep_ratio: float = option(VISIONZIP_KEEP_RATIO, "fraction of the image tokens kept, in (0, 1] (default: the "
                                                     "paper's 64 of 576)")
    contextual_ratio: float = option(VISIONZIP_CONTEXTUAL, "share of the kept tokens that are contextual (merged) "
                                                           "tokens, in (0, 1] (default 10/64, as every paper setting)")

    def validate(self) -> None:
        super().validate()
        self.set("contextual_ratio", check_ratio("contextual_ratio", self.contextual_ratio))


class Visionzip(BeforeLlmMethod):
    name = "visionzip"
    summary = ("keep the tokens the vision CLS attends to most (Qwen-VL: receive most attention) and merge the rest "
               "into a few (Yang et al., CVPR 2025)")
    options_type = VisionzipOptions

    @staticmethod
    def split(options: VisionzipOptions, keep: int) -> tuple[int, int]:
        """(dominant, contextual) patch counts of `keep` kept tokens."""
        contextual = min(keep, round(options.contextual_ratio * keep))
        return keep - contextual, contextual

    def emit_vision(self, options: Options, site: VisionSite, keep: int) -> tuple[fx.Node, fx.Node]:
        assert isinstance(options, VisionzipOptions)
        dominant, contextual = self.split(options, keep)
        att = site.attention
        plan = site.builder.add(tr.visionzip_plan.default, (site.features, att.q, att.k, att.mask, att.scale, dominant,
                                                            contextual))
        return site.builder.item(plan, 0), site.builder.item(plan, 1)

    def eager_vision(self, options: Options, model: torch.nn.Module, input_ids: torch.Tensor,
                     extra: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager[Callable[[], torch.Tensor]]:
        assert isinstance(options, VisionzipOptions)
        return qwen_vision_hooks(options, model, input_ids, extra)



# ------------------------------------------------------------------ Qwen2-VL / Qwen2.5-VL: the eager vision tower
@dataclass
class Segment:
    """One attention segment of the vision tower (an image, or one temporal patch of a video: Qwen's full
    attention runs per frame, `cu_seqlens`): `groups` merged (LLM) tokens, starting at flat group `start` of
    its vision call, in prompt row `row`; `dominant` + `contextual` of them are kept."""

    start: int
    groups: int
    row: int
    first: int  # sequence position of its first token (orders a row's segments)
    dominant: int = 0
    contextual: int = 0


@dataclass
class VisionCall:
    """One call of the vision tower (images, then videos): its grid, token id and segments."""

    kind: str
    grid: torch.Tensor
    token_id: int
    segments: list[Segment]
    window_index: torch.Tensor | None = None  # Qwen2.5-VL: raster group of each window-order group
    received: torch.Tensor | None = None  # [G] attention each merged group receives (raster order)
    keys: torch.Tensor | None = None  # [G, d] head- and group-averaged keys (raster order)
    kept: torch.Tensor | None = None  # [G] 1.0 for a kept group


def quotas(keep: int, sizes: list[int]) -> list[int]:
    """`keep` split over segments of `sizes` in proportion (largest remainder, ties to the earlier segment):
    sums to `keep`, and no segment gets more than its size when `keep <= sum(sizes)`."""
    total = sum(sizes)
    base = [keep * s // total for s in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (-(keep * sizes[i] % total), i))
    for i in order[:keep - sum(base)]:
        base[i] += 1
    return base


def plan_calls(options: VisionzipOptions, config: Any, unit: int, input_ids: torch.Tensor,
               extra: dict[str, torch.Tensor]) -> list[VisionCall]:
    """The vision calls the model will make for these inputs, each segment's row and kept counts."""
    calls: list[VisionCall] = []
    for kind, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        grid = extra.get(f"{kind}_grid_thw")
        if pixels not in extra or grid is None:
            continue
        token_id = getattr(config, f"{kind}_token_id", None)
        if not isinstance(token_id, int):
            raise fail("method", f"visionzip: the model config has no {kind}_token_id to find the {kind} tokens")
        where = (input_ids == token_id).nonzero().tolist()  # row-major, as the model scatters the features
        sizes = [(int(t), int(h) * int(w) // unit) for t, h, w in grid.tolist()]
        if sum(t * g for t, g in sizes) != len(where):
            raise fail("method", f"visionzip: {kind}_grid_thw gives {sum(t * g for t, g in sizes)} {kind} tokens but "
                                 f"the prompt has {len(where)} (placeholder count and grid must agree)")
        segments, start = [], 0
        for t, g in sizes:
            for _ in range(t):
                row = where[start][0]
                if where[start + g - 1][0] != row:
                    raise fail("method", f"visionzip: one {kind} spans two prompt rows")
                segments.append(Segment(start, g, row, where[start][1]))
                start += g
        calls.append(VisionCall(kind, grid, token_id, segments))
    for row in range(input_ids.shape[0]):
        mine = sorted((s for c in calls for s in c.segments if s.row == row), key=lambda s: s.first)
        if not mine:
            continue
        keep = ratio_keep(options.keep_ratio, sum(s.groups for s in mine))
        for s, k in zip(mine, quotas(keep, [s.groups for s in mine]), strict=True):
            s.dominant, s.contextual = Visionzip.split(options, k)
    return calls


def select_and_merge(call: VisionCall, feats: torch.Tensor) -> torch.Tensor:
    """Per segment: the dominant groups (most attention received), contextual targets (every `R // c`-th
    remaining group, in order), each other remaining group joins its most key-similar target, and a target's
    patch features become `target + mean(joined)` (patch by patch within the 2x2 group). `feats [G, unit, C]`
    in raster group order; returns the merged features and sets `call.kept`."""
    assert call.received is not None and call.keys is not None
    out = feats.float().clone()
    kept = torch.zeros(feats.shape[0])
    unit_keys = call.keys / call.keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    for s in call.segments:
        idx = torch.arange(s.start, s.start + s.groups)
        dom = call.received[idx].topk(s.dominant).indices if s.dominant else torch.zeros(0, dtype=torch.long)
        kept[idx[dom]] = 1.0
        is_dom = torch.zeros(s.groups, dtype=torch.bool)
        is_dom[dom] = True
        rest = idx[~is_dom]
        if s.contextual == 0:
            continue
        pick = torch.zeros(len(rest), dtype=torch.bool)
        pick[torch.arange(0, len(rest), max(1, len(rest) // s.contextual))[:s.contextual]] = True
        targets, others = rest[pick], rest[~pick]
        kept[targets] = 1.0
        if len(others) == 0:
            continue
        joins = (unit_keys[others] @ unit_keys[targets].T).argmax(-1)  # first target on ties
        for j, t in enumerate(targets.tolist()):
            members = others[joins == j]
            if len(members):
                out[t] = out[t] + feats[members].float().mean(0)
    call.kept = kept
    return out.to(feats.dtype)


@contextlib.contextmanager
def qwen_vision_hooks(options: VisionzipOptions, model: torch.nn.Module, input_ids: torch.Tensor,
                      extra: dict[str, torch.Tensor]) -> Iterator[Callable[[], torch.Tensor]]:
    """Hooks on a Qwen2-VL / Qwen2.5-VL vision tower for one eager run of the model: they score the merged
    tokens from the scoring block's attention, merge the contextual ones in the features the patch merger
    reads, and yield a function giving the `[B, N]` float keep scores (1 for a kept image / video token)."""
    visual: Any = getattr(getattr(model, "model", None), "visual", None)
    blocks, merger = getattr(visual, "blocks", None), getattr(visual, "merger", None)
    merge = getattr(visual, "spatial_merge_size", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not isinstance(merger, torch.nn.Module) or not isinstance(merge, int):
        raise fail("method", f"visionzip: {type(visual).__name__} is not a Qwen2-VL-style vision tower (blocks, "
                             "merger, spatial_merge_size); only Qwen2-VL / Qwen2.5-VL towers are scored eagerly")
    full = getattr(visual, "fullatt_block_indexes", None)  # Qwen2.5-VL: the others attend within windows
    score_block = int(full[-1]) if full else len(blocks) - 1
    attn: Any = blocks[score_block].attn
    mod = sys.modules[type(attn).__module__]
    rotary = getattr(mod, "apply_rotary_pos_emb_vision", None)
    window = getattr(mod, "get_vision_window_index", None) if full else None
    if rotary is None or (full and window is None):
        raise fail("method", f"visionzip: {mod.__name__} has no apply_rotary_pos_emb_vision"
                             f"{' / get_vision_window_index' if full else ''} to score its vision attention with")
    unit = merge * merge
    calls = plan_calls(options, model.config, unit, input_ids, extra)
    done: list[VisionCall] = []

    def current() -> VisionCall:
        if not done:
            raise fail("method", "visionzip: the vision tower's blocks ran outside a vision tower call")
        return done[-1]

    def on_visual(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if len(done) >= len(calls) or not isinstance(grid, torch.Tensor) or not torch.equal(grid, calls[len(done)].grid):
            raise fail("method", "visionzip: the vision tower was called with grids other than image_grid_thw, then "
                                 "video_grid_thw (the order the model's own code uses)")
        call = calls[len(done)]
        if window is not None:
            call.window_index = window(grid, spatial_merge_size=merge, window_size=visual.window_size,
                                       patch_size=visual.patch_size)[0]
        done.append(call)

    def raster(x: torch.Tensor) -> torch.Tensor:  # [G, ...] window order -> raster order
        wi = current().window_index
        return x if wi is None else x[torch.argsort(wi)]

    def on_attention(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        cu = kwargs["cu_seqlens"]
        cos, sin = kwargs["position_embeddings"]
        with torch.no_grad():
            q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = rotary(q, k, cos, sin)  # [P, H, d] each
            received = torch.zeros(x.shape[0])
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
                logits = torch.einsum("qhd,khd->hqk", q[a:b].float(), k[a:b].float()) * attn.scaling
                received[a:b] = logits.softmax(-1).mean((0, 1))  # column mean over heads and queries
            call = current()
            call.received = raster(received.view(-1, unit).sum(-1))
            call.keys = raster(k.float().mean(1).view(-1, unit, k.shape[-1]).mean(1))

    def on_merger(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        call = current()
        with torch.no_grad():
            merged = select_and_merge(call, raster(x.view(-1, unit, x.shape[-1])))
            if call.window_index is not None:
                merged = merged[call.window_index]
        return (merged.reshape(x.shape), *args[1:])

    def scores() -> torch.Tensor:
        if len(done) != len(calls) or any(c.kept is None for c in calls):
            raise fail("method", f"visionzip: the model ran {len(done)} of {len(calls)} vision tower calls "
                                 "through the scoring block and the merger")
        out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
        for c in calls:
            assert c.kept is not None
            out[input_ids == c.token_id] = c.kept.to(out.device)
        return out

    handles = [visual.register_forward_pre_hook(on_visual, with_kwargs=True),
               attn.register_forward_pre_hook(on_attention, with_kwargs=True),
               merger.register_forward_pre_hook(on_merger)]
    try:
        yield scores
    finally:
        for h in handles:
            h.remove()


METHOD = Visionzip()
