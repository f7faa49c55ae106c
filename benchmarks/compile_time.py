"""Compile time to the first result: plain `torch.compile` against `tokenreduce.compile`, stage by stage.

Issue 10 measured `tokenreduce.compile` of ViT-B/16 at 89-127 s to its first result against 17-19 s for a
plain `torch.compile`. This script says where that time goes. For a timm model (random init, eval, under
`no_grad`) and each batch size it runs, each in a fresh process:

* `plain`   -- `torch.compile(model)` and its first call (what a user of plain inductor waits for);
* `compile` -- `tokenreduce.compile(model, x, method="tome", r=13)` plus its first call, end to end;
* `stages`  -- the same work, calling the internals one after the other the way `compile()` in
  `tokenreduce/compiler/api.py` does, each timed: settings, `export_graph`, `reduce_graph` (split into the
  analysis/planning and each pass of `report.pass_seconds`), the report, FLOP counting (before/after),
  `lower_inductor`, and the first call (Dynamo trace + inductor compile + run; Dynamo's own per-phase
  seconds are kept in the JSON).

Methodology
-----------
* Fresh processes: every measurement runs in its own subprocess, so nothing (imports, Dynamo caches,
  inductor's in-memory caches) carries over from an earlier measurement.
* Fresh inductor caches: each subprocess gets `TORCHINDUCTOR_CACHE_DIR` set to a new empty temporary folder
  (deleted afterwards), so inductor's on-disk FX graph cache, code cache and autotuning results from earlier
  runs (or other users) never make a compile look fast. Every number is a cold compile.
* Model construction and `import torch`/`timm` are outside the timed region; the imports of tokenreduce are
  done before timing too (they are paid once per process by any user of the package).
* Noise: the machine may be shared. `--repeats N` (default 2) runs every measurement N times, interleaved
  (plain, compile, stages, plain, ...), and the table shows medians; the load average (`os.getloadavg`)
  before each run is kept in the JSON and its range printed.

Usage:
    python benchmarks/compile_time.py                                   # ViT-B/16, batch 1 and 8, 2 repeats
    python benchmarks/compile_time.py --model vit_tiny_patch16_224 --batch 1 --repeats 1   # quick
    python benchmarks/compile_time.py --modes stages --batch 8 --json out/compile_time.json
    python benchmarks/compile_time.py --modes stages --batch 1 --profile out/prof   # cProfile per stage
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODES = ("plain", "compile", "stages")


# ---------------------------------------------------------------------------------------------- worker


def _build(model_name: str, batch: int) -> tuple[Any, Any]:
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    input_size: tuple[int, ...] = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
    x = torch.randn(batch, *input_size)
    return model, x


class _Clock:
    """Times named stages in order; optionally profiles each with cProfile into `profile_dir`."""

    def __init__(self, profile_dir: str | None) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # this process's CPU seconds (not inductor's compile workers)
        self.profile_dir = Path(profile_dir) if profile_dir else None

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        c0, t0 = time.process_time(), time.perf_counter()
        if self.profile_dir is not None:
            import cProfile

            prof = cProfile.Profile()
            out = prof.runcall(fn)
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            prof.dump_stats(str(self.profile_dir / f"{name}.prof"))
        else:
            out = fn()
        self.seconds[name] = time.perf_counter() - t0
        self.cpu[name] = time.process_time() - c0
        return out


def _dynamo_times() -> dict[str, float]:
    """Dynamo's and inductor's accumulated seconds per phase (`torch._dynamo.utils.compile_times`)."""
    from torch._dynamo.utils import compile_times

    table = compile_times(repr="csv", aggregate=True)
    names, values = table if isinstance(table, tuple) else ([], [])
    out = {}
    for n, v in zip(names, values):
        try:
            out[str(n)] = float(str(v))
        except ValueError:
            continue
    return out


def worker(mode: str, model_name: str, batch: int, options: dict[str, Any], profile_dir: str | None
           ) -> dict[str, Any]:
    import torch

    import tokenreduce  # noqa: F401 - imported before timing: every user pays it once per process

    model, x = _build(model_name, batch)
    clock = _Clock(profile_dir)
    out: dict[str, Any] = {"mode": mode, "model": model_name, "batch": batch, "threads": torch.get_num_threads()}
    with torch.no_grad():
        t0 = time.perf_counter()
        if mode == "plain":
            compiled = clock.run("construct", lambda: torch.compile(model))
            clock.run("first_call", lambda: compiled(x))
        elif mode == "compile":
            reduced = clock.run("construct", lambda: tokenreduce.compile(model, x, **options))
            clock.run("first_call", lambda: reduced(x))
            out["pass_seconds"] = dict(reduced.report.pass_seconds)
            out["flops"] = [reduced.report.flops_before, reduced.report.flops_after]
        else:
            out.update(_stages(model, x, options, clock))
        out["total"] = time.perf_counter() - t0
    out["seconds"] = clock.seconds
    out["cpu_seconds"] = clock.cpu
    out["dynamo"] = _dynamo_times()
    return out


def _stages(model: Any, x: Any, options: dict[str, Any], clock: _Clock) -> dict[str, Any]:
    """The body of `tokenreduce.compile` (compiler/api.py), one timed stage per step, then the first call."""
    from tokenreduce.compiler import api
    from tokenreduce.compiler.capture import export_graph
    from tokenreduce.compiler.pipeline import make_report, reduce_graph
    from tokenreduce.compiler.report import count_flops
    from tokenreduce.methods import registry
    from tokenreduce.methods.settings import Settings
    from tokenreduce.targets import lower_eager, lower_inductor

    options = dict(options)
    count = options.pop("count_model_flops", True)

    def settings() -> Any:
        cfg = Settings.from_options(options)
        registry.encoder(cfg.method)
        return cfg

    cfg = clock.run("settings", settings)
    args, kwargs = api.split_inputs(x, None)
    captured = clock.run("export_graph", lambda: export_graph(model, args, kwargs, dynamic_batch=cfg.dynamic_batch))
    red = clock.run("reduce_graph", lambda: reduce_graph(captured.gm, cfg))
    report = clock.run("make_report", lambda: make_report(red, cfg))
    if count:
        report.flops_before = clock.run("count_flops_before", lambda: count_flops(model, args, kwargs))
        report.flops_after = clock.run("count_flops_after", lambda: count_flops(red.gm, args, kwargs))
    inputs = list(args) + list(kwargs.values())
    if cfg.inner == "inductor":
        runner = clock.run("lower_inductor", lambda: lower_inductor(red.gm, captured.dynamic_batch, inputs))
    else:
        runner = clock.run("lower_eager", lambda: lower_eager(red.gm))
    clock.run("first_call", lambda: runner(*args, **kwargs))
    return {"pass_seconds": dict(report.pass_seconds), "flops": [report.flops_before, report.flops_after],
            "dynamic_batch": captured.dynamic_batch}


# ---------------------------------------------------------------------------------------------- driver


def run_one(mode: str, model: str, batch: int, options: dict[str, Any], pythonpath: str | None,
            profile_dir: str | None, keep_cache: bool) -> dict[str, Any]:
    cache = tempfile.mkdtemp(prefix="tr_inductor_cache_")
    env = dict(os.environ)
    env["TORCHINDUCTOR_CACHE_DIR"] = cache
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, __file__, "--worker", mode, "--model", model, "--batch", str(batch),
           "--options", json.dumps(options)]
    if profile_dir:
        cmd += ["--profile", str(Path(profile_dir) / f"{mode}_b{batch}")]
    load = os.getloadavg()[0]
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    finally:
        if not keep_cache:
            shutil.rmtree(cache, ignore_errors=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} batch {batch} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    res: dict[str, Any] = json.loads(lines[-1])
    res["load_before"] = load
    res["process_wall"] = wall
    # CPU seconds of the worker and everything it waited for (inductor's compile workers, the C++ compiler):
    # robust to other jobs on a shared machine, unlike wall time
    res["process_cpu"] = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return res


Row = dict[str, Any]
Key = Callable[[Row], "float | None"]


def _median(rows: list[Row], key: Key) -> float | None:
    vals = [v for v in (key(r) for r in rows) if v is not None]
    return statistics.median(vals) if vals else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _stage(name: str, field: str = "seconds") -> Key:
    return lambda r: r.get(field, {}).get(name)


def _pass(name: str) -> Key:
    return lambda r: r.get("pass_seconds", {}).get(name)


def _analysis(r: Row) -> float | None:
    """reduce_graph minus its passes: the block analysis and the method's plan."""
    if "reduce_graph" not in r["seconds"]:
        return None
    return float(r["seconds"]["reduce_graph"] - sum(r.get("pass_seconds", {}).values()))


