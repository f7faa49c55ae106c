"""Old tokenreduce against new tokenreduce in one process: latency and compile time, interleaved.

Issue 10 restructured the package (method registry, pass manager, target interface) with "behaviour
unchanged" as the contract. This script is the proof for speed: it runs the code of an older commit and the
code of the working tree side by side, on the same model weights, in the same process, so machine drift on a
shared box hits both the same way.

Two steps:

    # 1. copy the old package out of git, renamed, into a folder outside the repository
    python benchmarks/compare_versions.py --prepare b723257 --old-dir /tmp/tokenreduce_versions
    # 2. measure
    python benchmarks/compare_versions.py --old-dir /tmp/tokenreduce_versions --model vit_base_patch16_224 \
        --batch 1,8 --targets inductor,onnxruntime --repeats 20 --json docs/version_compare.json

`--prepare REF` takes `tokenreduce/` of commit REF with `git archive` (nothing in the repository or its
worktree list changes), rewrites every whole-word `tokenreduce` to `tokenreduce_old` (module paths, the
`torch.library` namespace `tokenreduce::`, `torch.ops.tokenreduce`, the Dynamo backend name, the logger
name) and writes it to `DIR/tokenreduce_old` with a record `DIR/tokenreduce_old.json` (ref, commit, files,
replacements). It then checks, in a fresh process, that `import tokenreduce_old` loads nothing of
`tokenreduce`, that both import together, that every module of each comes from its own folder, and that the
two register distinct custom ops (`tokenreduce_old::tome_plan` beside `tokenreduce::tome_plan`). It refuses
a DIR inside the repository unless git ignores it, so the old copy is never committed.

The measurement, for every batch size and target (`inductor`, `onnxruntime`), builds three models of one
timm model instance (random init, `eval()`, seed 0), each inside a fresh inductor cache
(`torch._inductor.utils.fresh_cache`: the second version must not reuse kernels the first one compiled):

* `unreduced`: inductor: `prepare_baseline` of `tokenreduce/bench.py` (`torch.compile(model, dynamic=True)`);
  onnxruntime: the new code's `method="none"` graph exported by the new onnx target, as `bench` does.
* `old`: inductor: `tokenreduce_old.compile(model, x, method="tome", r=R)`; onnxruntime:
  `tokenreduce_old.compile(..., inner="eager")` then `tokenreduce_old.targets.onnx.export_onnx` (verified).
* `new`: inductor: `tokenreduce.compile(model, x, method="tome", r=R)`; onnxruntime:
  `tokenreduce.compile(..., inner="eager")` then the onnx target's `lower` (exported, checked, verified).

Compile time is the construction (capture, passes, FLOP counting; for onnxruntime also export, checks,
verification and the session) plus the first call (for inductor: Dynamo and inductor run there), each kept
apart. The old and new models are built in alternating order: for each target the order flips from one
batch size to the next (and the two targets start with different versions), so neither version is always
the one built second.
Every onnxruntime session that is timed is opened by this script with one set of options (intra-op threads
= `--threads`, one inter-op thread, all graph optimisations, CPU provider), so the two versions' files run
under identical session settings. The old path's session is that one (the old `bench` opened its session
itself, with these options); the new target opens its own session inside `lower`, which counts in its
compile time, and the second session opened here to time it is left out (`session_reopen_s` in the JSON).

Timing: `--warmup` untimed rounds, then `--repeats` rounds of unreduced, old, new, unreduced, old, new, ...
(`interleaved_rounds` below: `tokenreduce.bench.interleaved` times two callables, this extends it to three
with the same rules and `tokenreduce.bench.time_call`), under `torch.inference_mode()`. Reported: medians
and interquartile ranges per model, speedup of each version over unreduced, the ratio of medians new/old and
the median (and IQR) of the per-round ratios new/old, which pairs calls made a moment apart. The first-call
outputs of old and new are compared (the restructure must not change results); a difference past `--atol`
is reported in the table and the JSON, not hidden.

The JSON keeps the commit of the new code (`git rev-parse HEAD`), the uncommitted changes under
`tokenreduce/` at the start of the run and a hash of the package files imported, the old commit, the load
average before every build and timing block, and every sample.

Refuses: `--repeats` below 1, an `--old-dir` that `--prepare` did not write, old and new versions that share
modules or custom ops, and targets other than inductor and onnxruntime (eager needs no compiler and is not
what issue 10 asks about).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
NEW_NAME = "tokenreduce"
OLD_NAME = "tokenreduce_old"
WORD = re.compile(r"(?<![A-Za-z0-9_])tokenreduce(?![A-Za-z0-9_])")
TARGETS = ("inductor", "onnxruntime")
VERSIONS = ("unreduced", "old", "new")
Call = Callable[[], Any]


def fail(message: str) -> SystemExit:
    return SystemExit(f"compare_versions: error: {message}")


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise fail(f"git {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


# --------------------------------------------------------------------------------------------- prepare
def record_path(old_dir: Path) -> Path:
    return old_dir / f"{OLD_NAME}.json"


def rename_tree(src: Path, dest: Path) -> dict[str, int]:
    """Copy `src` to `dest`, rewriting whole-word `tokenreduce` to `tokenreduce_old` in every text file.
    Returns replacements per file (relative path). Refuses a binary file that names the package."""
    counts: dict[str, int] = {}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        out = dest / rel
        if path.is_dir():
            out.mkdir(parents=True, exist_ok=True)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            if b"tokenreduce" in data:
                raise fail(f"{rel} is not UTF-8 text but names tokenreduce; cannot rename it safely") from None
            out.write_bytes(data)
            continue
        new_text, n = WORD.subn(OLD_NAME, text)
        out.write_text(new_text, encoding="utf-8")
        counts[str(rel)] = n
    return counts


def prepare(ref: str, old_dir: Path) -> dict[str, Any]:
    """Write the renamed package of commit `ref` to `old_dir/tokenreduce_old` and check it (fresh process)."""
    commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    old_dir = old_dir.resolve()
    if old_dir == REPO or REPO in old_dir.parents:
        ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(old_dir)]).returncode == 0
        if not ignored:
            raise fail(f"--old-dir {old_dir} is inside the repository and not ignored by git; use a folder under "
                       f"/tmp (the old copy must never be committed)")
    dest = old_dir / OLD_NAME
    if dest.exists():
        if not record_path(old_dir).exists():
            raise fail(f"{dest} exists but was not written by --prepare ({record_path(old_dir).name} missing); "
                       f"remove it or choose another --old-dir")
        shutil.rmtree(dest)
    old_dir.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, NEW_NAME],
                             capture_output=True, check=True).stdout
    with tempfile.TemporaryDirectory(prefix="compare-versions-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        counts = rename_tree(Path(tmp) / NEW_NAME, dest)
    record = {"ref": ref, "commit": commit, "files": len(counts), "replacements": sum(counts.values()),
              "per_file": counts}
    record_path(old_dir).write_text(json.dumps(record, indent=2))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--check", "--old-dir", str(old_dir)],
                          capture_output=True, text=True, cwd=str(REPO))
    if done.returncode != 0:
        raise fail(f"the renamed copy of {commit[:9]} does not import beside tokenreduce:\n{done.stderr.strip()}")
    print(done.stdout.strip())
    print(f"prepared {dest}: {ref} = {commit}, {len(counts)} files, {sum(counts.values())} replacements")
    return record


def check_versions(old_dir: Path) -> dict[str, Any]:
    """Import both versions into this process and check they are apart: modules from their own folders,
    distinct custom-op namespaces. When neither was imported yet, also check the old one alone pulls in
    nothing of the new one. Raises SystemExit naming each problem."""
    old_dir = old_dir.resolve()
    if not record_path(old_dir).exists():
        raise fail(f"{old_dir} was not prepared; run --prepare OLD_REF --old-dir {old_dir} first")
    old_root = (old_dir / OLD_NAME).resolve()
    problems: list[str] = []
    fresh = NEW_NAME not in sys.modules and OLD_NAME not in sys.modules
    if str(old_dir) not in sys.path:
        sys.path.insert(0, str(old_dir))
    old = importlib.import_module(OLD_NAME)
    if fresh and NEW_NAME in sys.modules:
        problems.append(f"import {OLD_NAME} imported {NEW_NAME} (a reference the rename missed)")
    new = importlib.import_module(NEW_NAME)
    new_root = Path(new.__file__ or "").resolve().parent
    if Path(old.__file__ or "").resolve().parent != old_root:
        problems.append(f"{OLD_NAME} was imported from {old.__file__}, not {old_root}")
    for name, mod in list(sys.modules.items()):
        file = getattr(mod, "__file__", None)
        if file is None:
            continue
        where = Path(file).resolve()
        if (name == OLD_NAME or name.startswith(OLD_NAME + ".")) and old_root not in where.parents:
            problems.append(f"module {name} comes from {where}, outside {old_root}")
        if (name == NEW_NAME or name.startswith(NEW_NAME + ".")) and new_root not in where.parents:
            problems.append(f"module {name} comes from {where}, outside {new_root}")
    all_ops = torch._C._dispatch_get_all_op_names()
    old_ops = sorted(n.split("::", 1)[1] for n in all_ops if n.startswith(OLD_NAME + "::"))
    new_ops = sorted(n.split("::", 1)[1] for n in all_ops if n.startswith(NEW_NAME + "::"))
    if not old_ops:
        problems.append(f"no custom ops registered under {OLD_NAME}::")
    if not new_ops:
        problems.append(f"no custom ops registered under {NEW_NAME}::")
    shared = sorted(set(old_ops) & set(new_ops))
    for op in shared:
        a = getattr(getattr(torch.ops, OLD_NAME), op).default
        b = getattr(getattr(torch.ops, NEW_NAME), op).default
        if a is b or a.name() == b.name():
            problems.append(f"op {op}: the two versions resolve to the same op {a.name()}")
    if problems:
        raise fail("the two versions are not apart:\n  " + "\n  ".join(problems))
    return {"old_root": str(old_root), "new_root": str(new_root), "old_ops": old_ops, "new_ops": new_ops,
            "shared_op_names": shared, "checked_old_alone": fresh}


# --------------------------------------------------------------------------------------------- run info
def package_hash(root: Path) -> str:
    """sha256 over the package's .py files (path and content): which code was imported, committed or not."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def code_state(new_root: Path, old_dir: Path) -> dict[str, Any]:
    status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", NEW_NAME], capture_output=True,
                            text=True, check=True).stdout  # not stripped: the first column is part of a line
    return {
        "new_commit": git("rev-parse", "HEAD"),
        "new_uncommitted": [line for line in status.splitlines() if line.strip()],
        "new_package_sha256": package_hash(new_root),
        "old": {k: v for k, v in json.loads(record_path(old_dir).read_text()).items() if k != "per_file"},
    }


