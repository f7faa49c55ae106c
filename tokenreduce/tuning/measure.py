"""What a tuning run measures per candidate, and the cache that makes a run resumable.

* Fidelity and FLOPs: the model is captured once (`torch.export`, dynamic batch); each candidate rewrites a
  copy of that graph through the compiler's own pipeline (`reduce_graph`, the same passes and report as
  `tokenreduce.compile`), runs it eagerly on the calibration inputs and is scored against the full model's
  outputs. Its FLOPs are counted on the rewritten graph (`count_flops`: what its report would say).
* Latency: on the deployment target at the deployment batch, through `tokenreduce.bench` (the reduced and the
  unreduced model prepared by the target's own lowering, interleaved A/B rounds, medians), so a ratio here
  means what `tokenreduce bench` prints.
* The cache: one JSON file of finished measurements keyed by what they depend on (the model's weights, the
  calibration inputs, the metric, the setting; for latency also target, batch, threads and rounds), rewritten
  atomically after every new entry, so an interrupted run resumes where it stopped.

The default metric is the cosine similarity to the full model of the model's summary vector: `pooler_output`
when the output has one, else the first token (CLS) of a `[B, N, C]` output, else the flattened output
(logits). Token-level outputs of a reduced model have fewer tokens, so a text model whose embedding is a mean
over tokens should be tuned with `unmerge=True` among the fixed settings and a metric of its own.

Refuses: calibration inputs of other batch sizes when the capture fell back to a static batch (named), and a
user metric that returns something other than a finite number.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from tokenreduce.compiler.capture import export_graph, release_fake_caches, trace_lock
from tokenreduce.compiler.pipeline import make_report, reduce_graph
from tokenreduce.compiler.report import Report, count_flops
from tokenreduce.errors import TokenReduceError
from tokenreduce.jsonable import jsonable
from tokenreduce.methods.settings import Settings
from tokenreduce.tuning.space import Candidate
from tokenreduce.util.batch import batch_of, tensor_leaves
from tokenreduce.util.files import write_text

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
Metric = Callable[[Any, Any], float]
CACHE_FORMAT = "tokenreduce-tune-cache"
CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------------ metric
def summary_vector(out: Any) -> torch.Tensor:
    """The vector the default metric compares: `pooler_output`, else token 0 of a `[B, N, C]` output, else the
    flattened output."""
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled.flatten(1).float()
    if isinstance(out, Mapping) and isinstance(out.get("pooler_output"), torch.Tensor):
        return out["pooler_output"].flatten(1).float()
    leaves = tensor_leaves(out if not hasattr(out, "to_tuple") else out.to_tuple())
    if not leaves:
        raise TokenReduceError("the model returned no tensor to compare; pass metric=fn(full_out, reduced_out)")
    t = leaves[0]
    if t.dim() == 3:
        return t[:, 0].float()
    return t.flatten(1).float() if t.dim() > 1 else t.float()[:, None]


def output_cosine(full: Any, reduced: Any) -> float:
    """Mean cosine similarity of the summary vectors (`summary_vector`) of two outputs."""
    return float(F.cosine_similarity(summary_vector(full), summary_vector(reduced), dim=-1).mean())


def metric_name(metric: Metric | None) -> str:
    if metric is None:
        return "output cosine"
    return getattr(metric, "__name__", None) or type(metric).__name__


# ------------------------------------------------------------------------------------------------ inputs
def calibration_batches(calib: Any, batch: int) -> list[Inputs]:
    """Calibration inputs as a list of (args, kwargs): a tensor `[N, ...]` is cut into batches of `batch`; a
    list/tuple holds one input per batch (a tensor, a tuple of positional inputs or a dict of keyword inputs)."""
    if isinstance(calib, torch.Tensor):
        if calib.dim() == 0 or calib.shape[0] == 0:
            raise TokenReduceError("calibration inputs are empty; give a tensor [N, ...] with N >= 1 samples",
                                   setting="calib")
        return [((calib[i:i + batch],), {}) for i in range(0, calib.shape[0], batch)]
    if isinstance(calib, Mapping):
        return [((), dict(calib))]
    if isinstance(calib, Sequence) and not isinstance(calib, str) and len(calib) > 0:
        out: list[Inputs] = []
        for item in calib:
            if isinstance(item, torch.Tensor):
                out.append(((item,), {}))
            elif isinstance(item, Mapping):
                out.append(((), dict(item)))
            elif isinstance(item, tuple | list):
                out.append((tuple(item), {}))
            else:
                raise TokenReduceError(f"a calibration batch must be a tensor, a tuple or a dict, got "
                                       f"{type(item).__name__}", setting="calib")
        return out
    raise TokenReduceError(f"calibration inputs must be a tensor [N, ...] or a non-empty list of input batches, "
                           f"got {type(calib).__name__}", setting="calib")


def rows(inputs: Inputs, batch: int) -> Inputs:
    """The first `batch` rows of every batched tensor of `inputs` (repeated when there are fewer)."""
    have = batch_of(*inputs)
    if have is None:
        return inputs

    def cut(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == have:
            reps = math.ceil(batch / have)
            return (t.repeat(reps, *([1] * (t.dim() - 1))) if reps > 1 else t)[:batch].contiguous()
        return t

    args, kwargs = inputs
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


# ------------------------------------------------------------------------------------------------ cache
class Cache:
    """Finished measurements in one JSON file, rewritten atomically after each new entry (resumable)."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise TokenReduceError(f"tuning cache {self.path} is not valid JSON ({exc}); delete it to start "
                                       "afresh", setting="cache") from exc
            if data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
                raise TokenReduceError(f"{self.path} is not a version-{CACHE_VERSION} tokenreduce tuning cache; "
                                       "delete it or give another --cache path", setting="cache")
            self.entries = dict(data.get("entries") or {})

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.entries[key] = value
        if self.path is not None:
            doc = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": self.entries}
            write_text(self.path, json.dumps(jsonable(doc), indent=1, allow_nan=False) + "\n")


