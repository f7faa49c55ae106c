"""Latency of a token-reduced model against its unreduced baseline, measured one way everywhere.

`tokenreduce bench` and `benchmarks/vit_speed.py` both time through this module, so a number printed by
the command line and a number in docs/benchmarks.md mean the same thing:

* Same target on both sides. `eager`: the plain module vs the rewritten graph. `inductor`:
  `torch.compile(model)` vs `tokenreduce.compile(..., inner="inductor")`, both with a symbolic batch
  dimension by default (`dynamic_batch`). `onnxruntime`: both models exported with
  `tokenreduce.targets.onnx.export_onnx` (the baseline with `method="none"`, so the same exporter and
  graph optimiser are used) and verified, then run in onnxruntime CPU sessions.
* The first call of each side (compilation, session warm-up) is never timed; then `warmup` untimed
  rounds; then `repeats` rounds of A, B, A, B, ... so machine drift on a shared box hits both sides.
* Medians per side (interference only ever slows a call down, so means are biased), with the
  interquartile range kept to show the noise.
* `latency_ratio = reduced / unreduced`, `speedup = 1 / latency_ratio`, `FLOPs ratio` from the compile
  report (`torch.utils.flop_counter`), `efficiency = speedup / FLOPs speedup`: 1.0 means every removed
  FLOP turned into saved time.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from tokenreduce.compiler.api import ReducedModule
from tokenreduce.compiler.api import compile as tr_compile
from tokenreduce.compiler.report import Report
from tokenreduce.errors import TokenReduceError

TARGETS = ("eager", "inductor", "onnxruntime")

Call = Callable[[], Any]
"""A zero-argument call with its inputs already bound (conversion of inputs is never timed)."""


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
    samples_unreduced_ms: list[float] = field(default_factory=list, repr=False)
    samples_reduced_ms: list[float] = field(default_factory=list, repr=False)


def make_row(setting: str, batch: int, target: str, timing: Timing, report: Report, note: str = "") -> BenchRow:
    lat_a, lat_b = timing.median_unreduced_ms, timing.median_reduced_ms
    speedup = lat_a / lat_b
    flops_ratio = report.flops_ratio
    flops_speedup = 1.0 / flops_ratio if flops_ratio else float("nan")
    return BenchRow(
        setting=setting, batch=batch, target=target, latency_unreduced_ms=lat_a, latency_reduced_ms=lat_b,
        latency_ratio=lat_b / lat_a, speedup=speedup, flops_ratio=flops_ratio, flops_speedup=flops_speedup,
        efficiency=speedup / flops_speedup, repeats=len(timing.samples_reduced_ms),
        iqr_unreduced_ms=iqr(timing.samples_unreduced_ms), iqr_reduced_ms=iqr(timing.samples_reduced_ms),
        flops_before=report.flops_before, flops_after=report.flops_after, note=note,
        samples_unreduced_ms=list(timing.samples_unreduced_ms), samples_reduced_ms=list(timing.samples_reduced_ms),
    )


# --------------------------------------------------------------------------------------------- targets
def default_threads() -> int:
    """CPU cores available to this process."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise TokenReduceError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")


@dataclass
class Runner:
    """A model prepared on a target (compiled, or exported into an onnxruntime session). `bind` fixes
    the inputs of the timed call; a runner prepared with a dynamic batch serves every batch size."""

    target: str
    batch: int | None
    dynamic_batch: bool
    _bind: Callable[[tuple[Any, ...], dict[str, Any]], Call] = field(repr=False)

    def serves(self, batch: int) -> bool:
        return self.dynamic_batch or batch == self.batch

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Call:
        return self._bind(tuple(args), dict(kwargs))


def _batch(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
    for leaf in pytree.tree_leaves((tuple(args), dict(kwargs))):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def _module_runner(fn: Callable[..., Any], target: str, batch: int | None, dynamic: bool) -> Runner:
    def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        return lambda: fn(*args, **kwargs)

    return Runner(target, batch, dynamic, bind)


def _ort_runner(module: ReducedModule, threads: int | None, atol: float) -> Runner:
    """Export `module` to verified ONNX in a scratch directory and open an onnxruntime CPU session on it."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise TokenReduceError("the onnxruntime target needs `onnxruntime` (pip install onnxruntime)") from exc
    from tokenreduce.targets.onnx import export_onnx

    with tempfile.TemporaryDirectory(prefix="tokenreduce-bench-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(module, path, verify=True, atol=atol)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])  # weights now in memory
    names = [i.name for i in sess.get_inputs()]
    # the file, not the module, says whether the batch stayed symbolic through the export
    dynamic = all(isinstance(i.shape[0], str) or i.shape[0] is None for i in sess.get_inputs() if i.shape)

    def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(names, tensors)}
        return lambda: sess.run(None, feeds)

    return Runner("onnxruntime", _batch(module.example_args, module.example_kwargs), dynamic, bind)


def prepare_baseline(model: torch.nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], target: str, *,
                     dynamic_batch: bool = True, threads: int | None = None, atol: float = 1e-4) -> Runner:
    """The unreduced model on `target`, prepared with these example inputs."""
    _check_target(target)
    batch = _batch(args, kwargs)
    if target == "eager":
        return _module_runner(model, target, batch, True)
    if target == "inductor":
        torch._dynamo.reset()  # a fresh compile (static batch: no automatic-dynamic recompile from earlier runs)
        return _module_runner(torch.compile(model, dynamic=True if dynamic_batch else None), target, batch,
                              dynamic_batch)
    with torch.no_grad():
        plain = tr_compile(model, args, dict(kwargs), method="none", inner="eager", count_model_flops=False,
                           dynamic_batch=dynamic_batch)
    return _ort_runner(plain, threads, atol)


def prepare_reduced(model: torch.nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], target: str,
                    options: Mapping[str, Any], *, dynamic_batch: bool = True, threads: int | None = None,
                    atol: float = 1e-4) -> tuple[Runner, Report]:
    """The reduced model on `target` (`options`: tokenreduce settings) and its compile report with FLOPs."""
    _check_target(target)
    settings = dict(options)
    settings["inner"] = target if target in ("eager", "inductor") else "eager"
    settings["dynamic_batch"] = dynamic_batch
    with torch.no_grad():
        red = tr_compile(model, args, dict(kwargs), **settings)
    if target == "onnxruntime":
        return _ort_runner(red, threads, atol), red.report
    return _module_runner(red, target, _batch(args, kwargs), red.dynamic_batch), red.report
