"""Argument builders and value parsers shared by the commands, and loading MODEL from them.

Each option that is a `tokenreduce.Settings` field uses the field's name as its argparse dest
(`--keep-ratio` -> `keep_ratio`, `--no-fuse` -> `fuse`, `--static-batch` -> `dynamic_batch`), so settings
are read from the parsed arguments by name (`cli/methods.py`) and an error naming a setting finds its
flag in the parser (`cli/ui.py`). Parsers refuse a bad number at parse time with the expected range.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tokenreduce.cli.methods import COMMON_SETTINGS, METHODS, SETTING_FLAGS, method_help
from tokenreduce.methods.base import field_kind

if TYPE_CHECKING:
    from tokenreduce.sources import ModelSource

SOURCES_HELP = """\
MODEL is one of:
  timm:NAME          timm.create_model(NAME), random init unless --checkpoint FILE; --model-arg K=V
                     passes keyword arguments (e.g. img_size=64, depth=4)
  hf:PATH            a local Hugging Face folder, offline, loaded with AutoModel; inputs from the config
                     (pixel_values [B,3,S,S] for vision, input_ids/attention_mask [B,L] for text).
                     A *ForCausalLM or LLaVA-style folder is a decoder: --method fastv|pyramiddrop|
                     gemfilter prunes its prefill; --prompt/--span choose the prompt and droppable span
  diffusers:FOLDER   a diffusion denoiser saved by diffusers, offline: a UNet2DConditionModel,
                     DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel or
                     FluxTransformer2DModel folder, or a pipeline folder (its unet/ or transformer/); inputs
                     for one denoiser call: latent [B,C,S,S] (--image-size S, latent pixels; Flux: packed
                     [B,(S/2)^2,4C]), timestep, text states [B,L,D] (--seq-len L; default 77, SD3 333, Flux
                     512) or class labels as the config needs. Reduce with --method tomesd (Flux: give its
                     packed grid as --grid-h/--grid-w)
  FILE.pt2           a program saved with torch.export.save; inputs from its input shapes. A file
                     holding pickled objects or code (which loading would run) is refused unless
                     --trust-pickle
  module:function    a Python function returning (model, example_inputs), inputs a tuple or a dict;
                     --model-arg K=V are passed to it, and --batch/--image-size/--seq-len if it takes them

Code runs from: module:function (it imports and calls your Python code) and a .pt2 file loaded with
--trust-pickle. Use both only with files you trust.
"""


# ============================================================================================ value parsers
def number(parse: type, ok: Callable[[float], bool], what: str) -> Callable[[str], Any]:
    """argparse `type=` for one number checked by `ok`; the message says what was expected."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return convert


positive_int = number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = number(int, lambda v: v >= 0, "an integer >= 0")
ratio = number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
non_negative_float = number(float, lambda v: v >= 0.0, "a number >= 0")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def positive_int_list(text: str) -> list[int]:
    values = int_list(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def numbers_or_path(text: str) -> list[float] | str:
    """Comma-separated numbers (`inf` allowed), or else a file path (the method reads and checks it)."""
    try:
        return float_list(text)
    except argparse.ArgumentTypeError:
        return text


def r_value(text: str) -> int | list[int]:
    values = int_list(text)
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"r must be >= 0, got {text!r}")
    return values[0] if len(values) == 1 and "," not in text else values


def profile(text: str) -> tuple[int, int, int]:
    values = positive_int_list(text)
    if len(values) != 3 or not values[0] <= values[1] <= values[2]:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX with MIN <= OPT <= MAX, got {text!r}")
    return values[0], values[1], values[2]


def targets(text: str) -> list[str]:
    from tokenreduce.bench import TARGETS

    values = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in values if t not in TARGETS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"unknown target {', '.join(bad) or text!r}; choose from {', '.join(TARGETS)}")
    return values


# ============================================================================================ option groups
def add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true",
                   help="print one JSON document on stdout (nothing else goes to stdout) for scripts")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (they only show on a terminal)")
    g.add_argument("--debug", action="store_true", help="show tracebacks, library warnings and compiler logs")


def add_model(p: argparse.ArgumentParser, *, batch_list: bool, onnx_ok: bool = False) -> None:
    p.add_argument("model", metavar="MODEL" if not onnx_ok else "MODEL|FILE.onnx",
                   help="timm:NAME, hf:PATH, diffusers:FOLDER, FILE.pt2 or module:function" + (", or an .onnx file" if onnx_ok else ""))
    g = p.add_argument_group("model and inputs")
    g.add_argument("--checkpoint", metavar="FILE", help="timm: load these weights (local file) instead of random init")
    g.add_argument("--model-arg", metavar="KEY=VALUE", action="append", default=[],
                   help="keyword argument for timm.create_model or the module:function (repeatable), "
                        "e.g. --model-arg img_size=64")
    g.add_argument("--trust-pickle", action="store_true",
                   help="FILE.pt2: load it even when it holds pickled objects or code, which loading runs (only "
                        "for files you trust; without it such files are refused before anything is loaded)")
    if batch_list:
        g.add_argument("--batch", type=positive_int_list, default=[1, 8], metavar="B[,B...]",
                       help="batch sizes to measure (default: 1,8; a module:function's inputs are tiled to size)")
    else:
        g.add_argument("--batch", type=positive_int, default=None, metavar="B",
                       help="batch size of the example inputs (default: 1 for inspect, 2 for convert, or what "
                            "a module:function returns)")
    g.add_argument("--image-size", type=positive_int, metavar="S",
                   help="vision models: input height and width (default: the model's configured size; timm "
                        "models are built with img_size=S); diffusers denoisers: latent height and width")
    g.add_argument("--seq-len", type=positive_int, metavar="L",
                   help="text models: sequence length (default: 128; decoder LLMs: 512); diffusers denoisers: "
                        "text-state tokens (default: 77)")
    g.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs (default: 0)")
    g.add_argument("--prompt", metavar="TEXT|@FILE",
                   help="decoder LLMs/VLMs: the prompt, tokenized with the folder's tokenizer (default: random "
                        "token ids of --seq-len tokens)")
    g.add_argument("--span", metavar="START:END",
                   help="decoder LLMs/VLMs: token range the method may drop, Python slice rules (e.g. 16:-32; "
                        "default: all but 16 tokens at each end; VLMs: the image tokens)")


