"""The `diffusers:FOLDER` model source: a diffusion denoiser saved by diffusers, with example inputs.

`tokenreduce.sources` turns a MODEL string into a model plus example inputs for the command line; this file
holds the diffusers half of it (`sources.py` dispatches here), so that `convert`/`inspect`/`bench` can reduce
a denoiser with `--method tomesd` (issue #14). FOLDER is either a model folder (`model.save_pretrained`: a
`config.json` whose `_class_name` names the class, weights optional) or a whole pipeline folder
(`pipe.save_pretrained`: `model_index.json`), whose `unet` or `transformer` component is loaded.

The example inputs are one denoiser call, built from the config: the latent `[B, in_channels, S, S]` (S from
`--image-size`, default the config's `sample_size`), an integer timestep per row, and what the config says the
model conditions on: text states `[B, L, cross_attention_dim]` (`L` from `--seq-len`, default 77, CLIP's
length), class labels, SDXL's `text_embeds`/`time_ids`, PixArt's resolution/aspect ratio, SD3's pooled text
projection (text `L` default 333: 77 CLIP + 256 T5 tokens). A `FluxTransformer2DModel` takes what FluxPipeline
feeds it: the latent packed 2 x 2 into `[B, (S / 2)^2, in_channels]` tokens (S default 64), position ids,
512 T5 tokens, pooled CLIP, a timestep in [0, 1] and the guidance scale when the config embeds it.

Refused, each with a message naming what to do instead: a folder that is not a diffusers model or pipeline, a
denoiser class other than `UNet2DConditionModel`, `DiTTransformer2DModel`, `PixArtTransformer2DModel`,
`SD3Transformer2DModel` and `FluxTransformer2DModel` (the ones `method="tomesd"` is tested on), a UNet whose
conditioning inputs this file cannot build (image embeddings, timestep class embeddings, ...), and a latent
size the model's patches or down-sampling (Flux: its 2 x 2 packing) do not divide. Nothing is downloaded:
loading is offline, from the folder only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tokenreduce.errors import TokenReduceError

DENOISERS = ("UNet2DConditionModel", "DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
             "FluxTransformer2DModel")
PIPELINE_COMPONENTS = ("unet", "transformer")  # where a pipeline keeps its denoiser
DEFAULT_TEXT_LEN = 77  # CLIP's context length, what SD 1.x/2.x/XL pipelines feed the UNet
# what the pipelines feed the joint-attention transformers: SD3 77 CLIP + 256 T5 tokens, Flux(-dev) 512 T5 tokens
JOINT_TEXT_LEN = {"SD3Transformer2DModel": 77 + 256, "FluxTransformer2DModel": 512}
DEFAULT_TIMESTEP = 500
FLUX_TIMESTEP = 0.5  # Flux takes sigma-like timesteps in [0, 1] (it multiplies by 1000 itself)
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, an input of guidance-distilled checkpoints
FLUX_DEFAULT_LATENT = 64  # Flux has no sample_size: 64 x 64 latent pixels (512 px), packed 2 x 2 into 32 x 32 tokens
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")

InputsFn = Callable[[int], tuple[tuple[Any, ...], dict[str, Any]]]


def is_diffusers_folder(path: Path) -> bool:
    """A pipeline folder, or a model folder whose config.json names a diffusers class (`_class_name`)."""
    if (path / "model_index.json").is_file():
        return True
    try:
        return "_class_name" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def model_folder(path_str: str) -> tuple[Path, str]:
    """The denoiser's folder and its class name; a pipeline folder resolves to its unet/transformer."""
    if not path_str:
        raise TokenReduceError("diffusers: needs a local folder, e.g. diffusers:./sd-unet or diffusers:./pipeline")
    path = Path(path_str).expanduser()
    if not path.is_dir():
        raise TokenReduceError(f"no such directory: {path_str} (diffusers: takes a folder written by a diffusers "
                               "model's or pipeline's save_pretrained)")
    index = path / "model_index.json"
    if index.is_file():
        try:
            components = json.loads(index.read_text())
        except ValueError as exc:
            raise TokenReduceError(f"could not read {index}: {exc}") from exc
        found = [c for c in PIPELINE_COMPONENTS if c in components and (path / c).is_dir()]
        if not found:
            names = ", ".join(k for k in components if not k.startswith("_")) or "none"
            raise TokenReduceError(f"{path_str} is a {components.get('_class_name', 'diffusers')} pipeline folder "
                                   f"without a unet/ or transformer/ denoiser (components: {names})")
        path = path / found[0]
    cfg_file = path / "config.json"
    try:
        config = json.loads(cfg_file.read_text())
    except OSError:
        raise TokenReduceError(f"{path} is not a diffusers model folder (no config.json or model_index.json in "
                               "it); write one with model.save_pretrained(folder)") from None
    except ValueError as exc:
        raise TokenReduceError(f"could not read {cfg_file}: {exc}") from exc
    name = config.get("_class_name") if isinstance(config, dict) else None
    if not name:
        hint = "; for a Hugging Face transformers folder use hf:" if "architectures" in config else ""
        raise TokenReduceError(f"{path} is not a diffusers model folder: its config.json has no _class_name{hint}")
    if name not in DENOISERS:
        raise TokenReduceError(
            f"{path} holds a {name}; the diffusers: source loads the denoisers {', '.join(DENOISERS)}"
            "; for another model, write a module:function source that returns it and its inputs")
    return path, str(name)


