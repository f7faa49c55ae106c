"""`calibrate_dymu`: per-block DyMU thresholds that give a target *average* merge count on a set of inputs.

DyMU (Wang et al., 2025, "DyMU: Dynamic Merging and Virtual Unmerging for Efficient VLMs", arXiv 2504.17040)
sets each block's threshold from data: over a batch of M inputs, the M * r_l most similar bipartite edges of
block l (pooled over all inputs) are the ones a fixed-count ToMe r_l would merge on average, so the threshold is
the similarity of the (M * r_l)-th best edge. Here the blocks are calibrated in order, each with the thresholds
already found for the blocks before it in force (block l's edges depend on what merged before it), and the
threshold is put halfway between the (M * r_l)-th and the next edge, so on the calibration inputs exactly
M * r_l edges clear it (up to ties and the per-input limit `(N - P) // 2`). A last pass measures the mean
merges per block with every threshold in force: that is `mean_r`, written beside the thresholds, which the
report shows and which is the `r` of the fixed-count alternative (`method="tome"`).

Inputs: a tensor whose first dimension lists the inputs, a list of batch-1 tensors or of keyword-input dicts,
or a folder of images / `.npy` arrays (`input_shape` gives C, H, W; images are normalised with ImageNet
statistics as the ONNX int8 calibration does). Tensor inputs run `batch_size` at a time (default 1): DyMU's
padded batches plan every row exactly as alone, so the edges, thresholds and counts are those of batch 1 (up to
float rounding of batched matmuls). Refuses: both or neither of `r` and `target_tokens`, a target the model
cannot reach, no inputs, `batch_size` > 1 with keyword-input dicts (rows of different lengths: run them one by
one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenreduce.compiler.api import compile as tr_compile
from tokenreduce.errors import TokenReduceError
from tokenreduce.methods.dymu import NO_MERGE, THRESHOLDS_FORMAT, recording
from tokenreduce.methods.tome import r_schedule
from tokenreduce.targets.quantize import calibration_inputs
from tokenreduce.util.files import write_text

VERSION = 1


@dataclass
class DymuThresholds:
    """Calibrated thresholds (`None` = no merging in that block) and what they did on the calibration inputs."""

    thresholds: list[float | None]
    mean_r: list[float]  # mean merges per block with every threshold in force
    target_r: list[int]
    mean_tokens: float  # mean tokens after the last block
    tokens_per_input: list[int] = field(default_factory=list)  # tokens after the last block, per input

    def settings(self) -> dict[str, Any]:
        """What `tokenreduce.compile(model, x, **settings)` takes to run these thresholds."""
        return {"method": "dymu", "thresholds": list(self.thresholds), "mean_r": list(self.mean_r)}

    def to_dict(self) -> dict[str, Any]:
        return {"format": THRESHOLDS_FORMAT, "version": VERSION, "thresholds": self.thresholds,
                "mean_r": self.mean_r, "target_r": self.target_r, "mean_tokens": self.mean_tokens,
                "tokens_per_input": self.tokens_per_input}

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")


def _as_inputs(inputs: Any, input_shape: Sequence[int]) -> list[Any]:
    """Each calibration input as one call's arguments (a batch-1 tensor or a dict of keyword inputs)."""
    if isinstance(inputs, str | os.PathLike):
        feeds = calibration_inputs(inputs, "x", (1, *input_shape), limit=1 << 30)
        return [torch.from_numpy(f["x"]) for f in feeds]
    if isinstance(inputs, torch.Tensor):
        return [inputs[i:i + 1] for i in range(inputs.shape[0])]
    if isinstance(inputs, Sequence):
        out = []
        for i, item in enumerate(inputs):
            if isinstance(item, torch.Tensor | Mapping):
                out.append(item)
            else:
                raise TokenReduceError(f"calibration input {i} is a {type(item).__name__}; give tensors (batch 1) "
                                       "or dicts of keyword inputs", setting="inputs")
        return out
    raise TokenReduceError(f"inputs must be a tensor [M, ...], a list of inputs or a folder, got "
                           f"{type(inputs).__name__}", setting="inputs")


def _call(module: Any, item: Any) -> Any:
    return module(**item) if isinstance(item, Mapping) else module(item)