# Parsers for options whose values need more than their type (lists, ranges); every other option's flag
# parses by the type of its options field (`methods.base.field_kind`).
OPTION_PARSERS: dict[str, Callable[[str], Any]] = {
    "r": r_value, "layers": int_list, "keep_ratio": ratio, "keep_tokens": positive_int, "score_pool": positive_int,
    "thresholds": numbers_or_path, "mean_r": float_list,
}
KIND_PARSERS: dict[type, Callable[[str], Any]] = {int: int, float: float, str: str, tuple: int_list}
OPTION_METAVARS = {"r": "R[,R...]", "layers": "I[,I...]", "keep_ratio": "K", "keep_tokens": "K",
                   "thresholds": "T[,T...]|FILE", "mean_r": "M[,M...]", "llm_layers": "K[,K...]",
                   "llm_keep_ratio": "K", "prune_layers": "I[,I...]", "prune_keep": "N[,N...]"}


def option_help(name: str) -> str:
    """A flag's help from the options fields of every method that takes it ("tome: ...; evit: ...")."""
    texts: dict[str, list[str]] = {}
    for m in METHODS.values():
        for f in dataclasses.fields(m.options_type):
            if f.name == name:
                default = "" if f.default is None else f" (default: {f.default})"
                texts.setdefault(f"{f.metadata['help']}{default}", []).append(m.name)
    return "; ".join(f"{'/'.join(users)}: {text}" for text, users in texts.items())


def add_settings(p: argparse.ArgumentParser, *, choices: tuple[str, ...], default: str | None,
                 method_text: str | None = None, r_text: str | None = None) -> None:
    """The reduction settings: `--method`, one flag per option of any registered method (from its options
    dataclass: name, type, help, default), and the common settings. Each dest is the `tokenreduce.Settings`
    field it sets, and each default is None: a flag the user did not give passes nothing (`cli/methods.py`),
    so the library default applies and a flag given for a method that does not take it can be refused."""
    g = p.add_argument_group("reduction settings (tokenreduce.Settings; each method's options)")
    g.add_argument("--method", choices=choices, default=default, help=method_text or method_help(choices, default))
    for name in SETTING_FLAGS:
        if name in COMMON_SETTINGS:
            continue
        owner = next(m for m in METHODS.values() if name in m.options_type.names())
        fld = next(f for f in dataclasses.fields(owner.options_type) if f.name == name)
        kind = field_kind(owner.options_type, name)
        flag = "--" + name.replace("_", "-")
        text = r_text if name == "r" and r_text else option_help(name)
        if kind is bool:
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parse = OPTION_PARSERS[name] if name in OPTION_PARSERS else KIND_PARSERS[kind]
            g.add_argument(flag, dest=name, type=parse, default=None,
                           choices=fld.metadata.get("choices"), metavar=OPTION_METAVARS.get(name), help=text)
    g.add_argument("--protected-tokens", type=non_negative_int, default=None, metavar="N",
                   help="leading tokens never reduced (default: detected: CLS/distillation/registers)")
    g.add_argument("--unmerge", action="store_true", default=None,
                   help="restore the original token count at the outputs")
    g.add_argument("--static-batch", dest="dynamic_batch", action="store_false", default=None,
                   help="capture for the exact example batch size (default: one graph for every batch size)")


def encoder_and_decoder_choices(*, baseline: bool) -> tuple[str, ...]:
    """--method choices of convert (with the `none` baseline) and inspect/bench (without)."""
    return tuple(n for n, m in METHODS.items() if baseline or m.placement != "baseline")


# ============================================================================================ loading
def load_source(args: argparse.Namespace, batch: int | None, default_batch: int = 1) -> ModelSource:
    """Load MODEL; without --batch, generated inputs (timm/hf/.pt2) get `default_batch` rows and a
    module:function keeps the batch it returns."""
    from tokenreduce.sources import load_model, parse_model_args, source_kind

    if batch is None and source_kind(args.model) != "function":
        batch = default_batch
    return load_model(args.model, batch=batch, image_size=args.image_size, seq_len=args.seq_len,
                      checkpoint=args.checkpoint, model_args=parse_model_args(args.model_arg), seed=args.seed,
                      trust_pickle=args.trust_pickle)