def _size(value: Any) -> int:
    return int(value[0] if isinstance(value, (tuple, list)) else value)


def _unet_conditioning(cfg: Any, where: Path) -> tuple[int, int | None, tuple[int, int] | None]:
    """(text state width, number of classes or None, SDXL (text_embeds width, time_ids width) or None)."""
    def refuse(what: str) -> TokenReduceError:
        return TokenReduceError(f"{where}: a UNet2DConditionModel with {what} needs inputs the diffusers: source "
                                "does not build; use a module:function source that returns the UNet and its inputs")

    if cfg.encoder_hid_dim_type not in (None, "text_proj"):
        raise refuse(f"encoder_hid_dim_type={cfg.encoder_hid_dim_type!r}")
    if cfg.class_embed_type is not None:
        raise refuse(f"class_embed_type={cfg.class_embed_type!r}")
    if cfg.addition_embed_type not in (None, "text_time"):
        raise refuse(f"addition_embed_type={cfg.addition_embed_type!r}")
    width = cfg.encoder_hid_dim if cfg.encoder_hid_dim_type == "text_proj" else _size(cfg.cross_attention_dim)
    sdxl = None
    if cfg.addition_embed_type == "text_time":
        time_ids = 6  # SDXL: original size, crop corner, target size
        sdxl = (int(cfg.projection_class_embeddings_input_dim) - time_ids * int(cfg.addition_time_embed_dim), time_ids)
    return int(width), cfg.num_class_embeds, sdxl


