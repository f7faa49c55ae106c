"""Everything in the command line that depends on which reduction methods exist, in one table.

`--method` choices and help of every command, which command-line flags become which `tokenreduce.Settings`
fields (each flag's argparse dest *is* the Settings field name), the one-line label of a setting
("ToMe r=13 @ 3,6,9"), the per-method defaults `inspect` plans with, what `eval` sweeps per method, and
the refusal of a setting that would reduce nothing all read `METHODS`. A new method is one entry here
until the method registry in `tokenreduce.methods` feeds this module instead.

Encoder methods (`placement="encoder"`) go through `tokenreduce.compile`; decoder methods
(`placement="decoder"`) prune the prefill of an `hf:` decoder folder through `tokenreduce.reduce_decoder`
(`cli/decoder.py`); `"baseline"` reduces nothing (`convert --method none` exports the unreduced model).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenreduce.errors import TokenReduceError

DEFAULT_KEEP_RATIO = 0.7  # EViT paper's setting (the library's default before its method registry was 1.0)
INSPECT_DEFAULT_R = 13  # ToMe paper's ViT-B/16 setting; inspect caps it at the model's largest valid r

# Settings fields every encoder method (and the `none` baseline) takes, besides its own options.
COMMON_SETTINGS = ("protected_tokens", "unmerge", "dynamic_batch")


def _label_tome(opts: Mapping[str, Any]) -> str:
    r = opts.get("r", 0)
    name = f"ToMe r={','.join(map(str, r)) if isinstance(r, (list, tuple)) else r}"
    return name + (" (decreasing)" if opts.get("r_schedule") == "decreasing" else "")


def _label_evit(opts: Mapping[str, Any]) -> str:
    return f"EViT keep {opts['keep_ratio']:g}"


@dataclass(frozen=True)
class CliMethod:
    """One method as the command line sees it."""

    name: str
    placement: str  # "encoder" | "decoder" | "baseline"
    summary: str  # a few words for --method help
    options: tuple[str, ...]  # the method's own Settings fields (argparse dest == field name)
    label: Callable[[Mapping[str, Any]], str] | None = None  # "ToMe r=13"; None: the method's name
    inspect_default: bool = False  # shown by `inspect MODEL` without --method
    sweep: str | None = None  # the Settings field `eval` sweeps for it (one setting per value)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # command-line defaults unlike the library's

    @property
    def settings(self) -> tuple[str, ...]:
        """Every Settings field a command line passes for this method."""
        return (*self.options, *COMMON_SETTINGS) if self.placement != "decoder" else self.options


METHODS: dict[str, CliMethod] = {m.name: m for m in (
    CliMethod("tome", "encoder", "merge", ("r", "r_schedule", "layers", "prop_attn", "clamp_r"), _label_tome,
              inspect_default=True, sweep="r"),
    CliMethod("evit", "encoder", "keep top-k by CLS attention", ("keep_ratio", "layers", "fuse", "prop_attn"),
              _label_evit, inspect_default=True, sweep="keep_ratio", defaults={"keep_ratio": DEFAULT_KEEP_RATIO}),
    CliMethod("none", "baseline", "no reduction", (), lambda opts: "no reduction"),
    CliMethod("fastv", "decoder", "prune at one layer", ("layers", "keep_ratio")),
    CliMethod("pyramiddrop", "decoder", "prune in stages", ("layers", "keep_ratio")),
    CliMethod("gemfilter", "decoder", "select with an early layer", ("layers", "keep_tokens")),
)}
SETTING_FLAGS = tuple(dict.fromkeys(f for m in METHODS.values() for f in m.settings))  # every settings dest


def names(*placements: str) -> tuple[str, ...]:
    """Method names with one of `placements`, in table order."""
    return tuple(m.name for m in METHODS.values() if m.placement in placements)


DECODER_METHODS = names("decoder")
SWEEP_METHODS = tuple(m.name for m in METHODS.values() if m.sweep is not None)


def method_help(choices: tuple[str, ...], default: str | None) -> str:
    """--method help listing `choices`: encoder methods with their summary, then the decoder ones."""
    enc = [f"{METHODS[n].name} ({METHODS[n].summary})" for n in choices if METHODS[n].placement != "decoder"]
    dec = [n for n in choices if METHODS[n].placement == "decoder"]
    text = ", ".join(enc)
    if default is not None:
        text += f" (default: {default})"
    if dec:
        text += f"; decoder LLMs/VLMs: {', '.join(dec[:-1])} or {dec[-1]}" if len(dec) > 1 else f"; decoder: {dec[0]}"
    return text


def settings_from_args(args: argparse.Namespace, method: str | None = None, *, strict: bool = True,
                       **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `tokenreduce.Settings` (encoders, with `method`) or `reduce_decoder` (decoders)
    from the command-line options of `method` (default: `--method`). A flag the user left unset passes
    nothing unless the command line has its own default for the method (`CliMethod.defaults`); `overrides`
    replace option values. With `strict`, a flag given for a method that does not take it is an error (not ignored)."""
    name = method or args.method
    entry = METHODS[name]
    if strict:
        for dest in SETTING_FLAGS:
            if dest not in entry.settings and getattr(args, dest, None) is not None:
                own = ", ".join(entry.settings) or "none"
                raise TokenReduceError(f"setting {dest} does not apply to method {name!r}; its settings are: {own}",
                                       setting=dest)
    opts: dict[str, Any] = {"method": name} if entry.placement != "decoder" else {}
    for dest in entry.settings:
        value = overrides[dest] if dest in overrides else getattr(args, dest, None)
        if value is None:
            value = entry.defaults.get(dest)
        if value is not None:
            opts[dest] = value
    return opts


