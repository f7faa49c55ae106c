"""The method interface: what one token-reduction method is, in one place.

A method is one file in `methods/` that defines a `Method` subclass instance named `METHOD`:

* `name` -- what users type (`method="tome"`), `summary` -- one line for `--help` and `inspect`;
* `placement` -- where it applies: `"encoder"` (inside a bidirectional block, between the attention residual
  and the MLP: `tokenreduce.compile`), `"decoder"` (the prefill span of a causal LLM/VLM:
  `tokenreduce.reduce_decoder`), `"denoiser"` (inside a diffusion denoiser's transformer block: merge before a
  sublayer, unmerge before its residual add, so the token grid between blocks stays whole: tomesd), or `"any"`
  (the `none` baseline);
* `options_type` -- a frozen `Options` dataclass of the method's own settings: defaults, documented fields
  (`metadata["help"]`), and `validate()` with messages that name the valid range. Settings holds the common
  fields plus one `Options` instance; the CLI makes one flag per field;
* its plan for the model's blocks -- `plan_blocks` (encoder: one `BlockPlan` per block, with the constant
  arguments of its reduction) or `stages` (decoder: where the span is ranked and how many tokens stay);
* what it emits into the graph -- `emit(site)` returns the plan nodes (`slot`, `weight`, `rep`) a method
  builds through the site's `Builder`; the pass around it applies the plan and threads the token state;
* `references()` -- pure-torch implementations of any op of its own, for targets that inline ops (ONNX).

Nothing here imports passes, the compiler or targets: the layers above call methods, never the reverse.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import fx

from tokenreduce.analysis.encoder import Block, ModelAnalysis
from tokenreduce.errors import TokenReduceError
from tokenreduce.ir.graph import Builder

Placement = Literal["encoder", "decoder", "denoiser", "any"]


# ------------------------------------------------------------------------------------------------ options
def option(default: Any, help: str, **metadata: Any) -> Any:  # noqa: A002 - mirrors argparse's `help`
    """A documented `Options` field (the help text is the CLI flag's help and the docs' description)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def fail(setting: str, message: str) -> TokenReduceError:
    """The error for an invalid setting: the message names the valid values; `setting` says which field."""
    return TokenReduceError(message, setting=setting)


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None,
              setting: str | None = None) -> int:
    """`value` must be an int (not a bool, float or str) in `lo..hi`. `setting`: the field, when `name`
    is an element of it (`r[2]`)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(setting or name, f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in {lo}..{hi}"
        raise fail(setting or name, f"{name} must be {rng}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(name, f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_ratio(name: str, value: Any) -> float:
    """A fraction in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise fail(name, f"{name} must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise fail(name, f"{name} must be in (0, 1], got {value}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise fail(name, f"unknown {name} {value!r}; choose {' or '.join(map(repr, choices))}")
    return str(value)


def check_int_list(name: str, value: Any, lo: int | None = 0) -> tuple[int, ...]:
    """One int or a list/tuple of ints (each >= lo), as a tuple. Strings and floats are refused, not split
    or truncated."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise fail(name, f"{name} must be an int or a list of ints, got {value!r} ({type(value).__name__})")
    return tuple(check_int(f"{name}[{i}]", v, lo=lo, setting=name) for i, v in enumerate(value))


@dataclass(frozen=True)
class Options:
    """Base of every method's options. Subclasses add fields with `option(...)` and check them in
    `validate()`; `__post_init__` runs it, so an `Options` instance is always valid."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check types and ranges that need no model; raise `fail(field, message)`."""

    def set(self, name: str, value: Any) -> None:
        """Normalise a field during `validate()` (the dataclass is frozen)."""
        object.__setattr__(self, name, value)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def field_kind(cls: type[Options], name: str) -> type:
    """The main value type of an options field (`int`, `float`, `bool`, `str`, `tuple`): how the CLI parses
    its flag."""
    hints = typing.get_type_hints(cls)
    kind = hints[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kinds = [typing.get_origin(a) or a for a in args]
        return tuple if tuple in kinds else kinds[0]
    return typing.get_origin(kind) or kind


# ------------------------------------------------------------------------------------------------ plans
@dataclass
class BlockPlan:
    """What an encoder method does at one block: tokens in/out and the constant arguments of its op, or why
    nothing happens there (`reason`)."""

    index: int
    name: str
    tokens_in: int
    tokens_out: int
    action: str = "none"  # the method's name where it reduces, else "none"
    r: int = 0  # tokens merged away (merging methods)
    keep: int = 0  # candidate tokens kept (pruning methods)
    reason: str = ""  # why nothing happened, or a note (clamped)

    @property
    def reduces(self) -> bool:
        return self.action != "none"


@dataclass(frozen=True)
class Stage:
    """One decoder pruning step: rank with the attention of block `score_block`, and run blocks from
    `first_reduced_block` on with `keep` span tokens (plus every token outside the span)."""

    score_block: int
    first_reduced_block: int
    keep: int


@dataclass
class Site:
    """What an encoder method may read at one reduction point, and the builder it emits through.

    The builder inserts right after the reduction point `x` (the hidden states `[B, N, C]` between the
    attention residual and the MLP). `bias` is the block's attention mask/bias as its softmax sees it now
    (after earlier reductions), so a score computed here matches the block's own attention.
    """

    builder: Builder
    x: fx.Node
    q: fx.Node  # [B, H, N, d]
    k: fx.Node  # [B, H, N, d]
    scale: float
    bias: fx.Node | None
    valid: fx.Node | None  # [B, N] bool key validity (padding), None without padding
    size: fx.Node | None  # [B, N] original tokens per slot, None before the first merge
    num_protected: int
    plan: BlockPlan
    block: Block


@dataclass
class PlanNodes:
    """The plan a method emitted: `slot [B, N]` (output slot per input token; dropped: `N'`), `weight [B, N]`
    (merge weight; None = the token sizes), `rep [B, N']` (one representative input token per slot)."""

    slot: fx.Node
    weight: fx.Node | None
    rep: fx.Node
    # A dense many-to-many plan `[B, N', N]` (Token Transforming: slot s receives `matrix[s, i]` of token i's
    # mass). When given, the apply step is `kernels.reference.apply_matrix` (one batched matmul) instead of
    # `apply_plan`, `weight` is unused, and `slot` names each token's dominant slot (source map, token maps).
    matrix: fx.Node | None = None


def check_layers(layers: Sequence[int], num_blocks: int, what: str = "transformer blocks",
                 setting: str = "layers") -> None:
    """Every block index in `layers` exists; the error names the valid range and the `setting` at fault."""
    bad = [i for i in layers if not 0 <= i < num_blocks]
    if bad:
        raise TokenReduceError(
            f"layer(s) {bad} out of range: the model has {num_blocks} {what} (valid layers 0..{num_blocks - 1})",
            setting=setting)


# ------------------------------------------------------------------------------------------------ methods
class Method:
    """One token-reduction method. Subclass it in `methods/<name>.py` and define `METHOD = YourMethod()`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    placement: ClassVar[Placement]
    options_type: ClassVar[type[Options]]
    merges: ClassVar[bool] = False  # tokens keep sizes > 1 (proportional attention, unmerge apply)

    def options(self, values: Mapping[str, Any], others: Mapping[str, Method] | None = None) -> Options:
        """This method's options from user values; a name it does not take is an error that lists its own
        options (and, given the other methods, which of them take the name)."""
        unknown = sorted(set(values) - set(self.options_type.names()))
        if unknown:
            own = ", ".join(self.options_type.names()) or "none"
            name = unknown[0]
            users = [m.name for m in (others or {}).values() if name in m.options_type.names()]
            where = f"{name} is a {' / '.join(users)} setting, not a {self.name} one" if users else \
                f"{name} is not a {self.name} setting"
            raise TokenReduceError(f"{where}; {self.name}'s options are: {own}", setting=name)
        return self.options_type(**values)

    def check_common(self, options: Options, unmerge: bool) -> None:
        """Cross-checks between the method's options and the common settings."""

    # What front ends (command line, sweeps, inspect) show of a method; the defaults suit most methods.
    sweep_option: ClassVar[str | None] = None  # the option a quality/speed sweep varies (`r`, `keep_ratio`)

    def label(self, values: Mapping[str, Any]) -> str:
        """One-line name of a setting for tables ("ToMe r=13"); `values` are the user's option values."""
        key = self.sweep_option
        return f"{self.name} {key}={values[key]}" if key is not None and key in values else self.name

    def identity_reason(self, values: Mapping[str, Any]) -> str | None:
        """Why these option values would reduce nothing (a run a user did not mean), or None."""
        return None

    def inspect_values(self, analysis: ModelAnalysis, given: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        """Option values `inspect` plans with where the user gave none (`given`: what they gave), and a note
        saying what was chosen."""
        return {}, ""

    def references(self) -> dict[Any, Callable[..., Any]]:
        """Custom ops of this method's own -> pure-torch implementation (inlined for ONNX)."""
        return {}


class EncoderMethod(Method):
    placement: ClassVar[Placement] = "encoder"
    # False: the method rewrites its blocks without moving tokens (TempScale scales attention logits, in its
    # own pass); insert_reductions then leaves its plans alone.
    moves_tokens: ClassVar[bool] = True
    # True: batches pad rows with empty slots (DyMU: each row keeps its own count); insert_reductions then masks
    # the empty slots and pools over each row's own slots.
    pads_slots: ClassVar[bool] = False

    def prop_attn(self, options: Options) -> bool:
        """Whether later attention adds log(size) to its logits after this method's reductions."""
        return bool(getattr(options, "prop_attn", False))

    def plan_blocks(self, options: Options, analysis: ModelAnalysis) -> list[BlockPlan]:
        raise NotImplementedError(f"{type(self).__name__} must plan its blocks")

    def emit(self, options: Options, site: Site) -> PlanNodes:
        raise NotImplementedError(f"{type(self).__name__} must emit its plan")

    def action(self, bp: BlockPlan, analysis: ModelAnalysis) -> str:
        """Report text for a block this method reduces."""
        return f"{self.name} {bp.tokens_in}->{bp.tokens_out}"


class DecoderMethod(Method):
    placement: ClassVar[Placement] = "decoder"

    def default_layers(self, num_layers: int) -> tuple[int, ...]:
        raise NotImplementedError(f"{type(self).__name__} must give its default layers")

    def layers(self, options: Options, num_layers: int) -> tuple[int, ...]:
        """The blocks the method acts at: the user's `layers` option, or the method's defaults."""
        given = getattr(options, "layers", None)
        return tuple(given) if given is not None else self.default_layers(num_layers)

    def stages(self, options: Options, num_layers: int, span: int) -> list[Stage]:
        raise NotImplementedError(f"{type(self).__name__} must give its stages")

    def score_pool(self, options: Options) -> int:
        return int(getattr(options, "score_pool", 1))


@dataclass
class MergeSite:
    """What a denoiser method reads at one transformer block: the block input `x [B, N, C]` (the builder
    inserts right after it), the block's token grid `(h, w)` and its plan. The method emits `slot [B, N]`
    (merged slot of every token, `0..plan.tokens_out - 1`); the pass merges each sublayer's input through it
    and unmerges the sublayer's output by it."""

    builder: Builder
    x: fx.Node
    grid: tuple[int, int]
    plan: BlockPlan
    timestep: fx.Node | None = None  # the graph input feeding the sinusoidal timestep embedding, if any


class DenoiserMethod(EncoderMethod):
    """A method that merges tokens inside the blocks of a diffusion denoiser (`tokenreduce.compile` on a UNet
    or diffusion transformer): `plan_blocks` gets a `DenoiserAnalysis` (analysis/denoiser.py), `emit_slots`
    builds one block's plan; each merged sublayer runs on `plan.tokens_out` tokens and is unmerged before its
    residual add."""

    placement: ClassVar[Placement] = "denoiser"
    merges: ClassVar[bool] = True

    def sublayers(self, options: Options) -> tuple[str, ...]:
        """Which sublayers of a block run on merged tokens ("attn", "crossattn", "mlp")."""
        raise NotImplementedError(f"{type(self).__name__} must say which sublayers it merges")

    def emit_slots(self, options: Options, site: MergeSite) -> fx.Node:
        raise NotImplementedError(f"{type(self).__name__} must emit its plan")

    def emit_positions(self, options: Options, site: MergeSite, slot: fx.Node) -> tuple[fx.Node, fx.Node]:
        """`(slot, positions)`: the plan `emit_slots` emitted, and `[B, N']`, the token each slot stands for
        (per-token side inputs such as Flux's rotary tables are gathered by it). Needed only on blocks whose
        merged sublayers read such inputs; a method without it is refused there."""
        raise TokenReduceError(f"block {site.plan.index} ({site.plan.name}) reads per-token positions (rotary tables) "
                               f"inside a merged sublayer; {self.name} does not say which token a merged slot "
                               "stands for (emit_positions)", setting="method")


def walk_blocks(analysis: ModelAnalysis, active: Callable[[Block], bool],
                reduce: Callable[[Block, BlockPlan], None]) -> list[BlockPlan]:
    """Plans for every block in order, threading the token count: `reduce(block, plan)` fills a plan for a
    reducible block where `active(block)`; requested blocks that cannot be reduced keep their skip reason."""
    n = next((b.num_tokens for b in analysis.blocks if b.reducible), 0)
    plans = []
    for b in analysis.blocks:
        bp = BlockPlan(b.index, b.name, n, n)
        if active(b):
            if b.reducible:
                reduce(b, bp)
            else:
                bp.reason = f"skipped: {b.skip_reason}"
        elif not b.reducible:
            bp.reason = f"not reducible: {b.skip_reason}"
        plans.append(bp)
        n = bp.tokens_out
    return plans