def _batches(items: list[Any], batch_size: int) -> list[Any]:
    """The calls of one pass over the inputs: `batch_size` batch-1 tensors concatenated per call."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TokenReduceError(f"batch_size must be an int >= 1, got {batch_size!r}", setting="batch_size")
    if batch_size == 1:
        return items
    if any(isinstance(item, Mapping) for item in items):
        raise TokenReduceError("batch_size > 1 needs tensor inputs; keyword-input dicts (text of different lengths) "
                               "run one by one: use batch_size=1", setting="batch_size")
    return [torch.cat(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def _threshold(scores: list[torch.Tensor], k: int) -> float | None:
    """Halfway between the k-th and (k+1)-th best pooled edge (None: k = 0, no merging)."""
    if k <= 0:
        return None
    pooled = torch.cat(scores).sort(descending=True).values
    pooled = pooled[torch.isfinite(pooled)]
    if pooled.numel() == 0:
        return None
    if k >= pooled.numel():
        return float(pooled[-1]) - 1e-6
    return float((pooled[k - 1] + pooled[k]) / 2)


def calibrate_dymu(model: torch.nn.Module, inputs: Any, *, r: int | Sequence[int] | None = None,
                   target_tokens: int | None = None, output: str | os.PathLike[str] | None = None,
                   input_shape: Sequence[int] = (3, 224, 224), batch_size: int = 1,
                   **settings: Any) -> DymuThresholds:
    """Per-block thresholds giving, on average over `inputs`, `r` merges per block (an int for every block or a
    per-block list), or `target_tokens` tokens after the last block (spread as a constant r). Writes the JSON
    to `output` when given (`method="dymu", thresholds=output` reads it). `batch_size`: tensor inputs per call.
    `settings`: other compile settings (`protected_tokens`, `prop_attn`, ...); calibration always runs eagerly
    (`inner` is ignored)."""
    if (r is None) == (target_tokens is None):
        raise TokenReduceError("give exactly one of r (mean merges per block) and target_tokens (mean tokens after "
                               "the last block)", setting="r")
    items = _as_inputs(inputs, input_shape)
    if not items:
        raise TokenReduceError("calibrate_dymu needs at least one input", setting="inputs")
    calls = _batches(items, batch_size)
    example = items[0]
    common = {**settings, "inner": "eager", "count_model_flops": False}  # the plans run eagerly (Python counts)
    args, kwargs = ((), example) if isinstance(example, Mapping) else ((example,), None)
    probe = tr_compile(model, args, kwargs, method="none", **common)
    blocks = list(probe.report.blocks)
    num_blocks = len(blocks)
    n0 = blocks[0].tokens_in if blocks else 0
    if target_tokens is not None:
        reducible = sum(1 for b in blocks if not b.reason.startswith("not reducible"))
        if not isinstance(target_tokens, int) or not 1 <= target_tokens <= n0 or reducible == 0:
            raise TokenReduceError(f"target_tokens must be an int in 1..{n0} (the model's token count)",
                                   setting="target_tokens")
        r = round((n0 - target_tokens) / reducible)
    assert r is not None
    rs = r_schedule(tuple(r) if isinstance(r, Sequence) else int(r), num_blocks)
    active = [i for i, v in enumerate(rs) if v > 0]
    if not active:
        raise TokenReduceError("r=0 merges nothing; give r >= 1 (mean merges per block)", setting="r")
    # one compile whose thresholds `recording(overrides=...)` replaces at run time; nominal counts = the targets
    nominal = [float(v) for v in rs]
    last = active[-1] + 1
    reduced = tr_compile(model, args, kwargs, method="dymu", thresholds=[0.0 if v > 0 else None for v in rs[:last]],
                         mean_r=nominal[:last], **common)
    found: dict[int, float] = {}
    with torch.no_grad():
        for i in active:
            overrides = {j: found.get(j, NO_MERGE) for j in active}
            with recording(overrides) as rec:
                for item in calls:
                    _call(reduced, item)
            found[i] = NO_MERGE if (t := _threshold(rec.scores.get(i, []), rs[i] * len(items))) is None else t
        with recording(found) as rec:
            for item in calls:
                _call(reduced, item)
    thresholds: list[float | None] = [None if found.get(i, NO_MERGE) == NO_MERGE else found[i] for i in range(last)]
    per_block: list[float] = []
    prev = [n0] * len(items)
    tokens = [dict(c) for c in rec.counts]
    for i in range(last):
        now = [c.get(i, p) for c, p in zip(tokens, prev)]
        per_block.append(sum(p - q for p, q in zip(prev, now)) / len(items))
        prev = now
    result = DymuThresholds(thresholds=thresholds, mean_r=per_block, target_r=list(rs[:last]),
                            mean_tokens=sum(prev) / len(items), tokens_per_input=prev)
    if output is not None:
        result.save(output)
    return result