def machine_info(threads: int) -> dict[str, Any]:
    import onnxruntime

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores_available": len(os.sched_getaffinity(0)), "threads": threads,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# --------------------------------------------------------------------------------------------- building
@dataclass
class Built:
    """One model ready to time: its bound call and what building it cost."""

    version: str
    call: Call = field(repr=False)
    construct_s: float
    first_call_s: float
    output: torch.Tensor = field(repr=False)
    load_before: list[float]
    flops_after: int | None = None
    pass_seconds: dict[str, float] = field(default_factory=dict)
    onnx_dynamic_batch: bool | None = None
    session_reopen_s: float = 0.0  # the timed session opened beside the path's own one; not in construct_s
    keep: list[Any] = field(default_factory=list, repr=False)  # modules / sessions the call needs alive

    @property
    def compile_s(self) -> float:
        return self.construct_s + self.first_call_s


def ort_session(path: Path, threads: int) -> Any:
    """The one way every timed onnxruntime session is opened (same options for every version: the new code's
    `cpu_session`, whichever version exported the file)."""
    from tokenreduce.targets.onnx import cpu_session

    return cpu_session(path, threads)


def session_call(sess: Any, x: torch.Tensor) -> tuple[Call, bool]:
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise fail(f"expected one ONNX input (the image batch), the file has {[i.name for i in inputs]}")
    feeds = {inputs[0].name: x.numpy()}
    dynamic = not isinstance(inputs[0].shape[0], int)
    return (lambda: sess.run(None, feeds)), dynamic