def digest(*parts: Any) -> str:
    h = hashlib.sha1()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(str((tuple(p.shape), p.dtype)).encode())
            h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                     if p.numel() else b"")
        else:
            h.update(json.dumps(jsonable(p), sort_keys=True).encode())
    return h.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """Class, parameter names, shapes and sums: changes when the weights do (cheap, no full hash)."""
    parts: list[Any] = [type(model).__qualname__]
    with torch.no_grad():
        for name, p in model.state_dict().items():
            parts.append([name, list(p.shape), float(p.double().sum()) if p.is_floating_point() else int(p.sum())])
    return digest(*parts)


# ------------------------------------------------------------------------------------------------ evaluator
class Evaluator:
    """Fidelity and FLOPs of candidates on one model and its calibration inputs (one capture, many rewrites)."""

    def __init__(self, model: torch.nn.Module, batches: list[Inputs], *, metric: Metric | None = None,
                 fixed: Mapping[str, Any] | None = None, cache: Cache | None = None) -> None:
        self.model = model
        self.batches = batches
        self.metric = metric
        self.metric_name = metric_name(metric)
        self.fixed = dict(fixed or {})
        self.cache = cache or Cache(None)
        self.example = batches[0]
        args, kwargs = self.example
        with trace_lock(), torch.no_grad():
            self.captured = export_graph(model, args, kwargs, dynamic_batch=True)
            self.full_flops = count_flops(model, args, kwargs)
        if not self.captured.dynamic_batch:
            b0 = batch_of(*self.example)
            odd = [i for i, (a, k) in enumerate(batches) if batch_of(a, k) != b0]
            if odd:
                raise TokenReduceError(
                    f"{self.captured.static_batch_reason}; the calibration batches must then all have batch "
                    f"{b0} (batch {odd[0]} differs)", setting="calib")
        with torch.inference_mode():
            self.full_outputs = [model(*a, **k) for a, k in batches]
        self.samples = sum(batch_of(a, k) or 1 for a, k in batches)
        self.fingerprint = digest(model_fingerprint(model), *[t for a, k in batches for t in tensor_leaves((a, k))],
                                  self.fixed, self.metric_name)
        self.seconds = 0.0

    def settings(self, c: Candidate) -> Settings:
        return Settings.from_options({**c.settings, **self.fixed, "inner": "eager"})

    def rewrite(self, c: Candidate) -> tuple[fx.GraphModule, Report]:
        """The candidate's rewritten graph (eager) and its report with FLOPs counted."""
        settings = self.settings(c)
        gm = fx.GraphModule(self.captured.gm, copy.deepcopy(self.captured.gm.graph))
        with trace_lock():
            red = reduce_graph(gm, settings)
            report = make_report(red, settings)
            report.flops_before = self.full_flops
            args, kwargs = self.example
            report.flops_after = count_flops(red.gm, args, kwargs)
        release_fake_caches(red.gm)
        return red.gm, report

    def score(self, full: Any, reduced: Any) -> float:
        value = output_cosine(full, reduced) if self.metric is None else self.metric(full, reduced)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise TokenReduceError(f"metric {self.metric_name} must return a finite number (higher = closer to the "
                                   f"full model), got {value!r}", setting="metric")
        return float(value)

    def is_cached(self, c: Candidate) -> bool:
        """Whether the cache holds this candidate's fidelity and FLOPs (evaluating it costs nothing)."""
        return self.cache.get(f"fid:{self.fingerprint}:{c.key}") is not None

    def evaluate(self, c: Candidate) -> dict[str, Any]:
        """{fidelity, flops_ratio, tokens_out, seconds} of a candidate (from the cache when measured before)."""
        key = f"fid:{self.fingerprint}:{c.key}"
        hit = self.cache.get(key)
        if hit is not None:
            return {**hit, "cached": True}
        t0 = time.perf_counter()
        gm, report = self.rewrite(c)
        scores, weights = [], []
        with torch.inference_mode():
            for (args, kwargs), full in zip(self.batches, self.full_outputs):
                scores.append(self.score(full, gm(*args, **kwargs)))
                weights.append(batch_of(args, kwargs) or 1)
        fidelity = sum(s * w for s, w in zip(scores, weights)) / sum(weights)
        blocks = report.blocks
        seconds = time.perf_counter() - t0
        value = {"fidelity": fidelity, "flops_ratio": report.flops_ratio,
                 "tokens_out": blocks[-1].tokens_out if blocks else None, "seconds": seconds}
        self.seconds += seconds
        self.cache.put(key, value)
        return {**value, "cached": False}


