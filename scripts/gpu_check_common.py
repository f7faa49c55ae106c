"""What every section of `scripts/gpu_check.py` shares: its record, time budget, environment and timing.

A section runs in its own process (a CUDA fault or a hung compile then costs one section, not the run)
and writes `OUTDIR/<section>.json` after every result, so whatever it finished survives a kill at the
budget. This module imports only the standard library and torch at module level: a section still
records its environment and the traceback when tokenreduce, timm or transformers fail to import on the
machine (the GPU image has other library versions than our venv and nothing can be installed there).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "triton", "transformers", "timm", "onnxruntime")


def version_of(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The checkout's commit, when the copy has its .git (the device copy may not)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def env_info(device: str) -> dict[str, Any]:
    """Versions, GPU, capability and date: what a number needs next to it to mean anything."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: version_of(name) for name in PACKAGES},
        "torch_version": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "device": device,
        "git_commit": git_commit(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "TOKENREDUCE_KERNELS": os.environ.get("TOKENREDUCE_KERNELS"),
        "cpu_count": os.cpu_count(),
    }
    if device == "cuda":
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(gpu=torch.cuda.get_device_name(idx), capability=list(torch.cuda.get_device_capability(idx)),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    else:
        info.update(gpu=None, capability=None)
    return info


def jsonable(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become the strings "NaN" / "Infinity" / "-Infinity" (visible in
    the file and failing any finiteness check), tuples become lists, other objects their `str`."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return str(obj)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=1, allow_nan=False))
    tmp.replace(path)


class Section:
    """One section's record: its environment, plan, results, skips and errors, saved after every change.

    `status` ends as "passed" (no error, every result passed, nothing skipped), "incomplete" (no error or
    failure, but the time budget left work undone: `skipped` says what and why) or "failed"."""

    def __init__(self, name: str, outdir: Path, budget_s: float, dry_run: bool, device: str) -> None:
        self.name = name
        self.path = outdir / f"{name}.json"
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.data: dict[str, Any] = {
            "section": name, "status": "running", "dry_run": dry_run, "budget_s": budget_s, "wall_s": 0.0,
            "env": env_info(device), "plan": {}, "results": [], "skipped": [], "errors": [], "notes": [],
        }
        self.save()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def progress(self, msg: str) -> None:
        print(f"[gpu_check {self.name} {self.elapsed():6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        self.data["wall_s"] = round(self.elapsed(), 2)
        write_json(self.path, self.data)

    def add(self, result: dict[str, Any]) -> None:
        self.data["results"].append(result)
        self.save()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.save()

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append({"what": what, "why": why})
        self.progress(f"SKIP {what}: {why}")
        self.save()

    def error(self, where: str, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.data["errors"].append({"where": where, "error": f"{type(exc).__name__}: {exc}", "traceback": tb})
        self.progress(f"ERROR {where}: {type(exc).__name__}: {exc}")
        self.save()

    @contextmanager
    def guard(self, where: str) -> Iterator[None]:
        """Record an exception raised in the block as this section's error and carry on after the block."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - a section records every failure and goes on
            self.error(where, exc)

    def afford(self, what: str, estimate_s: float) -> bool:
        """True when `estimate_s` fits in what is left of the budget; else records the skip."""
        if self.left() >= estimate_s:
            return True
        self.skip(what, f"time budget: {self.left():.0f} s of {self.budget_s:.0f} s left, needs ~{estimate_s:.0f} s")
        return False

    def finish(self, failed: bool) -> None:
        if failed or self.data["errors"]:
            self.data["status"] = "failed"
        else:
            self.data["status"] = "incomplete" if self.data["skipped"] else "passed"
        self.progress(f"done: {self.data['status']} ({len(self.data['results'])} results, "
                      f"{len(self.data['skipped'])} skipped, {len(self.data['errors'])} errors)")
        self.save()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def synced(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """`fn` followed by a device synchronisation, so wall-clock time covers the GPU work."""

    def call() -> Any:
        out = fn()
        synchronize(device)
        return out

    return call


def kernel_ms(fn: Callable[[], Any], device: str, reps: int, rounds: int = 5) -> float:
    """Milliseconds per call: the median over `rounds` of the mean of `reps` back-to-back calls (CUDA events
    on a GPU, so launch overlap counts as it does in a model; wall clock on the CPU), after warm-up calls."""
    for _ in range(3 if device == "cuda" else 1):
        fn()
    synchronize(device)
    means = []
    for _ in range(rounds):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            means.append(start.elapsed_time(end) / reps)
        else:
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            means.append((time.perf_counter() - t) * 1e3 / reps)
    return statistics.median(means)


def add_repo_to_path() -> None:
    """Import tokenreduce from this working tree (the GPU machine runs an uninstalled copy)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