def as_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, list) and out:  # onnxruntime: list of numpy arrays
        return torch.from_numpy(out[0].copy())
    raise fail(f"cannot read a tensor from a {type(out).__name__} output")


@dataclass
class Made:
    """What a builder returns: the bound call, the objects it needs alive, the compile report (reduced
    models), and seconds spent inside the builder that are not the version's own cost (`reopen_s`)."""

    call: Call
    keep: list[Any]
    report: Any
    reopen_s: float = 0.0


class Builders:
    """How each (version, target) is built; `old` and `new` are the two imported packages."""

    def __init__(self, old: Any, new: Any, model: torch.nn.Module, options: dict[str, Any], threads: int,
                 atol: float, scratch: Path) -> None:
        self.old, self.new, self.model, self.options = old, new, model, options
        self.threads, self.atol, self.scratch = threads, atol, scratch

    def inductor(self, version: str, x: torch.Tensor) -> Made:
        if version == "unreduced":
            bench = importlib.import_module(f"{NEW_NAME}.bench")
            lowered = bench.prepare_baseline(self.model, (x,), {}, "inductor", dynamic_batch=True,
                                             threads=self.threads)
            return Made(lowered.bind((x,), {}), [lowered], None)
        pkg = self.old if version == "old" else self.new
        red = pkg.compile(self.model, (x,), **self.options)
        return Made(lambda: red(x), [red], red.report)

    def onnxruntime(self, version: str, x: torch.Tensor) -> Made:
        path = self.scratch / f"{version}-b{x.shape[0]}.onnx"
        reopen_s = 0.0
        if version == "old":
            red = self.old.compile(self.model, (x,), inner="eager", **self.options)
            onnx_mod = importlib.import_module(f"{OLD_NAME}.targets.onnx")
            onnx_mod.export_onnx(red, path, verify=True, atol=self.atol)
        else:
            if version == "unreduced":  # what `bench` does for a baseline on an exporting target
                red = self.new.compile(self.model, (x,), method="none", inner="eager", count_model_flops=False)
            else:
                red = self.new.compile(self.model, (x,), inner="eager", **self.options)
            targets = importlib.import_module(f"{NEW_NAME}.targets")
            options = targets.TargetOptions(threads=self.threads, atol=self.atol, output=path, verify=True)
            lowered = targets.by_runtime("onnxruntime").lower(red.graph_module, red.example_args,
                                                               red.example_kwargs, options)
            del lowered  # its own session is part of the new path's cost; the timed one is opened below
        t0 = time.perf_counter()
        sess = ort_session(path, self.threads)  # old: its path's session (as the old bench opened it)
        if version != "old":  # new / unreduced: a second session, opened only to share options with old
            reopen_s = time.perf_counter() - t0
        call, _ = session_call(sess, x)
        return Made(call, [sess], red.report if version != "unreduced" else None, reopen_s)

    def build(self, version: str, target: str, x: torch.Tensor, cache_root: Path) -> Built:
        from torch._inductor.utils import fresh_cache

        before = load()
        gc.collect()
        with fresh_cache(dir=str(cache_root), delete=False):
            t0 = time.perf_counter()
            with torch.no_grad():
                made: Made = getattr(self, target)(version, x)
            t1 = time.perf_counter()
            with torch.inference_mode():
                out = made.call()
            t2 = time.perf_counter()
        built = Built(version, made.call, t1 - t0 - made.reopen_s, t2 - t1, as_tensor(out), before,
                      session_reopen_s=made.reopen_s, keep=made.keep)
        if made.report is not None:
            built.flops_after = made.report.flops_after
            built.pass_seconds = dict(getattr(made.report, "pass_seconds", {}) or {})
        if target == "onnxruntime":
            built.onnx_dynamic_batch = session_call(made.keep[0], x)[1]
        return built