BASELINES: dict[str, Any] = {}  # prepared unreduced models by meter fingerprint: tune() calls in one process share
KEEP_BASELINES = 2


class LatencyMeter:
    """Measured latency ratio of candidates on one target at one batch size, against one unreduced baseline
    (prepared once per model, inputs, target, batch and threads in a process, so repeated `tune` calls on the same
    model, as `tuning/compare.py` makes, do not lower it again)."""

    def __init__(self, model: torch.nn.Module, example: Inputs, target: str, batch: int, *, fixed: Mapping[str, Any],
                 fingerprint: str, cache: Cache, threads: int | None = None, repeats: int = 10,
                 warmup: int = 2) -> None:
        from tokenreduce.bench import default_threads

        self.model = model
        self.inputs = rows(example, batch)
        self.target, self.batch = target, batch
        self.threads = threads or default_threads()
        self.repeats, self.warmup = repeats, warmup
        self.fixed = dict(fixed)
        self.cache = cache
        self.fingerprint = digest(fingerprint, target, batch, self.threads, repeats, warmup)
        self._base: Any = None

    def cached(self, c: Candidate) -> bool:
        """Whether the candidate's latency is already in the cache (measuring it costs nothing)."""
        return self.cache.get(f"lat:{self.fingerprint}:{c.key}") is not None

    def measure(self, c: Candidate) -> dict[str, Any]:
        """{latency_ratio, unreduced_ms, reduced_ms, iqr_reduced_ms} of a candidate (cached when measured)."""
        from tokenreduce.bench import interleaved, iqr, prepare_baseline, prepare_reduced

        key = f"lat:{self.fingerprint}:{c.key}"
        hit = self.cache.get(key)
        if hit is not None:
            return {**hit, "cached": True}
        args, kwargs = self.inputs
        torch.set_num_threads(self.threads)
        if self._base is None:
            self._base = BASELINES.get(self.fingerprint)
        if self._base is None:
            self._base = prepare_baseline(self.model, args, kwargs, self.target, dynamic_batch=False,
                                          threads=self.threads)
            while len(BASELINES) >= KEEP_BASELINES:
                BASELINES.pop(next(iter(BASELINES)))
            BASELINES[self.fingerprint] = self._base
        red, _ = prepare_reduced(self.model, args, kwargs, self.target, {**c.settings, **self.fixed},
                                 dynamic_batch=False, threads=self.threads)
        timing = interleaved(self._base.bind(args, kwargs), red.bind(args, kwargs), self.repeats, self.warmup)
        value = {"latency_ratio": timing.median_reduced_ms / timing.median_unreduced_ms,
                 "unreduced_ms": timing.median_unreduced_ms, "reduced_ms": timing.median_reduced_ms,
                 "iqr_reduced_ms": iqr(timing.samples_reduced_ms)}
        self.cache.put(key, value)
        return {**value, "cached": False}
