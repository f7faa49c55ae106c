"""Token maps: which image patches a reduced model merged into one token, or pruned, after chosen blocks.

The reduced graph is run eagerly once on the image, and the plan of every reducing block is read where it is
applied (the `slot` argument of each `tokenreduce.apply_plan` node: input token -> output slot, `N'` for a
dropped token). Following those maps from the input gives each original patch's token after every block (the
same composition as the `source` map that `unmerge` uses), so this works for every encoder method without
knowing how it scores.

Drawing: one panel per chosen block in a grid, after the input image. A merging method's groups are each
filled with the mean colour of their pixels (as the ToMe paper's figures), made unique per panel so a group is
exactly one colour; a pruning method's kept tokens keep their pixels' mean colour and its pruned patches (fused
into one summary token, or dropped) are grey. The panel title gives the block and its token count on this
image (the slots its plan produced: for DyMU, whose count follows the input, the image's own count at batch
1, not the report's calibrated nominal one). Pixels are drawn per patch with no interpolation, so a test can
count a panel's colours.

Many-to-many plans (Token Transforming's dense `[B, N', N]` matrix, `kernels.reference.apply_matrix`): a
removed token's mass is shared among its `topk` most similar kept tokens, so a patch can belong to several
tokens at once; the map draws each patch in the slot that receives the largest share of it (its dominant slot,
the same choice `unmerge` makes). Every kept token keeps its own column with share 1, so every slot is some
patch's dominant slot and the panel still shows exactly N' groups. DyMU's one-hot matrix plan is drawn exactly.

Refuses: models whose token grid cannot be recovered from the input (the patch count must tile the image's
aspect ratio), images that are not RGB-convertible, and settings that reduce nothing (nothing to show).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels.reference import apply_matrix
from tokenreduce.methods import registry
from tokenreduce.util.files import atomic_path

GREY = (128, 128, 128)  # pruned patches
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Panel:
    block: int
    tokens: int  # tokens after the block on this image (the plan's output slots, protected and fused included)
    groups: np.ndarray  # [gh, gw] int: the token (slot) each patch is in after the block; -1 = pruned
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # (left, top, right, bottom) of the picture in the grid


@dataclass
class TokenMap:
    """Per chosen block, which token every patch belongs to; `render()` draws the grid, `save()` writes a PNG."""

    image: np.ndarray  # [H, W, 3] uint8: the model's input image (resized)
    grid: tuple[int, int]  # patches (rows, columns)
    panels: list[Panel]
    num_protected: int
    method: str
    report: Any = None
    cell: int = 0  # pixels per patch in the drawing
    notes: list[str] = field(default_factory=list)

    def colours(self, panel: Panel) -> np.ndarray:
        """[gh, gw, 3] uint8: each group's mean image colour, unique per group; GREY for pruned patches."""
        gh, gw = self.grid
        ph, pw = self.image.shape[0] // gh, self.image.shape[1] // gw
        patch_mean = self.image[:gh * ph, :gw * pw].reshape(gh, ph, gw, pw, 3).mean(axis=(1, 3))
        out = np.zeros((gh, gw, 3), dtype=np.uint8)
        out[:] = GREY
        used: set[tuple[int, ...]] = {GREY}
        for g in np.unique(panel.groups):
            if g < 0:
                continue
            where = panel.groups == g
            c = tuple(int(v) for v in np.clip(np.round(patch_mean[where].mean(axis=0)), 0, 255))
            step = 0
            while c in used:  # keep groups apart: nudge a colour that another group (or grey) already has
                step += 1
                c = tuple(int(v) for v in (np.array(c) + np.array([step % 2, (step // 2) % 2, 1])) % 256)
            used.add(c)
            out[where] = c
        return out

    def render(self, cell: int | None = None, columns: int | None = None) -> Any:
        """The grid (PIL image): the input image, then one panel per block, each titled."""
        from PIL import Image, ImageDraw

        gh, gw = self.grid
        self.cell = cell or max(4, 224 // max(gh, gw))
        w, h = gw * self.cell, gh * self.cell
        n = len(self.panels) + 1
        cols = columns or min(n, 4)
        rows = -(-n // cols)
        pad, title = 8, 16
        canvas = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad + title) + pad), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        pictures = [("input", Image.fromarray(self.image).resize((w, h), Image.Resampling.BILINEAR))]
        for p in self.panels:
            cells = np.repeat(np.repeat(self.colours(p), self.cell, axis=0), self.cell, axis=1)
            pictures.append((f"block {p.block}: {p.tokens} tokens", Image.fromarray(cells)))
        for i, (text, pic) in enumerate(pictures):
            x = pad + (i % cols) * (w + pad)
            y = pad + (i // cols) * (h + pad + title)
            draw.text((x, y), text, fill=(0, 0, 0))
            canvas.paste(pic, (x, y + title))
            if i > 0:
                self.panels[i - 1].box = (x, y + title, x + w, y + title + h)
        return canvas

    def save(self, path: str | os.PathLike[str], columns: int | None = None) -> Path:
        """Write the grid as PNG (atomically)."""
        img = self.render(self.cell or None, columns)
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG")
        return Path(path)


def load_image(image: Any, size: int | tuple[int, ...]) -> np.ndarray:
    """A path, PIL image or `[H, W, 3]` uint8 array as an RGB uint8 array resized to `size` (bicubic)."""
    from PIL import Image

    hw = (size, size) if isinstance(size, int) else tuple(size)
    if isinstance(image, str | os.PathLike):
        if not Path(image).is_file():
            raise TokenReduceError(f"image {image} not found")
        with Image.open(image) as im:
            pil = im.convert("RGB")
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise TokenReduceError(f"an image array must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
        pil = Image.fromarray(image)
    elif isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        raise TokenReduceError(f"image must be a path, a PIL image or an [H, W, 3] uint8 array, got "
                               f"{type(image).__name__}")
    return np.asarray(pil.resize((hw[1], hw[0]), Image.Resampling.BICUBIC), dtype=np.uint8)


def imagenet_input(image: np.ndarray) -> torch.Tensor:
    """`[1, 3, H, W]` float: the image scaled to [0, 1] and normalised with ImageNet mean/std."""
    x = torch.from_numpy(image.copy()).permute(2, 0, 1).float()[None] / 255.0
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


class _SlotRecorder(fx.Interpreter):
    """Runs a reduced graph and keeps the `slot` and output count of every `apply_plan`, in execution order.
    A dense many-to-many plan (`apply_matrix`, Token Transforming) shares a token among several slots; its
    map shows each token in the slot that receives the largest share of it (a token with no share anywhere,
    a dropped one, gets slot N')."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.slots: list[tuple[torch.Tensor, int]] = []

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target is torch.ops.tokenreduce.apply_plan.default:
            self.slots.append((args[1].detach().clone(), int(args[4])))
        elif target is apply_matrix:
            matrix = args[1].detach()  # [B, N', N]
            n_out = int(matrix.shape[1])
            dominant = matrix.argmax(dim=1)
            self.slots.append((torch.where(matrix.amax(dim=1) > 0, dominant, torch.full_like(dominant, n_out)),
                               n_out))
        return super().call_function(target, args, kwargs)


def patch_groups(slots: Sequence[tuple[torch.Tensor, int]], num_protected: int, merges: bool) -> list[np.ndarray]:
    """For each reduction in order: `[N0 - P]` int, the slot of each original patch after it, -1 if pruned.

    A merging method's tokens are groups; for a pruning method (no merges), a patch whose token was dropped
    (slot `N'`) or sent into a slot shared with other tokens (EViT's fused token) is pruned from then on."""
    if not slots:
        return []
    n0 = slots[0][0].shape[1]
    source = np.arange(n0)
    pruned = np.zeros(n0, dtype=bool)
    out = []
    for slot_t, n_out in slots:
        slot = slot_t[0].cpu().numpy()  # first image of the batch
        if not merges:
            counts = np.bincount(slot[slot < n_out], minlength=n_out)
            lost = (slot >= n_out) | (counts[np.minimum(slot, n_out - 1)] > 1)
            pruned |= lost[source]
        source = slot[source]
        groups = np.where(pruned | (source >= n_out), -1, source)
        out.append(groups[num_protected:].copy())
    return out


def token_map(model: torch.nn.Module, image: Any, *, blocks: Sequence[int] | None = None,
              image_size: int | tuple[int, ...] = 224,
              preprocess: Callable[[np.ndarray], torch.Tensor] | None = None, input_kwarg: str | None = None,
              **settings: Any) -> TokenMap:
    """Reduce `model` with `settings` (method and its options, or `plan=`) and map its tokens on `image`.

    Args:
        image: a path, PIL image or `[H, W, 3]` uint8 array; resized to `image_size`.
        blocks: the blocks to show (0-based, each must reduce); default: up to five of the reducing blocks,
            evenly spread, the last one included.
        preprocess: image array -> model input `[1, 3, H, W]`; default: ImageNet mean/std normalisation.
        input_kwarg: pass the input by this keyword (`"pixel_values"` for Hugging Face vision models); default:
            positional.
    """
    import tokenreduce

    img = load_image(image, image_size)
    x = (preprocess or imagenet_input)(img)
    args: tuple[Any, ...] = () if input_kwarg else (x,)
    kwargs = {input_kwarg: x} if input_kwarg else {}
    red = tokenreduce.compile(model, args if args else kwargs, inner="eager", count_model_flops=False,
                              dynamic_batch=False, **settings)
    report = red.report
    reducing = [b for b in report.blocks if b.tokens_out < b.tokens_in]
    if not reducing:
        raise TokenReduceError(f"{red.settings.method} with these settings reduces no token of this model (see its "
                               "report); there is nothing to map", setting="method")
    recorder = _SlotRecorder(red.graph_module)
    with torch.inference_mode():
        recorder.run(*args, *kwargs.values()) if not kwargs else _run_kwargs(recorder, red.graph_module, kwargs)
    merges = registry.encoder(red.settings.method).merges
    per_step = patch_groups(recorder.slots, report.num_protected, merges)
    if len(per_step) != len(reducing):
        raise TokenReduceError(f"found {len(per_step)} applied plans in the reduced graph but the report lists "
                               f"{len(reducing)} reducing blocks; cannot tell which map belongs to which block")
    n_patches = reducing[0].tokens_in - report.num_protected
    h, w = img.shape[:2]
    gh = round((n_patches * h / w) ** 0.5)
    gw = n_patches // gh if gh else 0
    if gh * gw != n_patches:
        raise TokenReduceError(f"{n_patches} patch tokens do not tile a {h}x{w} image; a token map needs a model "
                               "whose tokens after the protected ones are the image's patches in row-major order")
    # the count this image ran at (the plan's output slots): the report's for a fixed count, the input's own
    # for a data-dependent one (DyMU at batch 1, whose report gives the calibrated nominal count)
    by_block = {b.index: (b, g, n_out) for b, g, (_, n_out) in zip(reducing, per_step, recorder.slots)}
    chosen = list(blocks) if blocks is not None else _spread([b.index for b in reducing], 5)
    missing = [i for i in chosen if i not in by_block]
    if missing:
        raise TokenReduceError(f"block(s) {missing} do not reduce tokens with these settings; blocks that do: "
                               f"{sorted(by_block)}", setting="blocks")
    panels = [Panel(i, by_block[i][2], by_block[i][1].reshape(gh, gw)) for i in chosen]
    return TokenMap(img, (gh, gw), panels, report.num_protected, red.settings.method, report)


def _run_kwargs(recorder: _SlotRecorder, gm: fx.GraphModule, kwargs: dict[str, Any]) -> Any:
    """Run an export-unlifted graph whose inputs are keyword inputs (placeholders in the graph's order)."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    values = list(kwargs.values())
    if len(names) != len(values):
        raise TokenReduceError(f"the reduced graph takes {len(names)} inputs, got {len(values)} keyword inputs")
    return recorder.run(*values)


def _spread(items: list[int], k: int) -> list[int]:
    if len(items) <= k:
        return items
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]
