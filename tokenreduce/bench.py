"""Latency of a token-reduced model against its unreduced baseline, measured one way everywhere.

`tokenreduce bench` and `benchmarks/vit_speed.py` both time through this module, so a number printed by
the command line and a number in docs/benchmarks.md mean the same thing:

* Same target on both sides, through the target interface (`tokenreduce.targets`): the names a bench
  accepts (`TARGETS`, `bench_targets()`) are the runtime labels of the registered targets, and each side is
  prepared by that target's `lower`. The reduced side is the rewritten graph of `tokenreduce.compile`. The
  unreduced side is the plain module for targets that lower any module as it is (`eager`: the module
  itself; `inductor`: `torch.compile(model)`), and otherwise the graph of `method="none"` (`onnxruntime`,
  `tensorrt`: both exported with the same exporter and graph optimiser, and verified). Both sides keep a
  symbolic batch dimension by default (`dynamic_batch`).
* The first call of each side (compilation, session warm-up) is never timed; then `warmup` untimed
  rounds; then `repeats` rounds of A, B, A, B, ... so machine drift on a shared box hits both sides.
* Medians per side (interference only ever slows a call down, so means are biased), with the
  interquartile range kept to show the noise.
* `latency_ratio = reduced / unreduced`, `speedup = 1 / latency_ratio`, `FLOPs ratio` from the compile
  report (`torch.utils.flop_counter`), `efficiency = speedup / FLOPs speedup`: 1.0 means every removed
  FLOP turned into saved time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenreduce import targets
from tokenreduce.compiler.api import compile as tr_compile
from tokenreduce.compiler.report import Report
from tokenreduce.errors import TokenReduceError
from tokenreduce.targets.base import Call, Lowered, Target, TargetOptions, default_threads

__all__ = [
    "TARGETS", "BenchRow", "Call", "Runner", "Timing", "bench_targets", "default_threads", "interleaved", "iqr",
    "make_row", "prepare_baseline", "prepare_reduced", "threads_used", "time_call",
]


def bench_targets() -> dict[str, Target]:
    """Every registered target that gives a runner, keyed by its runtime label (what `--target` takes)."""
    return {t.runtime: t for t in targets.all_targets(targets.RUNTIME)}


TARGETS = tuple(bench_targets())
"""The runtime labels of the registered targets when this module was imported (`bench_targets()` is live)."""


# --------------------------------------------------------------------------------------------- timing
def time_call(fn: Call) -> float:
    """Wall-clock milliseconds of one call."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def iqr(samples: list[float]) -> float:
    """Interquartile range; NaN below 4 samples (too few to say anything about spread)."""
    if len(samples) < 4:
        return float("nan")
    q = statistics.quantiles(samples, n=4)
    return q[2] - q[0]


@dataclass
class Timing:
    """Interleaved samples (ms) of the unreduced (A) and reduced (B) calls."""

    samples_unreduced_ms: list[float]
    samples_reduced_ms: list[float]

    @property
    def median_unreduced_ms(self) -> float:
        return statistics.median(self.samples_unreduced_ms)

    @property
    def median_reduced_ms(self) -> float:
        return statistics.median(self.samples_reduced_ms)


def paired_ratio(samples_unreduced_ms: Sequence[float], samples_reduced_ms: Sequence[float]) -> float:
    """The median over rounds of reduced / unreduced latency of the same round (A and B run back to back): under
    a load that drifts within a run this is steadier than the ratio of the two medians."""
    return statistics.median(b / a for a, b in zip(samples_unreduced_ms, samples_reduced_ms, strict=True))


def interleaved(unreduced: Call, reduced: Call, repeats: int, warmup: int = 1,
                on_round: Callable[[], None] | None = None) -> Timing:
    """One untimed first call of each side, `warmup` untimed rounds, then `repeats` timed rounds of
    A, B, A, B, ... under `torch.inference_mode()`. `on_round` is called after every round (progress)."""
    if repeats < 1:
        raise TokenReduceError(f"repeats must be >= 1, got {repeats}")
    a_times: list[float] = []
    b_times: list[float] = []
    with torch.inference_mode():
        unreduced()
        reduced()
        for _ in range(warmup):
            unreduced()
            reduced()
            if on_round:
                on_round()
        for _ in range(repeats):
            a_times.append(time_call(unreduced))
            b_times.append(time_call(reduced))
            if on_round:
                on_round()
    return Timing(a_times, b_times)