# --------------------------------------------------------------------------------------------- timing
def interleaved_rounds(calls: Sequence[Call], repeats: int, warmup: int) -> list[list[float]]:
    """`warmup` untimed rounds, then `repeats` timed rounds calling every callable once in order (A, B, C, A,
    B, C, ...), under `torch.inference_mode()`: `tokenreduce.bench.interleaved` for any number of sides.
    Returns one list of milliseconds per callable. First calls are done (and timed) by `Builders.build`."""
    from tokenreduce.bench import time_call

    if repeats < 1:
        raise fail(f"--repeats must be >= 1, got {repeats}")
    samples: list[list[float]] = [[] for _ in calls]
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in calls:
                fn()
        for _ in range(repeats):
            for i, fn in enumerate(calls):
                samples[i].append(time_call(fn))
    return samples


@dataclass
class Row:
    target: str
    batch: int
    build_order: list[str]
    latency_ms: dict[str, float]  # median per version
    iqr_ms: dict[str, float]
    speedup_vs_unreduced: dict[str, float]  # old, new
    new_over_old: float  # ratio of medians
    new_over_old_paired: float  # median of per-round new/old
    new_over_old_paired_iqr: float
    compile_s: dict[str, float]  # construction + first call
    construct_s: dict[str, float]
    first_call_s: dict[str, float]
    max_abs_diff_new_vs_old: float
    flops_after: dict[str, int | None]
    onnx_dynamic_batch: dict[str, bool | None]
    session_reopen_s: dict[str, float]
    pass_seconds: dict[str, dict[str, float]]
    load_before_build: dict[str, list[float]]
    load_timing: list[list[float]]  # before and after the timed rounds
    repeats: int
    samples_ms: dict[str, list[float]] = field(repr=False)