def setting_name(opts: Mapping[str, Any]) -> str:
    """One-line label of a setting: `ToMe r=13 @ 3,6,9`, `EViT keep 0.7`, `no reduction`."""
    entry = METHODS[opts["method"]]
    if entry.label is None:
        return entry.name
    name = entry.label(opts)
    if entry.placement == "encoder" and opts.get("layers") is not None:
        name += f" @ {','.join(map(str, opts['layers']))}"
    return name


def require_reduction(args: argparse.Namespace) -> None:
    """convert/bench: a ToMe run without r, or an EViT keeping everything, would silently do nothing."""
    if args.method == "tome" and (args.r is None or args.r == 0 or (isinstance(args.r, list) and not any(args.r))):
        raise TokenReduceError("--method tome needs --r N (merges per block), e.g. --r 13; "
                               "`tokenreduce inspect MODEL` shows the largest valid r")
    if args.method == "evit" and args.keep_ratio is not None and args.keep_ratio >= 1.0:
        raise TokenReduceError("--keep-ratio 1 keeps every token; EViT needs a ratio below 1, e.g. --keep-ratio 0.7")


def inspect_methods(args: argparse.Namespace, placement: str) -> list[str]:
    """The methods `inspect` plans: `--method`, else every default one of the model's kind."""
    if args.method:
        return [args.method]
    if placement == "decoder":
        return list(DECODER_METHODS)
    return [m.name for m in METHODS.values() if m.inspect_default]


def inspect_setting(method: str, args: argparse.Namespace, num_blocks: int, largest_r: int
                    ) -> tuple[dict[str, Any], str, bool]:
    """What `inspect` plans for an encoder `method`: (settings, note on the defaults it chose, whether the
    user asked for this setting explicitly, in which case an impossible setting is an error). Without
    --method every default method is shown, each with the flags that apply to it."""
    strict = args.method is not None
    if method == "tome":
        r = args.r if args.r is not None else min(INSPECT_DEFAULT_R, largest_r)
        note = "" if args.r is not None else (
            f"default r={INSPECT_DEFAULT_R}" if r == INSPECT_DEFAULT_R
            else f"default r={INSPECT_DEFAULT_R} capped at the largest valid constant r")
        return (settings_from_args(args, method, strict=strict, r=r), note,
                args.method == method or args.r is not None)
    if method == "evit":
        from tokenreduce.methods import evit

        layers = args.layers if args.layers is not None else evit.default_layers(num_blocks)
        note = "" if args.layers is not None else "default layers (depth x 1/4, 2/4, 3/4)"
        return settings_from_args(args, method, strict=strict, layers=layers), note, args.method == method
    return settings_from_args(args, method, strict=strict), "", args.method == method
