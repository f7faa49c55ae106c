"""What a compile did, per block and for the whole model, in a form people and scripts can read."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class BlockReport:
    index: int
    name: str
    tokens_in: int
    tokens_out: int
    action: str  # "tome r=13", "evit keep 96/196", "-"
    reason: str = ""  # why nothing happened, or a note


@dataclass
class Report:
    method: str
    settings: dict[str, Any]
    num_protected: int
    protected_reason: str
    blocks: list[BlockReport]
    flops_before: int = 0
    flops_after: int = 0
    passes: list[str] = field(default_factory=list)

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before if self.flops_before else float("nan")

    @property
    def reduced_blocks(self) -> list[BlockReport]:
        return [b for b in self.blocks if b.tokens_out != b.tokens_in]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flops_ratio"] = self.flops_ratio
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def __str__(self) -> str:
        lines = [
            f"tokenreduce: method={self.method}  protected tokens={self.num_protected} ({self.protected_reason})",
            f"{'#':>3}  {'block':<28} {'tokens':>11}  {'action':<20} note",
        ]
        for b in self.blocks:
            tok = f"{b.tokens_in}->{b.tokens_out}" if b.tokens_out != b.tokens_in else f"{b.tokens_in}"
            lines.append(f"{b.index:>3}  {b.name[:28]:<28} {tok:>11}  {b.action:<20} {b.reason}")
        if self.flops_before:
            lines.append(
                f"FLOPs: {self.flops_before / 1e9:.3f} G -> {self.flops_after / 1e9:.3f} G "
                f"(ratio {self.flops_ratio:.3f}, {1 / self.flops_ratio:.2f}x fewer)"
            )
        return "\n".join(lines)


def count_flops(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> int:
    """Total FLOPs of one call, counted by torch.utils.flop_counter (matmuls, attention, our ops)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(*args, **(kwargs or {}))
    return int(counter.get_total_flops())