def _flux_inputs(cfg: Any, image_size: int | None, seq_len: int | None, seed: int, where: Path) -> InputsFn:
    """One FluxTransformer2DModel call as FluxPipeline makes it: the latent `[B, C, S, S]` packed 2 x 2 into
    `[B, (S / 2)^2, in_channels]` tokens (row-major), position ids `(0, row, column)` per image token and zeros
    per text token, T5 states `[B, L, joint_attention_dim]`, pooled CLIP `[B, pooled_projection_dim]`, a timestep
    in [0, 1] and, for guidance-distilled configs, the guidance scale."""
    size = image_size or FLUX_DEFAULT_LATENT
    if size % 2:
        raise TokenReduceError(f"--image-size {size} (the latent's height and width) must be even: Flux packs 2 x 2 "
                               f"latent pixels into one token ({where})", setting="image_size",
                               hint=f"image_size={size + 1}")
    side = size // 2
    text_len = seq_len or JOINT_TEXT_LEN["FluxTransformer2DModel"]
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]

    def make(b: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        g = torch.Generator().manual_seed(seed + 1)
        kw: dict[str, Any] = {
            "encoder_hidden_states": torch.randn(b, text_len, int(cfg.joint_attention_dim), generator=g),
            "pooled_projections": torch.randn(b, int(cfg.pooled_projection_dim), generator=g),
            "timestep": torch.full((b,), FLUX_TIMESTEP), "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(text_len, 3)}
        if cfg.guidance_embeds:
            kw["guidance"] = torch.full((b,), FLUX_GUIDANCE)
        return (torch.randn(b, side * side, int(cfg.in_channels), generator=g),), kw

    return make


def load_diffusers(path_str: str, *, image_size: int | None, seq_len: int | None,
                   seed: int) -> tuple[torch.nn.Module, InputsFn, str]:
    """(denoiser in eval mode, inputs at a batch size, description) for `diffusers:FOLDER`."""
    path, name = model_folder(path_str)
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the network
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import diffusers
    except ImportError as exc:
        raise TokenReduceError("diffusers: sources need the `diffusers` package (pip install -e '.[diffusion]')") \
            from exc
    cls = getattr(diffusers, name)
    torch.manual_seed(seed)
    has_weights = any((path / f).is_file() for f in WEIGHT_FILES)
    try:
        if has_weights:
            model = cls.from_pretrained(str(path), local_files_only=True)
            weights = f"weights from {path}"
        else:
            model = cls.from_config(cls.load_config(str(path)))
            weights = "random init: no weights in the folder"
    except Exception as exc:  # noqa: BLE001 - any loading failure is the folder not matching its class
        text = " ".join(str(exc).split())
        raise TokenReduceError(f"diffusers could not load {path} as a {name}: {text[:300]}") from exc
    model.eval()
    cfg = model.config
    if name == "FluxTransformer2DModel":
        return model, _flux_inputs(cfg, image_size, seq_len, seed, path), f"diffusers:{path_str} ({name}, {weights})"
    size = image_size or _size(cfg.sample_size)
    factor = int(cfg.patch_size) if name != "UNet2DConditionModel" else 2 ** (len(cfg.block_out_channels) - 1)
    if size % factor:
        what = "patch size" if name != "UNet2DConditionModel" else "down-sampling factor"
        raise TokenReduceError(f"--image-size {size} (the latent's height and width) is not a multiple of the "
                               f"{name}'s {what} {factor}", setting="image_size", hint=f"image_size={factor * 8}")
    channels = int(cfg.in_channels)
    text_len = seq_len or JOINT_TEXT_LEN.get(name, DEFAULT_TEXT_LEN)
    pooled = int(cfg.pooled_projection_dim) if name == "SD3Transformer2DModel" else 0
    if name == "UNet2DConditionModel":
        width, classes, sdxl = _unet_conditioning(cfg, path)
    elif name == "PixArtTransformer2DModel":
        width, classes, sdxl = int(cfg.caption_channels), None, None
    elif name == "SD3Transformer2DModel":
        width, classes, sdxl = int(cfg.joint_attention_dim), None, None
    else:
        width, classes, sdxl = 0, int(cfg.num_embeds_ada_norm), None
    pixart_sizes = name == "PixArtTransformer2DModel" and bool(model.use_additional_conditions)

    def make(b: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        g = torch.Generator().manual_seed(seed + 1)
        latent = torch.randn(b, channels, size, size, generator=g)
        kw: dict[str, Any] = {"timestep": torch.full((b,), DEFAULT_TIMESTEP, dtype=torch.long)}
        if width:
            kw["encoder_hidden_states"] = torch.randn(b, text_len, width, generator=g)
        if pooled:
            kw["pooled_projections"] = torch.randn(b, pooled, generator=g)
        if classes:
            kw["class_labels"] = torch.randint(0, classes, (b,), generator=g)
        if sdxl is not None:
            pixels = float(size * 8)  # the VAE's 8x: image size, no crop, target size
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(b, sdxl[0], generator=g),
                                       "time_ids": torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]] * b)}
        if pixart_sizes:
            kw["added_cond_kwargs"] = {"resolution": torch.full((b, 2), float(size * 8)),
                                       "aspect_ratio": torch.ones(b, 1)}
        return (latent,), kw

    return model, make, f"diffusers:{path_str} ({name}, {weights})"