def print_table(results: list[Row], batches: list[int]) -> None:
    """Medians per batch size: wall seconds, and CPU seconds (the worker's own for a stage; the worker's plus
    the C++ compiler's and inductor's compile workers' for a whole run)."""
    lines: list[tuple[str, list[str]]] = []

    def add(label: str, mode: str, wall: Key, cpu: Key | None = None) -> None:
        cells = []
        for b in batches:
            rows = [r for r in results if r["mode"] == mode and r["batch"] == b]
            w = _median(rows, wall)
            c = _median(rows, cpu) if cpu is not None else None
            cells += [_fmt(w), _fmt(c)]
        lines.append((label, cells))

    total: Key = lambda r: r["total"]  # noqa: E731
    cpu_total: Key = lambda r: r["process_cpu"]  # noqa: E731
    add("plain torch.compile: first result", "plain", total, cpu_total)
    add("tokenreduce.compile: first result", "compile", total, cpu_total)
    add("  construct (tokenreduce.compile)", "compile", _stage("construct"), _stage("construct", "cpu_seconds"))
    add("  first call", "compile", _stage("first_call"), _stage("first_call", "cpu_seconds"))
    stage_names: list[str] = []
    pass_names: list[str] = []
    for r in results:
        if r["mode"] == "stages":
            stage_names += [s for s in r["seconds"] if s not in stage_names]
            pass_names += [p for p in r.get("pass_seconds", {}) if p not in pass_names]
    if stage_names:
        add("stages (same work, step by step)", "stages", total, cpu_total)
    for s in stage_names:
        add(f"  {s}", "stages", _stage(s), _stage(s, "cpu_seconds"))
        if s == "reduce_graph":
            add("    analysis + planning", "stages", _analysis)
            for p in pass_names:
                add(f"    pass {p}", "stages", _pass(p))
    ratios = []
    for b in batches:
        plain = _median([r for r in results if r["mode"] == "plain" and r["batch"] == b], total)
        comp = _median([r for r in results if r["mode"] == "compile" and r["batch"] == b], total)
        ratios += [f"{comp / plain:.2f}x" if plain and comp else "-", ""]
    lines.append(("tokenreduce.compile / plain (wall)", ratios))
    width = max(len(label) for label, _ in lines)
    head = "".join(f"{'batch ' + str(b) + ' wall':>14}{'cpu':>8}" for b in batches)
    print(f"{'seconds (median)':<{width}}{head}")
    for label, cells in lines:
        print(f"{label:<{width}}" + "".join(f"{c:>14}{d:>8}" for c, d in zip(cells[::2], cells[1::2])))
    loads = [r["load_before"] for r in results]
    print(f"runs: {len(results)}; load average (1 min) before a run: {min(loads):.1f}..{max(loads):.1f} on "
          f"{os.cpu_count()} CPUs; each run a fresh process with a fresh TORCHINDUCTOR_CACHE_DIR")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name (random init)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--repeats", type=int, default=2, help="runs per measurement (median reported)")
    p.add_argument("--method", default="tome")
    p.add_argument("--r", type=int, default=13)
    p.add_argument("--static-batch", action="store_true", help="tokenreduce.compile(..., dynamic_batch=False)")
    p.add_argument("--no-flops", action="store_true", help="tokenreduce.compile(..., count_model_flops=False)")
    p.add_argument("--pythonpath", help="import tokenreduce from here (e.g. a worktree of an older commit)")
    p.add_argument("--profile", metavar="DIR", help="cProfile each stage into DIR/<mode>_b<batch>/<stage>.prof")
    p.add_argument("--keep-cache", action="store_true", help="keep each run's inductor cache folder")
    p.add_argument("--json", metavar="PATH", help="write every run and the settings here")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.model, a.batch[0], json.loads(a.options), a.profile)), flush=True)
        return
    options: dict[str, Any] = {"method": a.method, "r": a.r}
    if a.static_batch:
        options["dynamic_batch"] = False
    if a.no_flops:
        options["count_model_flops"] = False
    results: list[dict[str, Any]] = []
    for rep in range(a.repeats):
        for b in a.batch:
            for mode in a.modes:
                res = run_one(mode, a.model, b, options, a.pythonpath, a.profile if rep == 0 else None, a.keep_cache)
                res["repeat"] = rep
                results.append(res)
                print(f"[{rep + 1}/{a.repeats}] {mode:<8} batch {b}: {res['total']:.1f} s "
                      f"(load {res['load_before']:.1f})", file=sys.stderr, flush=True)
    print(f"{a.model}, {a.method} r={a.r}, dynamic_batch={not a.static_batch}, "
          f"count_model_flops={not a.no_flops}, tokenreduce from {a.pythonpath or 'this checkout'}")
    print_table(results, a.batch)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"model": a.model, "options": options, "pythonpath": a.pythonpath,
                                            "runs": results}, indent=2))


if __name__ == "__main__":
    main()
