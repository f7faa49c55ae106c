"""Everything in the command line that depends on which reduction methods exist, in one table.

`--method` choices and help of every command, which command-line flags become which `tokenreduce.Settings`
fields (each flag's argparse dest *is* the Settings field name), the one-line label of a setting
("ToMe r=13 @ 3,6,9"), the per-method defaults `inspect` plans with, what `eval` sweeps per method, and
the refusal of a setting that would reduce nothing all come from the method registry
(`tokenreduce.methods.registry`): a new method needs nothing here.

Encoder methods (`placement="encoder"`) go through `tokenreduce.compile`; decoder methods
(`placement="decoder"`) prune the prefill of an `hf:` decoder folder through `tokenreduce.reduce_decoder`
(`cli/decoder.py`); `"baseline"` reduces nothing (`convert --method none` exports the unreduced model).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from tokenreduce.errors import TokenReduceError
from tokenreduce.methods import registry
from tokenreduce.methods.base import Method

# Settings fields every encoder method (and the `none` baseline) takes, besides its own options.
COMMON_SETTINGS = ("protected_tokens", "unmerge", "dynamic_batch")


def placement(method: Method) -> str:
    """How the command line treats a method: "encoder", "decoder", or "baseline" (the `none` method)."""
    return "baseline" if method.placement == "any" else method.placement


def settings_of(method: Method) -> tuple[str, ...]:
    """Every Settings field a command line passes for `method` (argparse dest == field name)."""
    own = tuple(method.options_type.names())
    return own if method.placement == "decoder" else (*own, *COMMON_SETTINGS)


METHODS: dict[str, Method] = dict(registry.METHODS)
SETTING_FLAGS = tuple(dict.fromkeys(f for m in METHODS.values() for f in settings_of(m)))  # every settings dest


def names(*placements: str) -> tuple[str, ...]:
    """Method names with one of `placements`, in registry order."""
    return tuple(n for n, m in METHODS.items() if placement(m) in placements)


DECODER_METHODS = names("decoder")
SWEEP_METHODS = tuple(n for n, m in METHODS.items() if m.sweep_option is not None)


def method_help(choices: tuple[str, ...], default: str | None) -> str:
    """--method help listing `choices`: encoder methods with their summary, then the decoder ones."""
    enc = [f"{n} ({METHODS[n].summary})" for n in choices if placement(METHODS[n]) != "decoder"]
    dec = [n for n in choices if placement(METHODS[n]) == "decoder"]
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
    nothing (the library's default applies); `overrides` replace option values. With `strict`, a flag given for a method that does not take it is an error (not ignored)."""
    name = method or args.method
    entry = METHODS[name]
    takes = settings_of(entry)
    if strict:
        for dest in SETTING_FLAGS:
            if dest not in takes and getattr(args, dest, None) is not None:
                own = ", ".join(takes) or "none"
                raise TokenReduceError(f"setting {dest} does not apply to method {name!r}; its settings are: {own}",
                                       setting=dest)
    opts: dict[str, Any] = {"method": name} if entry.placement != "decoder" else {}
    for dest in takes:
        value = overrides[dest] if dest in overrides else getattr(args, dest, None)
        if value is not None:
            opts[dest] = value
    return opts


def setting_name(opts: Mapping[str, Any]) -> str:
    """One-line label of a setting: `ToMe r=13 @ 3,6,9`, `EViT keep 0.7`, `no reduction`."""
    entry = METHODS[opts["method"]]
    name = entry.label(opts)
    if entry.placement == "encoder" and opts.get("layers") is not None:
        name += f" @ {','.join(map(str, opts['layers']))}"
    return name


def require_reduction(args: argparse.Namespace) -> None:
    """convert/bench: a setting that reduces nothing (ToMe without r, EViT keeping everything) is refused
    rather than run as a silent no-op."""
    entry = METHODS[args.method]
    why = entry.identity_reason({k: v for k, v in settings_from_args(args, strict=False).items() if k != "method"})
    if why is not None:
        key = entry.sweep_option
        raise TokenReduceError(f"--method {args.method}: {why}"
                               + ("; `tokenreduce inspect MODEL` shows the largest valid r" if key == "r" else ""),
                               setting=key)


def inspect_methods(args: argparse.Namespace, kind: str) -> list[str]:
    """The methods `inspect` plans: `--method`, else every method of the model's kind."""
    if args.method:
        return [args.method]
    return list(names(kind))


def inspect_setting(method: str, args: argparse.Namespace, analysis: Any) -> tuple[dict[str, Any], str, bool]:
    """What `inspect` plans for an encoder `method`: (settings, note on the defaults it chose, whether the
    user asked for this setting explicitly, in which case an impossible setting is an error). Without
    --method every encoder method is shown, each with the flags that apply to it; values the user did not
    give come from the method (`Method.inspect_values`: ToMe r=13 capped at the model's largest r, EViT's
    default layers)."""
    strict = args.method is not None
    entry = METHODS[method]
    given = settings_from_args(args, method, strict=strict)
    chosen, note = entry.inspect_values(analysis, given)
    defaults = {k: v for k, v in chosen.items() if k not in given}
    explicit = args.method == method or any(k in given for k in chosen)
    return {**given, **defaults}, (note if defaults else ""), explicit
