"""Quality vs measured speedup of every encoder reduction at matched FLOPs: docs/encoder_methods.png (issue 12).

Two panels, one per quality measure of `benchmarks/encoder_methods.py` (`out/encoder_methods/quality.json`):
DINOv2-S CIFAR-10 weighted k-NN top-1 and all-MiniLM-L6-v2 STS-B test Spearman. Each method is one line across
its three FLOPs targets (0.8, 0.65, 0.5); the unreduced model is the star at speedup 1.

The x axis is the speedup *measured* by `benchmarks/encoder_methods_speed.py` (`out/encoder_methods/speed.json`):
unreduced / reduced median latency of the same method at the same FLOPs target on timm ViT-B/16 (random init),
by default onnxruntime at batch 1 (`--backend`, `--batch`), and by default the *paired* speedup (1 / the median
of the per-round ratios reduced / unreduced; `--estimator medians` for the ratio of the two medians). It is not a speedup of DINOv2-S or MiniLM themselves:
the quality runner and the speed runner match each method to the same FLOPs *targets* on their own models, and
the FLOPs target is what links a quality point to a speed point. A method the x-axis backend refuses (DyMU on
onnxruntime: its count is data-dependent) is drawn at its `--fallback-backend` speedup instead, with hollow
markers and a legend label that says so; a (method, target) without a quality or speed row is left out and
listed on stdout, never invented.

Usage:
    python benchmarks/encoder_methods_plot.py                  # writes docs/encoder_methods.png
    python benchmarks/encoder_methods_plot.py --backend inductor --batch 8 --out /tmp/p.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

METHODS = ("tome", "evit", "pitome", "zero_tprune", "token_transforming", "dymu")
LABELS = {"tome": "ToMe", "evit": "EViT", "pitome": "PiToMe", "zero_tprune": "Zero-TPrune",
          "token_transforming": "Token Transforming", "dymu": "DyMU"}
PANELS = (("dinov2-s", "DINOv2-S: CIFAR-10 k-NN top-1 (%)"), ("minilm", "all-MiniLM-L6-v2: STS-B test Spearman"))
Row = dict[str, Any]


def load(path: Path) -> list[Row]:
    if not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("rows", []))


def speedups(rows: list[Row], backend: str, batch: int, paired: bool) -> dict[tuple[str, float], float]:
    """(method, target) -> measured speedup on `backend` at `batch` (rows with an error are not speedups):
    `paired`: 1 / the median of the per-round ratios reduced / unreduced; else the ratio of the medians."""
    def target(r: Row) -> float:  # "method@target/bBATCH/backend"
        return float(r["key"].split("@", 1)[1].split("/", 1)[0])

    def speedup(r: Row) -> float:
        if not paired:
            return float(r["speedup"])
        ratios = sorted(b / a for a, b in zip(r["samples_unreduced_ms"], r["samples_reduced_ms"], strict=True))
        return 1.0 / statistics.median(ratios)

    return {(r["method"], target(r)): speedup(r) for r in rows
            if r.get("backend") == backend and r.get("batch") == batch and "error" not in r and "speedup" in r}


def points(quality: list[Row], speed: list[Row], model: str, backend: str, batch: int, fallback: str,
           paired: bool) -> tuple[dict[str, list[tuple[float, float, float]]], dict[str, str], list[str]]:
    """Per method: [(target, speedup, quality)] sorted by target (descending: from light to heavy reduction),
    the backend each method's x comes from, and what is missing."""
    main, alt = speedups(speed, backend, batch, paired), speedups(speed, fallback, batch, paired)
    out: dict[str, list[tuple[float, float, float]]] = {}
    source: dict[str, str] = {}
    missing: list[str] = []
    for r in quality:
        if r.get("model") != model or r.get("method") not in METHODS:
            continue
        key = (r["method"], float(r["target"]))
        if "error" in r or "value" not in r:
            missing.append(f"{model} {key[0]}@{key[1]:g}: quality row failed ({str(r.get('error', ''))[:120]})")
            continue
        x = main.get(key)
        if x is None and key in alt and not any(k[0] == key[0] for k in main):
            x = alt[key]
            source[key[0]] = fallback
        if x is None:
            missing.append(f"{model} {key[0]}@{key[1]:g}: no {backend} batch-{batch} speed row")
            continue
        source.setdefault(key[0], backend)
        out.setdefault(key[0], []).append((key[1], x, float(r["value"])))
    for pts in out.values():
        pts.sort(reverse=True)
    return out, source, missing


def full_value(quality: list[Row], model: str) -> float | None:
    for r in quality:
        if r.get("model") == model and r.get("method") == "full" and "value" in r:
            return float(r["value"])
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quality", type=Path, default=Path("out/encoder_methods/quality.json"))
    p.add_argument("--speed", type=Path, default=Path("out/encoder_methods/speed.json"))
    p.add_argument("--backend", default="onnxruntime", help="whose speedup is the x axis")
    p.add_argument("--fallback-backend", default="inductor", help="x for methods the backend refuses (DyMU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--estimator", choices=("paired", "medians"), default="paired",
                   help="paired: 1 / median of per-round reduced/unreduced ratios (steadier under a drifting load); "
                        "medians: unreduced median / reduced median")
    p.add_argument("--out", type=Path, default=Path("docs/encoder_methods.png"))
    args = p.parse_args(argv)
    quality, speed = load(args.quality), load(args.speed)
    if not quality or not speed:
        print(f"nothing to plot: {args.quality} has {len(quality)} rows, {args.speed} {len(speed)}", file=sys.stderr)
        return 1

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHODS)}
    markers = {0.8: "o", 0.65: "s", 0.5: "^"}
    all_missing: list[str] = []
    for ax, (model, title) in zip(axes, PANELS):
        pts, source, missing = points(quality, speed, model, args.backend, args.batch, args.fallback_backend,
                                      args.estimator == "paired")
        all_missing += missing
        for method in METHODS:
            if method not in pts:
                continue
            xs, ys = [p[1] for p in pts[method]], [p[2] for p in pts[method]]
            hollow = source[method] != args.backend
            label = LABELS[method] + (f" (x: {source[method]})" if hollow else "")
            ax.plot(xs, ys, color=colors[method], alpha=0.8, label=label, linestyle="--" if hollow else "-")
            for target, x, y in pts[method]:
                ax.plot(x, y, markers.get(target, "o"), color=colors[method], markersize=7,
                        markerfacecolor="none" if hollow else colors[method])
        full = full_value(quality, model)
        if full is not None:
            ax.plot(1.0, full, "*", color="black", markersize=13, label="unreduced")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"measured speedup ({args.estimator}), ViT-B/16 {args.backend} batch {args.batch}, 1 thread",
                      fontsize=8)
        ax.grid(alpha=0.3)
        if not pts:
            ax.text(0.5, 0.5, "no rows yet", transform=ax.transAxes, ha="center")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("Encoder methods at matched FLOPs (markers: circle 0.8, square 0.65, triangle 0.5 of the full "
                 "model's FLOPs)", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    for line in all_missing:
        print(f"not plotted: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
