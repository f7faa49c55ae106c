"""Latency of every encoder reduction at matched FLOPs on timm ViT-B/16: inductor and onnxruntime, batch 1 and 8.

Issue 12 asks for each encoder method's "inductor and onnxruntime latency ratio at batch 1 and 8 on ViT-B/16" at
matched FLOPs (about 0.8, 0.65 and 0.5 of the full model), beside the quality table of
`benchmarks/encoder_methods.py`. This script measures the speed half:

* Settings: `benchmarks/matched_flops.py` (`Matcher.match(method, target)`) picks each method's setting whose
  `report.flops_ratio` is nearest the target on this model (random-init `vit_base_patch16_224`, 197 tokens);
  DyMU is calibrated there with `tokenreduce.calibrate_dymu` on CIFAR-10 *train* images (resized to 224 px,
  ImageNet-normalised) to ToMe's matched per-block merges. Cached in `out/encoder_methods/settings_vit-b16.json`.
* Targets, through the house bench machinery (`tokenreduce.bench`, as `benchmarks/vit_speed.py`): `inductor`
  (`torch.compile` of the rewritten graph, dynamic batch, compiled once per setting and pass, first call and
  warm-up untimed) against `torch.compile(model, dynamic=True)`; `onnxruntime` (the verified export of
  `tokenreduce.targets.onnx`, `ORT_ENABLE_ALL`, CPU session) against the verified export of `method="none"`.
  Both sides use the same threads (`--threads`; torch threads for inductor, intra-op threads for onnxruntime).
* Timing: in one run the unreduced and the reduced model alternate (A, B, A, B, ...): the first call and
  `--warmup` rounds untimed, then `--repeats` rounds; medians. At batch 1 every round feeds the next of
  `--images` CIFAR-10 test images (the same sequence on both sides), so DyMU's input-dependent count is timed
  over several inputs rather than one; at batch 8 one fixed batch of 8 test images.
* Per row: medians, `speedup = unreduced / reduced` (the table adds the *paired* speedup, 1 / the median of the
  per-round ratios reduced / unreduced, steadier when the load drifts within a row), the FLOPs ratio of the compile report (DyMU: at its
  calibrated mean merges, its nominal count), `efficiency = speedup * FLOPs ratio`, the load average before and
  after the row, and for DyMU the tokens each timed input kept after the last block (`recording()`, eager).

Refusals are results, not crashes: a method that fails to compile or export on a target gets a row with the
error text (DyMU on onnxruntime is refused by design: its count is data-dependent; the message names the
fixed-count alternative). Rows go to `--json` as each finishes; a rerun skips the rows already there, so a
stopped run resumes; `--merge` folds the rows of a second worker (its own `--json`) into one file. ONNX files are kept under `--onnx-dir` (gitignored `out/`), so a batch-8 pass after a
batch-1 pass reuses the verified files instead of exporting again.

Usage (heavy: 18 settings x 2 targets x 2 batches; do batch 1 for every setting first):
    python benchmarks/encoder_methods_speed.py --match-only
    python benchmarks/encoder_methods_speed.py --backends onnxruntime,inductor --batch 1 --repeats 9
    python benchmarks/encoder_methods_speed.py --backends onnxruntime,inductor --batch 8 --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # matched_flops lives beside this script

from matched_flops import Example, Matcher  # noqa: E402

from tokenreduce.bench import Timing, bench_targets, interleaved, make_row, paired_ratio, prepare_baseline  # noqa: E402
from tokenreduce.compiler.api import compile as tr_compile  # noqa: E402
from tokenreduce.errors import TokenReduceError  # noqa: E402
from tokenreduce.methods.dymu import recording  # noqa: E402
from tokenreduce.targets.base import TargetOptions  # noqa: E402
from tokenreduce.targets.onnx import cpu_session  # noqa: E402

METHODS = ("tome", "evit", "pitome", "zero_tprune", "token_transforming", "dymu")
TARGETS = (0.8, 0.65, 0.5)
BACKENDS = ("onnxruntime", "inductor")
FORMAT = "tokenreduce-encoder-methods-speed"
Call = Callable[[], Any]


# ---------------------------------------------------------------------------------------------- inputs
def cifar_images(split: str, per_class: int, data_dir: Path | None) -> torch.Tensor:
    """CIFAR-10 images at 224 px, ImageNet-normalised, class-interleaved (image i is of class i % 10)."""
    from tokenreduce.evaluate.data import load_cifar10
    from tokenreduce.evaluate.knn import resize_normalize

    images, labels, _ = load_cifar10(split, data_dir, per_class)
    seen: dict[int, int] = {}
    rank = []
    for label in labels.tolist():  # the k-th image of its class
        rank.append(seen.get(label, 0))
        seen[label] = rank[-1] + 1
    order = sorted(range(len(rank)), key=lambda i: (rank[i], int(labels[i])))
    return resize_normalize(images[order], 224)


def cycling(calls: list[Call]) -> Call:
    """One call that runs the next of `calls` each time (A and B both start at the first input)."""
    it = itertools.cycle(calls)
    return lambda: next(it)()


# ---------------------------------------------------------------------------------------------- settings
def matched(matcher: Matcher, method: str, target: float) -> tuple[dict[str, Any], float, str]:
    """(options, FLOPs ratio, note): `Matcher.match`, or, when its search fails on a setting the method refuses
    (e.g. a Zero-TPrune `keep_ratio` so low that the S-stage cannot remove its share), a bisection of
    `keep_ratio` that treats a refused setting as too low; the note says which was used."""
    try:
        options, ratio = matcher.match(method, target)
        return options, ratio, ""
    except TokenReduceError as e:
        if method not in ("evit", "zero_tprune"):
            raise
        first = str(e)

    def ratio_at(keep: float) -> float | None:
        try:
            return float(matcher.evaluate({"method": method, "keep_ratio": keep})["ratio"])
        except TokenReduceError:
            return None

    lo, hi = 0.0, 1.0  # ratio(hi) >= target; lo: refused or ratio(lo) < target
    tried: dict[float, float] = {1.0: 1.0}
    while hi - lo > 0.002:
        mid = round((lo + hi) / 2, 3)
        r = ratio_at(mid)
        if r is not None:
            tried[mid] = r
        if r is None or r < target:
            lo = mid
        else:
            hi = mid
    keep = min(tried, key=lambda k: (abs(tried[k] - target), k))
    note = (f"matched_flops' search failed ({first.splitlines()[0][:200]}); keep_ratio bisected here instead, "
            "refused settings counted as too low")
    return {"method": method, "keep_ratio": keep}, tried[keep], note


# ---------------------------------------------------------------------------------------------- output
def load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise TokenReduceError(f"{path} is not a {FORMAT} file; give another --json", setting="--json")
    rows = list(data.get("rows", []))
    for r in rows:  # rows of the first runs: the bench row's `target` (the backend label) overwrote the FLOPs target
        r["target"] = float(r["key"].split("@", 1)[1].split("/", 1)[0])
    return rows


def save_rows(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "meta": meta, "rows": rows}, indent=1) + "\n")
    tmp.replace(path)


def row_key(method: str, target: float, batch: int, backend: str) -> str:
    return f"{method}@{target:g}/b{batch}/{backend}"


def shown_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options as a table shows them: DyMU's per-block thresholds are summarised, not listed."""
    out = {k: v for k, v in options.items() if k not in ("thresholds", "mean_r")}
    if "mean_r" in options:
        out["mean_r_total"] = round(sum(options["mean_r"]), 2)
    return out


