"""Write an evaluation sweep to a folder: `results.md`, `results.json` and PNG plots.

* `results.md`: the quality table (metric, delta, agreement with the full model, samples, FLOPs ratio),
  the largest setting within the tolerance per metric with its measured speedups, and the speed table.
* `results.json`: everything, including every timing sample (`EvalResult.to_dict()`; NaN -> null).
* `quality_vs_speedup.png` (one panel per target, one line per batch size and metric),
  `quality_vs_flops.png` (delta vs FLOPs ratio), `speedup_vs_flops.png` (measured vs FLOPs speedup; the
  diagonal is efficiency 1). A plot whose data is absent (no quality rows, no speed rows) is not written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tokenreduce.evaluate.sweep import EvalResult
from tokenreduce.jsonable import jsonable
from tokenreduce.util import files


def _f(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:{spec}}{suffix}"


def _signed(x: float) -> str:
    return f"{x:+.2f}" if math.isfinite(x) else "-"





def quality_table(result: EvalResult) -> str:
    lines = ["| setting | metric | value | delta | same k-NN label | cosine to full (mean / min) | n | "
             "FLOPs ratio | tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result.quality:
        agree = "-" if r.agreement is None else f"{r.agreement:.1f}%"
        bold = "**" if r.setting == "full model" else ""
        lines.append(f"| {bold}{r.setting}{bold} | {r.metric} | {bold}{r.value:.2f}{bold} | {_signed(r.delta)} | "
                     f"{agree} | {r.cosine_mean:.4f} / {r.cosine_min:.4f} ({r.cosine_of}, {r.n_cosine}) | {r.n} | "
                     f"{r.flops_ratio:.3f} | {r.tokens} |")
    return "\n".join(lines)


def speed_table(result: EvalResult) -> str:
    lines = ["| setting | batch | target | unreduced ms | reduced ms | latency ratio | speedup | FLOPs ratio | "
             "FLOPs speedup | efficiency |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.speed:
        lines.append(f"| {r.setting} | {r.batch} | {r.target} | {_lat(r.latency_unreduced_ms, r.iqr_unreduced_ms)} | "
                     f"{_lat(r.latency_reduced_ms, r.iqr_reduced_ms)} | {r.latency_ratio:.3f} | {r.speedup:.2f}x | "
                     f"{r.flops_ratio:.3f} | {r.flops_speedup:.2f}x | {r.efficiency:.2f} |")
    return "\n".join(lines)


def _lat(median: float, iqr: float) -> str:
    return f"{median:.1f}" if not math.isfinite(iqr) else f"{median:.1f} ± {iqr / 2:.1f}"


def summary_lines(result: EvalResult) -> list[str]:
    out = []
    for s in result.summary:
        if s["setting"] is None:
            out.append(f"- {s['metric']}: no setting within {s['tolerance']:.1f} points of the full model")
            continue
        speed = ", ".join(f"{x['target']} b{x['batch']} {x['speedup']:.2f}x" for x in s.get("speedups", []))
        out.append(f"- {s['metric']}: largest setting within {s['tolerance']:.1f} points: **{s['setting']}** "
                   f"({s['value']:.2f}, delta {s['delta']:+.2f}, FLOPs ratio {s['flops_ratio']:.3f})"
                   + (f"; measured speedup {speed}" if speed else ""))
    return out


def markdown(result: EvalResult) -> str:
    cfg, env = result.config, result.environment
    parts = [f"# tokenreduce eval: {result.family}", ""]
    if result.command:
        parts += ["```bash", result.command, "```", ""]
    parts += [f"- model: {result.model}",
              f"- machine: {env['cpu']}, {env['cores']} cores, {env['threads']} threads; torch {env['torch']}, "
              f"transformers {env['transformers']}, Python {env['python']}",
              f"- wall time: {result.seconds / 60:.1f} min", ""]
    parts += ["## Quality", ""]
    if result.quality_skipped:
        parts += [f"Not measured: {result.quality_skipped}.", ""]
    else:
        parts += [f"Data: {cfg['data_dir'] or 'default data folder'}; limit: {cfg['limit'] or 'none'}. "
                  "delta = setting - full model (metric points); the full model row is the plain model.", "",
                  quality_table(result), ""]
        parts += summary_lines(result) + [""]
    parts += ["## Speed", ""]
    if result.speed:
        parts += [f"{cfg['repeats']} interleaved rounds (A B A B ...) after {cfg['warmup']} warm-up rounds, medians "
                  "± half the interquartile range; latency ratio = reduced / unreduced; efficiency = speedup / "
                  "FLOPs speedup. The machine is shared: treat differences of a few percent as noise.", "",
                  speed_table(result), ""]
    else:
        parts += ["Not measured (--no-speed).", ""]
    return "\n".join(parts)


def plot(result: EvalResult, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    metrics = list(dict.fromkeys(r.metric for r in result.quality))
    reduced = [r for r in result.quality if r.setting != "full model"]
    if reduced and result.speed:
        targets = list(dict.fromkeys(s.target for s in result.speed))
        fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False, sharey=True)
        for ax, target in zip(axes[0], targets):
            for batch in dict.fromkeys(s.batch for s in result.speed):
                speed = {s.setting: s.speedup for s in result.speed if s.target == target and s.batch == batch}
                for metric in metrics:
                    # in setting order (fewer FLOPs along the line), not sorted by a noisy speedup
                    pts = [(speed[r.setting], r.delta, r.setting) for r in
                           sorted(reduced, key=lambda r: -r.flops_ratio) if r.metric == metric and r.setting in speed]
                    if pts:
                        ax.plot([1.0] + [p[0] for p in pts], [0.0] + [p[1] for p in pts], marker="o", lw=0.8,
                                label=f"{metric}, batch {batch}")
                        for x, y, name in pts:
                            ax.annotate(name.split(" @")[0], (x, y), fontsize=5, textcoords="offset points",
                                        xytext=(3, 3))
            ax.axhline(0.0, color="grey", lw=0.8, ls="--")
            ax.set_title(target)
            ax.set_xlabel("measured speedup (unreduced / reduced latency)")
        axes[0][0].set_ylabel("delta to full model (metric points)")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{result.family}: quality vs measured speedup")
        fig.tight_layout()
        written.append(out / "quality_vs_speedup.png")
        _save(fig, written[-1])
        plt.close(fig)
    if reduced:
        fig, ax = plt.subplots(figsize=(6, 4))
        for metric in metrics:
            for method in ("ToMe", "EViT"):
                pts = sorted((r.flops_ratio, r.delta, r.setting) for r in reduced
                             if r.metric == metric and r.setting.startswith(method))
                if pts:
                    ax.plot([p[0] for p in pts] + [1.0], [p[1] for p in pts] + [0.0], marker="o",
                            label=f"{method}, {metric}")
                    for x, y, name in pts:
                        ax.annotate(name.split(" ", 1)[1].split(" @")[0], (x, y), fontsize=6,
                                    textcoords="offset points", xytext=(3, 3))
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("FLOPs ratio (reduced / unreduced)")
        ax.set_ylabel("delta to full model (metric points)")
        ax.set_title(f"{result.family}: quality vs FLOPs")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "quality_vs_flops.png")
        _save(fig, written[-1])
        plt.close(fig)
    if result.speed:
        fig, ax = plt.subplots(figsize=(6, 4))
        for target in dict.fromkeys(s.target for s in result.speed):
            for batch in dict.fromkeys(s.batch for s in result.speed):
                xy = sorted((s.flops_speedup, s.speedup) for s in result.speed if s.target == target and s.batch == batch)
                ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", label=f"{target}, batch {batch}")
        top = max(max(s.flops_speedup, s.speedup) for s in result.speed)
        ax.plot([1.0, top], [1.0, top], color="grey", lw=0.8, ls="--", label="efficiency 1")
        ax.set_xlabel("FLOPs speedup")
        ax.set_ylabel("measured speedup")
        ax.set_title(f"{result.family}: measured vs FLOPs speedup")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "speedup_vs_flops.png")
        _save(fig, written[-1])
        plt.close(fig)
    return written


def _save(fig: Any, path: Path) -> None:
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def write_results(result: EvalResult, out: Path | str) -> list[Path]:
    """Write results.md, results.json and the plots into `out` (created); returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "results.md"
    files.write_text(md, markdown(result))
    js = out / "results.json"
    files.write_text(js, json.dumps(jsonable(result.to_dict()), indent=1))
    return [md, js, *plot(result, out)]


def load_result(path: Path | str) -> EvalResult:
    """An `EvalResult` back from a `results.json` (to redraw plots or tables without re-running)."""
    from tokenreduce.bench import BenchRow
    from tokenreduce.evaluate.sweep import QualityRow

    d = json.loads(Path(path).read_text())
    nan = float("nan")
    speed = []
    for row, samples in zip(d["speed"], d.get("speed_samples_ms", [{}] * len(d["speed"]))):
        row = {k: nan if v is None else v for k, v in row.items()}
        speed.append(BenchRow(**row, samples_unreduced_ms=samples.get("unreduced", []),
                              samples_reduced_ms=samples.get("reduced", [])))
    quality = [QualityRow(**r) for r in d["quality"]]
    return EvalResult(d["family"], d["model"], d["config"], d["environment"], quality, speed, d["quality_skipped"],
                      d["summary"], d["seconds"], d.get("command", ""))