def make_row(target: str, batch: int, order: list[str], built: dict[str, Built], samples: list[list[float]],
             load_timing: list[list[float]]) -> Row:
    from tokenreduce.bench import iqr

    by = dict(zip(VERSIONS, samples))
    med = {v: statistics.median(s) for v, s in by.items()}
    paired = [n / o for n, o in zip(by["new"], by["old"])]
    diff = float((built["new"].output.float() - built["old"].output.float()).abs().max())
    return Row(
        target=target, batch=batch, build_order=order, latency_ms=med, iqr_ms={v: iqr(s) for v, s in by.items()},
        speedup_vs_unreduced={v: med["unreduced"] / med[v] for v in ("old", "new")},
        new_over_old=med["new"] / med["old"], new_over_old_paired=statistics.median(paired),
        new_over_old_paired_iqr=iqr(paired),
        compile_s={v: b.compile_s for v, b in built.items()},
        construct_s={v: b.construct_s for v, b in built.items()},
        first_call_s={v: b.first_call_s for v, b in built.items()},
        max_abs_diff_new_vs_old=diff, flops_after={v: b.flops_after for v, b in built.items()},
        onnx_dynamic_batch={v: b.onnx_dynamic_batch for v, b in built.items()},
        session_reopen_s={v: b.session_reopen_s for v, b in built.items()},
        pass_seconds={v: b.pass_seconds for v, b in built.items() if b.pass_seconds},
        load_before_build={v: b.load_before for v, b in built.items()}, load_timing=load_timing,
        repeats=len(samples[0]), samples_ms=by,
    )


# --------------------------------------------------------------------------------------------- output
def _ms(row: Row, v: str) -> str:
    spread = row.iqr_ms[v]
    return f"{row.latency_ms[v]:.1f}" if spread != spread else f"{row.latency_ms[v]:.1f} ± {spread / 2:.1f}"


def markdown_table(rows: list[Row], atol: float) -> str:
    cols = ["target", "batch", "unreduced ms", "old ms", "new ms", "old speedup", "new speedup", "new/old",
            "new/old per round (IQR)", "compile s: unreduced", "old", "new", "max |new-old|"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        paired = f"{r.new_over_old_paired:.3f}"
        if r.new_over_old_paired_iqr == r.new_over_old_paired_iqr:
            paired += f" ({r.new_over_old_paired_iqr:.3f})"
        diff = f"{r.max_abs_diff_new_vs_old:.2g}" + (" OVER ATOL" if r.max_abs_diff_new_vs_old > atol else "")
        cells = [r.target, str(r.batch), _ms(r, "unreduced"), _ms(r, "old"), _ms(r, "new"),
                 f"{r.speedup_vs_unreduced['old']:.2f}x", f"{r.speedup_vs_unreduced['new']:.2f}x",
                 f"{r.new_over_old:.3f}", paired] + [f"{r.compile_s[v]:.1f}" for v in VERSIONS] + [diff]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compile_table(rows: list[Row]) -> str:
    cols = ["target", "batch", "build order"] + [f"{v}: construct + first call s" for v in VERSIONS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = [r.target, str(r.batch), ", ".join(r.build_order)]
        cells += [f"{r.construct_s[v]:.1f} + {r.first_call_s[v]:.1f}" for v in VERSIONS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str, header: dict[str, Any], rows: list[Row], elapsed: float) -> None:
    out = dict(header, elapsed_s=elapsed, load_end=load(), rows=[asdict(r) for r in rows])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", metavar="OLD_REF", default=None,
                   help="copy tokenreduce/ of this commit, renamed tokenreduce_old, into --old-dir, check it, exit")
    p.add_argument("--check", action="store_true",
                   help="import both versions in this process, check they are apart, print the ops, exit")
    p.add_argument("--old-dir", type=Path, required=True, help="folder holding tokenreduce_old (outside the repo)")
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name (random init, seed --seed)")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--r", type=int, default=13, help="ToMe tokens merged per block (method tome)")
    p.add_argument("--repeats", type=int, default=20, help="timed interleaved rounds per (batch, target)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds after the first calls")
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: all cores)")
    p.add_argument("--atol", type=float, default=1e-4, help="ONNX verification and new-vs-old output tolerance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows, code state and machine info here")
    args = p.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",") if b.strip()]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.targets if t not in TARGETS]
    if bad:
        p.error(f"unknown target(s) {bad}; choose from {', '.join(TARGETS)}")
    if args.repeats < 1 or args.warmup < 0 or not args.batch or min(args.batch) < 1:
        p.error("--repeats must be >= 1, --warmup >= 0 and every --batch >= 1")
    return args


