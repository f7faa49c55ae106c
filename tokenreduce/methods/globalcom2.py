"""GlobalCom2: for AnyRes VLMs (LLaVA-NeXT), the thumbnail guides how many tokens each crop keeps, then each
crop keeps its best tokens; before the LLM, so its prefill and KV cache shrink from the first layer.

Source: Liu, Wang, Han, Wang, Yuan, Song, Zheng, Zhang, Huang, Chen, "Compression with Global Guidance:
Towards Training-free High-Resolution MLLMs Acceleration" (GlobalCom2), 2025 (official code
xuyang-liu16/GlobalCom2, `llava/model/llava_arch.py`: `generate_scale_for_crop_features`,
`compress_thumbnail`, `compress_crops`, `interpolate_and_split_cls_attn_scores`,
`select_topk_crop_features`; read, not copied). Scores come from the vision tower's CLS attention (here: of
the vision layer whose output the projector reads, averaged over heads), per image of the AnyRes batch:

* the thumbnail keeps its tokens with the most CLS attention (retention `keep_ratio`);
* crop `c`'s retention is `keep_ratio * (1 + sm_c - mean(sm))`, clipped at 1, where `sm` is the softmax
  (temperature 10) over the crops of the thumbnail's CLS attention summed over the thumbnail patches that
  cover the crop's region;
* inside a crop, a token's score is its own CLS attention, L2-normalised over the crop, plus the
  thumbnail's CLS attention bilinearly interpolated to the unpadded crop grid at its place, L2-normalised
  over the crop; the best are kept. Newline tokens are kept. Kept tokens keep their original order and
  positions. Default `keep_ratio` 0.25, the official `retention_ratio`.

Where this departs from the official code, on purpose:

* exact, static keep count: `ceil(keep_ratio * image tokens)` (newlines included, kept first); the budget
  left after the newlines is apportioned among the thumbnail and the crops by the Sainte-Lague rule on
  the weights `tokens * retention` (the official code keeps `int(tokens * retention)` per group, whose sum
  varies with the image). Each crop's count still follows the thumbnail's guidance, so it differs from
  image to image; only the total is a constant of the graph (`tokenreduce::globalcom2_scores` in
  `kernels/anyres_ops.py`), so shapes are static and the prefill exports. `keep_ratio=1` keeps every token;
* the unpadded crop area is the model's own (transformers' `unpad_image` rounds the kept rows where the
  official mask truncates);
* batch > 1: each row has its own image and layout (rows may have different `image_sizes` if their image
  token counts are equal).

Refuses: models that are not AnyRes (no `image_sizes` / `pack_image_features`: LLaVA-1.5, Qwen2-VL, text
models), with the methods that work there; more than one image per row; `vision_feature_select_strategy`
other than "default" (the CLS token ranks); `keep_ratio` outside (0, 1], `temperature` <= 0.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch._guards import detect_fake_mode

from tokenreduce.analysis.decoder import is_causal
from tokenreduce.analysis.encoder import find_attention
from tokenreduce.errors import TokenReduceError
from tokenreduce.ir.graph import reach
from tokenreduce.kernels import anyres_ops, decoder_ops
from tokenreduce.methods.base import Options, Stage, check_ratio, fail, option
from tokenreduce.methods.prefill import SelectionMethod, SelectionSite, ratio_keep

tr = torch.ops.tokenreduce

GLOBALCOM2_KEEP_RATIO = 0.25  # the official retention_ratio
GLOBALCOM2_TEMPERATURE = 10.0  # generate_scale_for_crop_features' softmax temperature
ANYRES_INPUTS = ("anyres_layout", "anyres_guide")  # the side inputs the method's graph reads
WORKS_ELSEWHERE = "fastv, pyramiddrop, gemfilter, divprune, dart, sparsevlm, visiondrop (and visionzip on LLaVA-1.5)"


def not_anyres(method: str, model: str) -> str:
    """The refusal for a model (or prompt) GlobalCom2 cannot lay out."""
    return (f"{method} needs an AnyRes VLM (LLaVA-NeXT: a thumbnail plus crops per image, from `image_sizes`) with one "
            f"image per prompt row and vision_feature_select_strategy='default'; {model} with these inputs is not one. "
            f"Methods that work there: {WORKS_ELSEWHERE}")


def anyres_side_inputs(model: torch.nn.Module, input_ids: torch.Tensor, image_sizes: list[list[int]]
                       ) -> dict[str, torch.Tensor]:
    """`anyres_layout [B, N, 4]` and `anyres_guide [B, N, P]` (see `kernels/anyres_ops.py`) for a LLaVA-NeXT
    prompt with one image per row, built by running the model's own `pack_image_features` on patch indices
    (so the layout is exactly the model's: thumbnail, crops, unpadding, newlines). Empty where the model or
    prompt is not one GlobalCom2 can lay out (any other method does not read them)."""
    inner, cfg = getattr(model, "model", None), getattr(model, "config", None)
    pack = getattr(inner, "pack_image_features", None)
    pinpoints = getattr(cfg, "image_grid_pinpoints", None)
    image_id = getattr(cfg, "image_token_id", None)
    if cfg is None or pack is None or pinpoints is None or image_id is None or len(image_sizes) != input_ids.shape[0]:
        return {}
    if getattr(cfg, "vision_feature_select_strategy", "default") != "default":
        return {}
    module = importlib.import_module(type(inner).__module__)
    num_patches, grid_shape = module.image_size_to_num_patches, module.get_anyres_image_grid_shape
    vc = cfg.vision_config
    side = vc.image_size // vc.patch_size
    p = side * side
    counts = [int(num_patches(s, pinpoints, vc.image_size)) for s in image_sizes]
    feats: list[torch.Tensor] = []
    first: list[int] = []
    for c in counts:
        start = sum(counts[:len(first)], 0)
        first.append(start)
        feats.append(torch.arange(start * p, (start + c) * p, dtype=torch.float64).view(c, p, 1))
    with torch.no_grad():
        packed, _ = pack(feats, image_sizes, "default", image_newline=torch.full((1,), -1.0, dtype=torch.float64))
    b, n = input_ids.shape
    layout = torch.full((b, n, 4), 0, dtype=torch.long)
    layout[..., 0] = -2
    guide = torch.zeros(b, n, p)
    for row in range(b):
        where = torch.nonzero(input_ids[row] == image_id).flatten()
        src = packed[row][:, 0].round().long()
        if where.numel() != src.numel():
            return {}  # more than one image in a row, or placeholders that do not match this image
        nh, nw = grid_shape(image_sizes[row], pinpoints, vc.image_size)
        base = first[row] * p
        local, patch = (src - base).div(p, rounding_mode="floor"), (src - base) % p
        pi, pj = patch // side, patch % side
        group = torch.where(src < 0, -1, local)
        ph, pw = max(side // nh, 1), max(side // nw, 1)
        region = (pi // ph).clamp(max=nh - 1) * nw + (pj // pw).clamp(max=nw - 1) + 1
        crop = group >= 1
        gr = (local - 1).div(nw, rounding_mode="floor") * side + pi  # row / column in the padded crop grid
        gc = (local - 1) % nw * side + pj
        layout[row, where, 0] = group
        layout[row, where, 1] = src.clamp(min=0)
        layout[row, where, 2] = torch.where(group == 0, region, 0)
        layout[row, :, 3] = base
        if bool(crop.any()):  # the thumbnail's scores interpolated to the unpadded crop grid (bilinear)
            r0, c0 = int(gr[crop].min()), int(gc[crop].min())
            hu, wu = int(gr[crop].max()) - r0 + 1, int(gc[crop].max()) - c0 + 1
            basis = torch.eye(p).view(p, 1, side, side)
            interp = F.interpolate(basis, size=(hu, wu), mode="bilinear", align_corners=False)[:, 0]  # [P, hu, wu]
            guide[row, where[crop]] = interp[:, gr[crop] - r0, gc[crop] - c0].T
    return {"anyres_layout": layout.to(input_ids.device), "anyres_guide": guide.to(input_ids.device)}


@dataclass(frozen=True)
class Globalcom2Options(Options):
    keep_ratio: float = option(GLOBALCOM2_KEEP_RATIO, "fraction of the image tokens kept overall, in (0, 1] "
                                                      "(default: the official retention_ratio 0.25)")
    temperature: float = option(GLOBALCOM2_TEMPERATURE, "softmax temperature of the crop budgets (default 10, "
                                                        "the official one)")

    def validate(self) -> None:
        self.set("keep_ratio", check_ratio("keep_ratio", self.keep_ratio))
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise fail("temperature", f"temperature must be a number > 0, got {self.temperature!r}")
        self.set("temperature", float(self.temperature))


class Globalcom2(SelectionMethod):
    name = "globalcom2"
    summary = "AnyRes VLMs: the thumbnail's CLS attention sets each crop's budget, crops keep their best tokens " \
              "(Liu et al., 2025)"
    options_type = Globalcom2Options

    def default_layers(self, num_layers: int) -> tuple[int, ...]:
        return (0,)

    def references(self) -> dict[Any, Callable[..., Any]]:
        return {**decoder_ops.REFERENCES, **anyres_ops.REFERENCES}

    def stages(self, options: Options, num_layers: int, span: int) -> list[Stage]:
        assert isinstance(options, Globalcom2Options)
        return [Stage(score_block=0, first_reduced_block=0, keep=ratio_keep(options.keep_ratio, span))]

    def emit_scores(self, options: Options, site: SelectionSite) -> fx.Node:
        assert isinstance(options, Globalcom2Options)
        graph = site.builder.graph
        gm = graph.owning_module
        x0 = site.embeddings if site.embeddings is not None else site.hidden
        up = set(reach([x0], "all_input_nodes", None))
        atts = [a for a in find_attention(gm) if not is_causal(a) and a.node in up] if gm is not None else []
        if not atts:
            raise TokenReduceError(not_anyres(self.name, "a model whose vision tower is not in the captured prefill"),
                                   setting="method")
        att = atts[-1]  # the vision layer whose output the projector reads
        kshape = tuple(att.k.meta["val"].shape)
        if len(kshape) != 4:
            raise TokenReduceError(f"{self.name}: the vision attention's keys are {list(kshape)}, not [images, heads, "
                                   "1 + patches, head_dim]", setting="method")
        b, n = tuple(site.hidden.meta["val"].shape[:2])
        placeholders = [nd for nd in graph.nodes if nd.op == "placeholder"]
        fake = detect_fake_mode([nd.meta.get("val") for nd in placeholders])
        assert fake is not None, "captured graphs carry fake values"
        made = []
        for name, shape, dtype in (("anyres_layout", (b, n, 4), torch.long), ("anyres_guide", (b, n, kshape[2] - 1),
                                                                                torch.float32)):
            with graph.inserting_after(placeholders[-1]):
                node = graph.placeholder(name)
            with fake:
                node.meta["val"] = torch.empty(shape, dtype=dtype)
            placeholders.append(node)
            made.append(node)
        return site.builder.add(tr.globalcom2_scores.default, (att.q, att.k, att.scale, made[0], made[1], site.droppable,
                                                                site.keep, site.num_droppable, options.keep_ratio,
                                                                options.temperature))


METHOD = Globalcom2()