def setting_text(options: dict[str, Any]) -> str:
    keys = [k for k in options if k not in ("method", "clamp_r")]
    return ", ".join(f"{k}={options[k]}" for k in keys) + (" (clamp_r)" if options.get("clamp_r") else "")


def paired_speedup(row: dict[str, Any]) -> float:
    """1 / `bench.paired_ratio` of the row's interleaved samples."""
    return 1.0 / paired_ratio(row["samples_unreduced_ms"], row["samples_reduced_ms"])


def markdown_table(rows: list[dict[str, Any]], methods: list[str], targets: list[float]) -> str:
    """One line per (method, target, batch, backend) row: setting, FLOPs ratio, medians, speedup, efficiency,
    load average (1 min) before/after; a refusal or failure shows its message."""
    lines = ["| method | target | setting | batch | backend | FLOPs ratio | unreduced ms | reduced ms | speedup "
             "| efficiency | paired speedup | paired efficiency | load |", "|" + "---|" * 13]
    order = {(m, t): i for i, (m, t) in enumerate((m, t) for t in sorted(targets, reverse=True) for m in methods)}
    rows = sorted((r for r in rows if (r["method"], r["target"]) in order),
                  key=lambda r: (r["batch"], r["backend"] != "onnxruntime", order[(r["method"], r["target"])]))
    for r in rows:
        head = f"| {r['method']} | {r['target']:g} | {setting_text(r['options'])} | {r['batch']} | {r['backend']} |"
        load = f"{r['load_before'][0]:.1f}-{r['load_after'][0]:.1f}"
        if "error" in r:
            lines.append(f"{head} {r['matched_ratio']:.3f} | - | - | **refused** | {r['error'][:400]} | | | {load} |")
            continue
        lines.append(f"{head} {r['flops_ratio']:.3f} | {r['latency_unreduced_ms']:.0f} | {r['latency_reduced_ms']:.0f} "
                     f"| {r['speedup']:.2f}x | {r['efficiency']:.2f} | {paired_speedup(r):.2f}x "
                     f"| {paired_speedup(r) * r['flops_ratio']:.2f} | {load} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- onnx files
def ort_session(path: Path, threads: int) -> Any:
    return cpu_session(path, threads)


def ort_binder(sess: Any) -> Callable[[torch.Tensor], Call]:
    name = sess.get_inputs()[0].name

    def bind(x: torch.Tensor) -> Call:
        feed = {name: x.numpy()}
        return lambda: sess.run(None, feed)

    return bind


def onnx_file(gm: torch.nn.Module, args: tuple[Any, ...], path: Path, threads: int) -> dict[str, Any]:
    """Export and verify `gm` to `path` once (the ONNX target: static check + onnxruntime vs eager), recording
    the verification beside it; a later pass finds the record and reuses the file."""
    record = path.with_suffix(".json")
    if path.is_file() and record.is_file():
        return dict(json.loads(record.read_text()))
    target = bench_targets()["onnxruntime"]
    path.parent.mkdir(parents=True, exist_ok=True)
    lowered = target.lower(gm, args, {}, TargetOptions(dynamic_batch=True, threads=threads, output=path))
    ver = lowered.verification
    info = {"verified": bool(ver and ver.verified), "max_abs_diff": ver.max_abs_diff if ver else None,
            "nodes": sum(lowered.export.op_counts.values()) if lowered.export else None,
            "dynamic_batch": lowered.dynamic_batch}
    record.write_text(json.dumps(info) + "\n")
    return info


# ---------------------------------------------------------------------------------------------- one setting
class Bench:
    """The model, the timing inputs and the run's options; prepares and times one side at a time."""

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module, images: torch.Tensor) -> None:
        self.args = args
        self.model = model
        self.images = images
        self.onnx_dir = Path(args.onnx_dir)

    def inputs(self, batch: int) -> list[torch.Tensor]:
        """The timed inputs: `--images` single images at batch 1 (cycled), one batch of `batch` otherwise."""
        if batch == 1:
            return [self.images[i:i + 1] for i in range(self.args.images)]
        return [self.images[:batch]]

    def time_pair(self, unreduced: Callable[[torch.Tensor], Call], reduced: Callable[[torch.Tensor], Call],
                  batch: int, repeats: int) -> Timing:
        xs = self.inputs(batch)
        warmup = max(self.args.warmup, len(xs) - 1)  # every input seen once before timing (DyMU recompiles)
        return interleaved(cycling([unreduced(x) for x in xs]), cycling([reduced(x) for x in xs]), repeats, warmup)

    def baseline(self, backend: str) -> Callable[[torch.Tensor], Call]:
        x = self.images[:1]
        if backend == "onnxruntime":
            with torch.no_grad():
                plain = tr_compile(self.model, (x,), method="none", inner="eager", count_model_flops=False)
            onnx_file(plain.graph_module, plain.example_args, self.onnx_dir / "none.onnx", self.args.threads)
            return ort_binder(ort_session(self.onnx_dir / "none.onnx", self.args.threads))
        lowered = prepare_baseline(self.model, (x,), {}, backend, dynamic_batch=True, threads=self.args.threads)
        return lambda t: lowered.bind((t,), {})

    def reduced(self, backend: str, options: dict[str, Any], stem: str) -> tuple[Callable[[torch.Tensor], Call],
                                                                                 Any, dict[str, Any]]:
        """(binder, compile report, extra row fields) of the reduced model on `backend`; raises what the method
        or the target raises."""
        x = self.images[:1]
        with torch.no_grad():
            red = tr_compile(self.model, (x,), inner="eager", dynamic_batch=True, **options)
        extra: dict[str, Any] = {}
        if options["method"] == "dymu":
            extra["tokens_out_per_input"] = self.dymu_counts(red.graph_module)
        if backend == "onnxruntime":
            path = self.onnx_dir / f"{stem}.onnx"
            extra["export"] = onnx_file(red.graph_module, red.example_args, path, self.args.threads)
            return ort_binder(ort_session(path, self.args.threads)), red.report, extra
        lowered = bench_targets()[backend].lower(red.graph_module, red.example_args, red.example_kwargs,
                                                TargetOptions(dynamic_batch=True, threads=self.args.threads))
        return (lambda t: lowered.bind((t,), {})), red.report, extra

    def dymu_counts(self, gm: torch.nn.Module) -> list[int]:
        """Tokens after the last DyMU block for each batch-1 timing input (eager run of the rewritten graph)."""
        with torch.no_grad(), recording() as rec:
            for x in self.inputs(1):
                gm(x)
        return [row[max(row)] if row else -1 for row in rec.counts]


