"""`tokenreduce visualize`: draw which patches of an image a reduced model merged or pruned, per block.

The picture (`tokenreduce.tuning.tokenmap`): the input image, then one panel per chosen block; each token's
patches in one colour (their mean colour), pruned patches grey, the token count in each panel's title. Works
for every encoder method (its flags, or `--plan FILE` from `tokenreduce tune`). Refuses: a setting that reduces
nothing, a model whose tokens are not an image's patches, an output that is not a .png file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tokenreduce.cli.args import SOURCES_HELP, add_common, add_model, add_settings, int_list, load_source
from tokenreduce.cli.methods import names, require_reduction, settings_from_args
from tokenreduce.cli.ui import EXIT_OK, UI
from tokenreduce.errors import TokenReduceError

EPILOG = f"""\
examples:
  tokenreduce visualize tokenreduce.tuning.samples:dinov2_small photo.jpg --method tome --r 8 -o map.png
  tokenreduce visualize timm:vit_small_patch16_224 photo.jpg --method evit --keep-ratio 0.5 -o evit.png
  tokenreduce visualize tokenreduce.tuning.samples:dinov2_small photo.jpg --plan plan.json --blocks 2,5,11 -o map.png

Each panel shows the image's patches after a block: the patches that make up one token share one colour
(their mean colour), pruned patches (dropped, or fused into EViT's summary token) are grey. The image is
resized to the model's input size and normalised with ImageNet mean/std.

{SOURCES_HELP}"""


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "visualize", formatter_class=fmt, epilog=EPILOG,
        help="draw the token map of an image: merged patches in one colour, pruned patches grey, per block",
        description="Reduce MODEL's tokens and draw, for chosen blocks, which patches of IMAGE\n"
                    "were merged into one token or pruned.")
    add_model(p, batch_list=False)
    p.add_argument("image", metavar="IMAGE", help="image file (any format Pillow reads)")
    add_settings(p, choices=names("encoder"), default="tome")
    g = p.add_argument_group("picture")
    g.add_argument("--plan", metavar="FILE", help="a plan file from `tokenreduce tune` instead of method flags")
    g.add_argument("--blocks", type=int_list, default=None, metavar="I[,I...]",
                   help="blocks to show (default: up to five of the reducing blocks, the last included)")
    g.add_argument("--columns", type=int, default=None, help="panels per row (default: up to 4)")
    g.add_argument("-o", "--output", required=True, metavar="OUT.png", help="PNG file to write")
    add_common(p)
    return p


def run(args: argparse.Namespace, ui: UI) -> int:
    import torch

    from tokenreduce.tuning.tokenmap import token_map

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise TokenReduceError(f"the token map is a PNG picture; give an output ending in .png, not {out.name}")
    if not Path(args.image).is_file():
        raise TokenReduceError(f"image {args.image} not found")
    if args.plan:
        opts = {"plan": args.plan}
        given = {k: v for k, v in settings_from_args(args, strict=False).items() if k != "method"}
        if given:
            raise TokenReduceError(f"--plan fixes the method and its options; drop {', '.join(sorted(given))}",
                                   setting=sorted(given)[0])
    else:
        require_reduction(args)
        opts = settings_from_args(args)
    opts.pop("dynamic_batch", None)
    with ui.steps(2, "loading model") as steps:
        with steps.stage(f"loading {args.model}"):
            src = load_source(args, 1)
        example = [*src.example_args, *src.example_kwargs.values()]
        image = next((t for t in example if isinstance(t, torch.Tensor) and t.dim() == 4), None)
        if image is None:
            raise TokenReduceError(f"{args.model} takes no image input ([B, 3, H, W]); a token map needs a vision "
                                   "model")
        kwarg = next((k for k, v in src.example_kwargs.items() if v is image), None)
        with steps.stage("reducing and mapping tokens"):
            tm = token_map(src.model, args.image, blocks=args.blocks, image_size=tuple(image.shape[-2:]),
                           input_kwarg=kwarg, **opts)
            tm.save(out, columns=args.columns)
    rows = [{"block": p.block, "tokens": p.tokens, "groups": int(len({g for g in p.groups.flatten() if g >= 0})),
             "pruned_patches": int((p.groups < 0).sum())} for p in tm.panels]
    if ui.json_mode:
        ui.emit_json({"command": "visualize", "model": src.description, "image": args.image, "output": str(out),
                      "settings": {k: v for k, v in opts.items()}, "grid": list(tm.grid), "panels": rows})
        return EXIT_OK
    ui.print(f"model: {src.description}; {tm.method}; {tm.grid[0]}x{tm.grid[1]} patches")
    for r in rows:
        ui.print(f"block {r['block']}: {r['tokens']} tokens; {r['groups']} patch groups, "
                 f"{r['pruned_patches']} pruned patches")
    ui.print(f"token map written to {out}")
    return EXIT_OK