def run(args: argparse.Namespace) -> list[Row]:
    started = time.perf_counter()
    head_at_start = git("rev-parse", "HEAD")  # before importing: the code the run measures
    apart = check_versions(args.old_dir)
    old, new = importlib.import_module(OLD_NAME), importlib.import_module(NEW_NAME)
    import timm

    from tokenreduce.bench import default_threads

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    state = code_state(Path(apart["new_root"]), args.old_dir.resolve())
    if state["new_commit"] != head_at_start:
        state["new_commit_note"] = f"HEAD moved from {head_at_start} while importing"
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    header: dict[str, Any] = {"command": " ".join([Path(sys.executable).name] + sys.argv), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "code": state,
        "versions_apart": apart, "machine": machine_info(threads), "uptime_start": uptime}
    print(f"new: {state['new_commit'][:9]} (+{len(state['new_uncommitted'])} uncommitted paths under tokenreduce/), "
          f"old: {state['old']['commit'][:9]} | {args.model} ToMe r={args.r} | {threads} threads | {uptime}",
          flush=True)

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False).eval()
    options = {"method": "tome", "r": args.r}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="compare-versions-") as tmp:
        builders = Builders(old, new, model, options, threads, args.atol, Path(tmp))
        for bi, batch in enumerate(args.batch):
            x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(args.seed + batch))
            for ti, target in enumerate(args.targets):
                # every target sees both orders across batch sizes (and the two targets differ at each batch)
                order = ["unreduced"] + (["old", "new"] if (bi + ti) % 2 == 0 else ["new", "old"])
                built: dict[str, Built] = {}
                for version in order:
                    print(f"batch {batch} {target}: building {version} (load {load()})", flush=True)
                    built[version] = builders.build(version, target, x, Path(tmp))
                    b = built[version]
                    print(f"  {version}: construct {b.construct_s:.1f} s + first call {b.first_call_s:.1f} s",
                          flush=True)
                print(f"batch {batch} {target}: timing {args.repeats} rounds (load {load()})", flush=True)
                load_timing = [load()]
                samples = interleaved_rounds([built[v].call for v in VERSIONS], args.repeats, args.warmup)
                load_timing.append(load())
                row = make_row(target, batch, order, built, samples, load_timing)
                rows.append(row)
                print(f"  ms unreduced {row.latency_ms['unreduced']:.1f} old {row.latency_ms['old']:.1f} new "
                      f"{row.latency_ms['new']:.1f}; new/old {row.new_over_old:.3f}; |new-old| "
                      f"{row.max_abs_diff_new_vs_old:.2g}", flush=True)
                if args.json:  # partial results survive an interrupted run
                    write_json(args.json, header, rows, time.perf_counter() - started)
                del built, samples
                gc.collect()
                torch._dynamo.reset()
    elapsed = time.perf_counter() - started
    print(f"\n{args.model} (random init), ToMe r={args.r}, {threads} threads, new {state['new_commit'][:9]}"
          f"{' + uncommitted changes' if state['new_uncommitted'] else ''} vs old {state['old']['commit'][:9]}")
    print("latency: median ± half the IQR over the interleaved rounds; speedup = unreduced / version; "
          "compile = construction + first call\n")
    print(markdown_table(rows, args.atol))
    print()
    print(compile_table(rows))
    print(f"\ntotal {elapsed / 60:.1f} min; load at end {load()}")
    if args.json:
        write_json(args.json, header, rows, elapsed)
        print(f"wrote {args.json}")
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.prepare is not None:
        prepare(args.prepare, args.old_dir)
        return
    if args.check:
        print(json.dumps(check_versions(args.old_dir), indent=2))
        return
    run(args)


if __name__ == "__main__":
    main()
