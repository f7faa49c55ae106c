"""All user-facing settings: the fields every method shares, plus the chosen method's own options.

The same names are used by `tokenreduce.compile(..., **settings)`, by
`torch.compile(backend="tokenreduce", options={...})`, by `tokenreduce.reduce_decoder` and by the command
line. A flat mapping (`method="tome", r=13, unmerge=True`) is split here: common fields stay on `Settings`,
the rest must be options of the chosen method (`methods/<name>.py`), and a name that does not apply to that
method is an error that lists what does.

Validation here covers what can be checked without a model (types, ranges, method names); no value is
coerced (`layers="12"` or `r=[1.7]` are errors, not `(1, 2)` or `(1,)`). Checks that need the model (r too
large for a block, layer out of range) happen when the method plans the model's blocks, with the model's
numbers in the message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenreduce.errors import TokenReduceError
from tokenreduce.methods import registry
from tokenreduce.methods.base import Method, Options, check_bool, check_choice, check_int

INNER_COMPILERS = ("inductor", "eager")
COMMON = ("method", "protected_tokens", "unmerge", "inner", "dynamic_batch")


@dataclass(frozen=True)
class Settings:
    """How to reduce tokens.

    Attributes:
        method: a registered method name (`tokenreduce.methods.registry.names()`): "tome", "evit", ... for
            encoders (`tokenreduce.compile`); "fastv", "pyramiddrop", "gemfilter" for decoder prefills
            (`tokenreduce.reduce_decoder`); "none" captures and compiles without reducing.
        options: the method's own options (`METHOD.options_type`), built from the flat names by `from_options`.
        protected_tokens: number of leading tokens never merged or pruned. None detects them from the
            graph (CLS, distillation and register tokens concatenated in front of the patches; the
            first token of a text model).
        unmerge: restore the original token count at the model outputs (each original position gets
            the value of the token it ended up in), so dense outputs and outside pooling keep their shape.
        inner: compiler that runs the rewritten graph: "inductor" (default) or "eager".
        dynamic_batch: capture with a symbolic batch dimension so one graph serves every batch size.
    """

    method: str = "tome"
    options: Options | None = None
    protected_tokens: int | None = None
    unmerge: bool = False
    inner: str = "inductor"
    dynamic_batch: bool = True

    def __post_init__(self) -> None:
        m = registry.get(self.method)
        if self.options is None:
            object.__setattr__(self, "options", m.options_type())
        elif not isinstance(self.options, m.options_type):
            raise TokenReduceError(f"options for method {self.method!r} must be {m.options_type.__name__}, got "
                                   f"{type(self.options).__name__}", setting="method")
        if self.protected_tokens is not None:
            check_int("protected_tokens", self.protected_tokens, lo=0)
            if m.placement == "denoiser":
                raise TokenReduceError(f"protected_tokens does not apply to {self.method!r}: a denoiser's tokens are "
                                       "all image patches on its grid; drop protected_tokens",
                                       setting="protected_tokens")
        check_bool("unmerge", self.unmerge)
        check_choice("inner", self.inner, INNER_COMPILERS)
        check_bool("dynamic_batch", self.dynamic_batch)
        m.check_common(self.opts, self.unmerge)

    @property
    def method_impl(self) -> Method:
        return registry.get(self.method)

    @property
    def opts(self) -> Options:
        """The method's options (never None after construction)."""
        assert self.options is not None
        return self.options

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, **kwargs: Any) -> Settings:
        """Build from a torch.compile `options` dict or keyword arguments (flat names); names that are
        neither common fields nor options of the chosen method are errors. `plan=` (a `Plan`, a plan file's
        path or a plan dict) supplies the method and its options; beside it only `plan.OVERRIDABLE` settings
        may be given."""
        merged = dict(options or {})
        merged.update(kwargs)
        if merged.get("plan") is not None:  # a tuned plan (methods/plan.py) fixes the method and its options
            from tokenreduce.methods.plan import merge_plan

            plan = merged.pop("plan")
            merged = merge_plan(plan, merged)
        merged.pop("plan", None)
        method = merged.pop("method", cls.method)
        m = registry.get(method)
        common = {k: merged.pop(k) for k in list(merged) if k in COMMON}
        unknown = sorted(k for k in merged if not any(k in other.options_type.names() for other in registry.METHODS.values()))
        if unknown:
            valid = sorted(set(COMMON) | set(m.options_type.names()))
            raise TokenReduceError(f"unknown setting(s) {', '.join(unknown)}; valid settings for method {method!r}: "
                                   f"{', '.join(valid)}", setting=unknown[0])
        return cls(method=method, options=m.options(merged, registry.METHODS), **common)

    def as_flat(self) -> dict[str, Any]:
        """The settings as the flat names users pass (common fields first)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        out.update(self.opts.as_dict())
        return out