def run_pass(bench: Bench, matcher: Matcher, backend: str, batch: int, repeats: int, rows: list[dict[str, Any]],
             meta: dict[str, Any], out: Path) -> None:
    """Every method x target on one backend and batch, skipping rows already in `rows`."""
    args = bench.args
    done = {r["key"] for r in rows}
    todo = [(m, t) for t in args.targets for m in args.methods if row_key(m, t, batch, backend) not in done]
    if not todo:
        return
    print(f"== {backend}, batch {batch}: {len(todo)} settings; load {os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.perf_counter()
    base = bench.baseline(backend)
    print(f"   baseline ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    for method, target in todo:
        options, ratio, note = matched(matcher, method, target)
        stem = f"{method}-{target:g}"
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        row: dict[str, Any] = {"key": row_key(method, target, batch, backend), "method": method, "target": target,
                               "options": shown_options(options), "matched_ratio": ratio, "match_note": note,
                               "batch": batch,
                               "backend": backend, "threads": args.threads, "load_before": load_before}
        try:
            binder, report, extra = bench.reduced(backend, options, stem)
            row["prepare_s"] = time.perf_counter() - t0
            timing = bench.time_pair(base, binder, batch, repeats)
        except (TokenReduceError, RuntimeError, ValueError, TypeError, AssertionError) as e:  # a refusal or failure is a result
            row.update(error=f"{type(e).__name__}: {e}", load_after=os.getloadavg())
            print(f"   {stem} b{batch} {backend}: ERROR {str(e)[:300]}", flush=True)
        else:
            bench_row = asdict(make_row(method, batch, backend, timing, report, threads=args.threads))
            row.update({k: v for k, v in bench_row.items() if k not in ("setting", "target")})  # theirs: labels
            row.update(extra, load_after=os.getloadavg(), minutes=(time.perf_counter() - t0) / 60)
            print(f"   {stem} b{batch} {backend}: {row['latency_unreduced_ms']:.1f} -> {row['latency_reduced_ms']:.1f}"
                  f" ms, speedup {row['speedup']:.2f}x, FLOPs {row['flops_ratio']:.3f}, efficiency "
                  f"{row['efficiency']:.2f}, load {load_before[0]:.1f}->{row['load_after'][0]:.1f} "
                  f"({row['minutes']:.1f} min)", flush=True)
        rows.append(row)
        save_rows(out, rows, meta)
        gc.collect()
    del base
    gc.collect()


# ---------------------------------------------------------------------------------------------- profile
def profile_files(args: argparse.Namespace) -> int:
    """Per-op-type onnxruntime kernel time (ms per run) of each exported file at batch 1: where a method's plan
    ops cost more than ToMe's (`edge_onnx.profile`: 2 untimed runs, then RUNS profiled ones)."""
    from edge_onnx import profile

    files = sorted(Path(args.onnx_dir).glob("*.onnx"))
    if not files:
        raise TokenReduceError(f"no ONNX files in {args.onnx_dir}: run the onnxruntime pass first",
                               setting="--onnx-dir")
    x = cifar_images("test", 1, args.data_dir)[:1].numpy()
    out = args.json.parent / "profile.json"
    rows = json.loads(out.read_text()) if out.is_file() else {}
    for path in files:
        if path.stem in rows:
            continue
        load = os.getloadavg()
        name = ort_session(path, args.threads).get_inputs()[0].name
        per_op = profile(path, {name: x}, args.threads, args.profile)
        rows[path.stem] = {"kernel_ms": per_op, "total_ms": sum(per_op.values()), "load": [load, os.getloadavg()]}
        top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(per_op.items())[:8])
        print(f"{path.stem}: kernels {rows[path.stem]['total_ms']:.1f} ms: {top}", flush=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name (random init, seed 0)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--targets", default=",".join(f"{t:g}" for t in TARGETS),
                   help="FLOPs-ratio targets, in the order they are run (target-major: a cut run keeps whole targets)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="onnxruntime and/or inductor")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (each a pass over every setting)")
    p.add_argument("--repeats", default="9", help="timed rounds: one int, or one per batch size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads and onnxruntime intra-op threads")
    p.add_argument("--images", type=int, default=4, help="batch 1: CIFAR-10 test images cycled over the rounds")
    p.add_argument("--calib-per-class", type=int, default=1, help="dymu: CIFAR-10 train images per class")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=Path("out/encoder_methods/speed.json"))
    p.add_argument("--settings-cache", type=Path, default=Path("out/encoder_methods/settings_vit-b16.json"))
    p.add_argument("--onnx-dir", type=Path, default=Path("out/encoder_methods/onnx_vit-b16"))
    p.add_argument("--match-only", action="store_true", help="find (and cache) the settings, time nothing")
    p.add_argument("--profile", type=int, default=0, metavar="RUNS",
                   help="instead of timing: onnxruntime's kernel time per op type of every ONNX file already in "
                        "--onnx-dir (batch 1, --threads), over RUNS profiled runs; rows to --json's folder, "
                        "profile.json")
    p.add_argument("--table", action="store_true", help="print --json's rows as a markdown table; times nothing")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="copy the rows of these files (e.g. of a worker run with its own --json) into --json, "
                        "skipping keys already there; times nothing")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.targets = [float(t) for t in args.targets.split(",") if t]
    args.backends = [b for b in args.backends.split(",") if b]
    args.batch = [int(b) for b in args.batch.split(",") if b]
    reps = [int(r) for r in args.repeats.split(",") if r]
    args.repeats = reps * len(args.batch) if len(reps) == 1 else reps
    for name, given, allowed in (("--methods", args.methods, METHODS), ("--backends", args.backends, BACKENDS)):
        bad = [g for g in given if g not in allowed]
        if bad:
            p.error(f"{name}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    if len(args.repeats) != len(args.batch) or min(args.repeats) < 1:
        p.error("--repeats takes one positive int or one per batch size")
    if not 1 <= args.images <= 1000 or max(args.batch) > 1000:
        p.error("--images and batch sizes must be in 1..1000 (CIFAR-10 test images available)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        rows = load_rows(args.json)
        meta = json.loads(args.json.read_text()).get("meta", {}) if args.json.is_file() else {}
        for path in args.merge:
            have = {r["key"] for r in rows}
            new = [r for r in load_rows(path) if r["key"] not in have]
            rows += new
            meta.setdefault("merged", []).append({"file": str(path), "rows": len(new)})
            print(f"{path}: {len(new)} rows added to {args.json}")
        save_rows(args.json, rows, meta)
        return 0
    if args.profile:
        return profile_files(args)
    if args.table:
        print(markdown_table(load_rows(args.json), args.methods, args.targets))
        return 0
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    per_class = max(1, -(-max(args.images, *args.batch) // 10))
    images = cifar_images("test", per_class, args.data_dir)
    calib = cifar_images("train", args.calib_per_class, args.data_dir) if "dymu" in args.methods else None
    example = Example((torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)),))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    matcher = Matcher(model, [example], cache=args.settings_cache, calib=calib, log=log)
    if args.match_only:  # otherwise each setting is matched (or read from the cache) when its turn comes
        for method in args.methods:
            for target in args.targets:
                options, ratio, note = matched(matcher, method, target)
                print(f"{method} @ {target:g}: {json.dumps(shown_options(options))} -> FLOPs ratio {ratio:.3f} "
                      f"{note}", flush=True)
        return 0
    rows = load_rows(args.json)
    meta = {"command": " ".join(["python", *sys.argv]), "model": args.model, "threads": args.threads,
            "images": args.images, "warmup": args.warmup, "calib_per_class": args.calib_per_class,
            "torch": torch.__version__, "cpu_cores": os.cpu_count()}
    bench = Bench(args, model, images)
    started = time.perf_counter()
    for batch, repeats in zip(args.batch, args.repeats):
        for backend in args.backends:
            run_pass(bench, matcher, backend, batch, repeats, rows, meta, args.json)
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min; {len(rows)} rows in {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
