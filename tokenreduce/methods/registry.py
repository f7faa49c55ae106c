"""The registered methods, by name. Adding a method: its file in `methods/` and its name in `_MODULES`.

Everything that depends on the set of methods reads it from here: `Settings` (valid names, each method's
options), the command line (`--method` choices, per-method flags), `inspect`'s table, report text and the
ONNX inlining map.
"""

from __future__ import annotations

import importlib

from tokenreduce.errors import TokenReduceError
from tokenreduce.methods.base import DecoderMethod, EncoderMethod, Method, Placement

_MODULES = ("none", "tome", "evit", "pitome", "zero_tprune", "token_transforming", "dymu", "tempscale", "fastv", "pyramiddrop", "gemfilter", "divprune", "dart", "visionzip", "sparsevlm", "visiondrop", "tomesd", "hiprune", "flowcut", "globalcom2")

METHODS: dict[str, Method] = {}
for _name in _MODULES:
    _method = importlib.import_module(f"tokenreduce.methods.{_name}").METHOD
    METHODS[_method.name] = _method


def names(placement: Placement | None = None) -> list[str]:
    """Method names, optionally only those that apply at `placement` ("any" methods apply everywhere)."""
    return [n for n, m in METHODS.items() if placement is None or m.placement in (placement, "any")]


def get(name: str) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise TokenReduceError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}", setting="method")
    return METHODS[name]


def encoder(name: str) -> EncoderMethod:
    """The encoder method `name`, or an error that says where a decoder method goes."""
    m = get(name)
    if not isinstance(m, EncoderMethod):
        raise TokenReduceError(f"{name} prunes the prefill of a decoder LLM/VLM; use "
                               f"tokenreduce.reduce_decoder(model, method={name!r}, ...) instead", setting="method")
    return m


def decoder(name: str) -> DecoderMethod:
    """The decoder method `name` (or the `none` baseline), or an error that says where an encoder method goes."""
    m = get(name)
    if not isinstance(m, DecoderMethod):
        raise TokenReduceError(f"unknown decoder method {name!r}; choose one of {', '.join(names('decoder'))} "
                               "(encoder methods go through tokenreduce.compile)", setting="method")
    return m