# --------------------------------------------------------------------------------------------- results
@dataclass
class BenchRow:
    """One measurement: a setting at one batch size on one target."""

    setting: str
    batch: int
    target: str
    latency_unreduced_ms: float
    latency_reduced_ms: float
    latency_ratio: float  # reduced / unreduced
    speedup: float  # unreduced / reduced
    flops_ratio: float  # reduced / unreduced
    flops_speedup: float  # 1 / flops_ratio
    efficiency: float  # speedup / flops_speedup
    repeats: int
    iqr_unreduced_ms: float
    iqr_reduced_ms: float
    flops_before: int
    flops_after: int
    note: str = ""
    threads: int | None = None  # CPU threads the runtime used (onnxruntime intra-op threads; torch threads)
    samples_unreduced_ms: list[float] = field(default_factory=list, repr=False)
    samples_reduced_ms: list[float] = field(default_factory=list, repr=False)


def make_row(setting: str, batch: int, target: str, timing: Timing, report: Report, note: str = "",
             threads: int | None = None) -> BenchRow:
    lat_a, lat_b = timing.median_unreduced_ms, timing.median_reduced_ms
    speedup = lat_a / lat_b
    # a report without FLOPs counted (count_model_flops=False) gives NaN ratios and zero counts
    flops_ratio = report.flops_ratio if report.flops_ratio is not None else float("nan")
    flops_speedup = 1.0 / flops_ratio if flops_ratio else float("nan")
    return BenchRow(
        setting=setting, batch=batch, target=target, latency_unreduced_ms=lat_a, latency_reduced_ms=lat_b,
        latency_ratio=lat_b / lat_a, speedup=speedup, flops_ratio=flops_ratio, flops_speedup=flops_speedup,
        efficiency=speedup / flops_speedup, repeats=len(timing.samples_reduced_ms),
        iqr_unreduced_ms=iqr(timing.samples_unreduced_ms), iqr_reduced_ms=iqr(timing.samples_reduced_ms),
        flops_before=report.flops_before or 0, flops_after=report.flops_after or 0, note=note, threads=threads,
        samples_unreduced_ms=list(timing.samples_unreduced_ms), samples_reduced_ms=list(timing.samples_reduced_ms),
    )


# --------------------------------------------------------------------------------------------- targets
Runner = Lowered
"""A model prepared on a target (`tokenreduce.targets.Lowered`): `bind` fixes the inputs of the timed call;
`serves(batch)` says whether it can be called at another batch size without preparing again."""


def _target(label: str) -> Target:
    target = bench_targets().get(label)
    if target is None:
        raise TokenReduceError(f"unknown target {label!r}; choose one of {', '.join(bench_targets())}")
    target.require_available()
    return target


def _options(dynamic_batch: bool, threads: int | None, atol: float, fused_attention: bool = False) -> TargetOptions:
    return TargetOptions(dynamic_batch=dynamic_batch, threads=threads or default_threads(), atol=atol,
                         fused_attention=fused_attention)


def threads_used(runner: Runner) -> int:
    """The CPU threads a prepared runner runs with: its runtime's own count (onnxruntime's intra-op pool),
    else torch's."""
    return runner.threads if runner.threads is not None else torch.get_num_threads()


def prepare_baseline(model: torch.nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], target: str, *,
                     dynamic_batch: bool = True, threads: int | None = None, atol: float = 1e-4,
                     fused_attention: bool = False) -> Runner:
    """The unreduced model on `target`, prepared with these example inputs (`fused_attention`: onnx, see
    `TargetOptions`)."""
    tgt = _target(target)
    options = _options(dynamic_batch, threads, atol, fused_attention)
    # a fresh Dynamo state (static batch: no automatic-dynamic recompile of the plain module from earlier runs)
    torch._dynamo.reset()
    if tgt.accepts_modules:
        return tgt.lower(model, tuple(args), dict(kwargs), options)
    with torch.no_grad():
        plain = tr_compile(model, tuple(args), dict(kwargs), method="none", inner="eager", count_model_flops=False,
                           dynamic_batch=dynamic_batch)
    return tgt.lower(plain.graph_module, plain.example_args, plain.example_kwargs, options)


def prepare_reduced(model: torch.nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], target: str,
                    options: Mapping[str, Any], *, dynamic_batch: bool = True, threads: int | None = None,
                    atol: float = 1e-4) -> tuple[Runner, Report]:
    """The reduced model on `target` (`options`: tokenreduce settings) and its compile report with FLOPs."""
    tgt = _target(target)
    settings = dict(options)
    settings["inner"] = "eager"  # the target lowers the rewritten graph itself
    settings["dynamic_batch"] = dynamic_batch
    with torch.no_grad():
        red = tr_compile(model, tuple(args), dict(kwargs), **settings)
    lowered = tgt.lower(red.graph_module, red.example_args, red.example_kwargs, _options(dynamic_batch, threads, atol))
    return lowered, red.report
