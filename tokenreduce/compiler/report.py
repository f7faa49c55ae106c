"""What a compile did, per block and for the whole model, in a form people and scripts can read.

One `Report` type for every pipeline: encoder compiles (`tokenreduce.compile`, the backend) fill the
per-block token chain and protected tokens; decoder prefills (`tokenreduce.reduce_decoder`) also fill the
span, the stages and the blocks that are not pruned (a VLM's vision tower). Both list the passes that ran
(with their rewrite counts and seconds) and the notes passes and capture left for the user.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from tokenreduce.methods.base import Stage

log = logging.getLogger("tokenreduce")


@dataclass
class BlockReport:
    index: int
    name: str
    tokens_in: int
    tokens_out: int
    action: str  # "tome r=13", "evit keep 96/196", "fastv keep 32/64 span tokens", "-"
    reason: str = ""  # why nothing happened, or a note


@dataclass
class Report:
    method: str
    settings: dict[str, Any]
    blocks: list[BlockReport]
    num_protected: int = 0
    protected_reason: str = ""
    flops_before: int | None = None
    flops_after: int | None = None
    flops_unavailable: str = ""  # why FLOPs were not counted (counting never fails a compile)
    passes: list[str] = field(default_factory=list)  # "name: N rewrites", in order
    pass_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # decoder prefill only
    num_tokens: int = 0
    span_tokens: int | None = None
    stages: list[Stage] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def flops_ratio(self) -> float | None:
        """FLOPs after / before, or None when they were not counted."""
        if not self.flops_before or self.flops_after is None:
            return None
        return self.flops_after / self.flops_before

    @property
    def reduced_blocks(self) -> list[BlockReport]:
        return [b for b in self.blocks if b.tokens_out != b.tokens_in]

    @property
    def tokens_per_block(self) -> list[int]:
        """Tokens each block's attention runs on."""
        return [b.tokens_in for b in self.blocks]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flops_ratio"] = self.flops_ratio
        d["tokens_per_block"] = self.tokens_per_block
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def __str__(self) -> str:
        if self.span_tokens is not None:
            lines = [f"tokenreduce: method={self.method}  ({self.num_tokens} prompt tokens, {self.span_tokens} in "
                     "the droppable span)"]
            for s in self.stages:
                lines.append(f"  stage: rank with block {s.score_block}'s last-query attention, blocks "
                             f"{s.first_reduced_block}.. keep {s.keep} span tokens")
        else:
            lines = [f"tokenreduce: method={self.method}  protected tokens={self.num_protected} "
                     f"({self.protected_reason})"]
        lines.append(f"{'#':>3}  {'block':<28} {'tokens':>11}  {'action':<20} note")
        for b in self.blocks:
            tok = f"{b.tokens_in}->{b.tokens_out}" if b.tokens_out != b.tokens_in else f"{b.tokens_in}"
            lines.append(f"{b.index:>3}  {b.name[:28]:<28} {tok:>11}  {b.action:<20} {b.reason}")
        for name, why in self.skipped:
            lines.append(f"  not pruned: {name}: {why}")
        ratio = self.flops_ratio
        if ratio is not None:
            assert self.flops_before is not None and self.flops_after is not None
            lines.append(f"FLOPs: {self.flops_before / 1e9:.3f} G -> {self.flops_after / 1e9:.3f} G "
                         f"(ratio {ratio:.3f}, {1 / ratio:.2f}x fewer)")
        elif self.flops_unavailable:
            lines.append(f"FLOPs unavailable: {self.flops_unavailable}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def count_flops(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> int:
    """Total FLOPs of one call, counted with torch.utils.flop_counter's formulas (matmuls, attention, our ops).

    The call runs on fake tensors (shapes and dtypes only, no arithmetic; the parameters are converted on
    first use): every FLOP formula reads only shapes, so the count is the same as a real run's, at the cost
    of a trace instead of a full forward pass (seconds of eager ViT-B at batch 8, twice per compile). A
    model whose Python reads tensor values (`.item()`, `if mask.all()`, data-dependent output shapes) cannot
    run on fake tensors; it is then counted on the real inputs.

    Only the total is kept, so `FlopCounterMode`'s per-module tracker is left out: it hooks every module
    input that requires grad to follow backward, and asserts on a view of a parameter made under no_grad
    (`requires_grad` without a `grad_fn`: CaiT's `cls_token.expand`, SigLIP's attention-pool latent).
    Raises whatever the call raises; `flops_or_reason` turns that into a reason for the report.
    """
    kwargs = kwargs or {}
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args, fake_kwargs = pytree.tree_map_only(
                torch.Tensor, lambda t: mode.from_tensor(t, static_shapes=True), (args, kwargs))
        return _run_counted(fn, fake_args, fake_kwargs, mode)
    except Exception as exc:  # noqa: BLE001 - data-dependent Python; the real run below raises real errors
        log.debug("FLOPs counted on real tensors: %s cannot run on fake tensors (%s)",
                  type(fn).__name__, first_line(exc))
    return _run_counted(fn, args, kwargs, None)


def flops_or_reason(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> tuple[int | None, str]:
    """`count_flops`, or None and why it could not count: FLOP counting never breaks a compile."""
    try:
        return count_flops(fn, args, kwargs), ""
    except Exception as exc:  # noqa: BLE001 - any failure of the count is reported, not raised
        return None, f"{type(fn).__name__} could not be counted ({type(exc).__name__}: {first_line(exc)})"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _TotalsOnly:
    """Stands in for FlopCounterMode's module tracker: every FLOP goes to the one "Global" total."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _TotalsOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _run_counted(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], mode: FakeTensorMode | None) -> int:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _TotalsOnly()  # type: ignore[assignment]
    with torch.no_grad(), mode if mode is not None else contextlib.nullcontext(), counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


Call = tuple[Any, tuple[Any, ...], dict[str, Any]]  # (callable, args, kwargs)


def count_report_flops(report: Report, before: Call, after: Call) -> None:
    """Fill the report's FLOPs before/after from two calls, or say why they are unavailable (never raises)."""
    flops_before, why_before = flops_or_reason(*before)
    flops_after, why_after = flops_or_reason(*after) if flops_before is not None else (None, "")
    if flops_before is None or flops_after is None:
        side = "the model" if flops_before is None else "the reduced graph"
        report.flops_unavailable = f"{side}: {why_before or why_after}"
        return
    report.flops_before, report.flops_after = flops_before, flops_after
