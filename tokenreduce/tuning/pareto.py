"""A tuning run shown: the Pareto plot (fidelity against speedup, every candidate, the chosen one marked) and
the candidates table, both drawn from a plan's `candidates` rows so they can be redrawn from a plan file.

Speedup on the plot is the measured one (1 / latency ratio on the plan's target) where the candidate was timed,
drawn filled; elsewhere it is the FLOPs speedup (1 / FLOPs ratio), drawn hollow and said so in the legend,
never mixed silently. Refuses a plan without candidate rows (a plan written by hand has nothing to plot).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from tokenreduce.errors import TokenReduceError
from tokenreduce.methods.plan import Plan
from tokenreduce.util.files import write_bytes, write_text


def _rows(plan: Plan) -> list[dict[str, Any]]:
    if not plan.candidates:
        raise TokenReduceError("this plan has no candidate rows (it was not written by tokenreduce tune); nothing "
                               "to plot", setting="plan")
    return plan.candidates


def table(plan: Plan, limit: int | None = None) -> str:
    """Markdown table of the candidates, best fidelity first (the chosen row marked)."""
    rows = sorted(_rows(plan), key=lambda r: (-r["fidelity"], r["flops_ratio"]))
    budget = ", ".join(f"{k} <= {v}" for k, v in plan.budget.items())
    lines = [f"budget: {budget}; metric: {plan.measured.get('metric', 'fidelity')}; latency: "
             f"{plan.target or 'not measured'}" + (f", batch {plan.batch}" if plan.batch else ""), "",
             "| | candidate | family | FLOPs ratio | latency ratio | speedup | fidelity |",
             "|---|---|---|---|---|---|---|"]
    for r in rows[:limit]:
        lat = r.get("latency_ratio")
        lines.append(f"| {'**chosen**' if r.get('chosen') else ''} | {r['label']} | {r['family']} | "
                     f"{r['flops_ratio']:.3f} | {'-' if lat is None else f'{lat:.3f}'} | "
                     f"{'-' if lat is None else f'{1 / lat:.2f}x'} | {r['fidelity']:.4f} |")
    return "\n".join(lines) + "\n"


def write_table(plan: Plan, path: str | os.PathLike[str]) -> Path:
    return write_text(path, table(plan))


def plot(plan: Plan, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Write the Pareto plot PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(plan)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    families = sorted({r["family"] for r in rows})
    cmap = plt.get_cmap("tab10")
    for i, fam in enumerate(families):
        for timed in (True, False):
            pts = [r for r in rows if r["family"] == fam and (r.get("latency_ratio") is not None) == timed]
            if not pts:
                continue
            xs = [1 / r["latency_ratio"] if timed else 1 / r["flops_ratio"] for r in pts]
            ys = [r["fidelity"] for r in pts]
            ax.scatter(xs, ys, s=28, color=cmap(i % 10) if timed else "none", edgecolors=cmap(i % 10),
                       label=f"{fam} ({'measured speedup' if timed else 'FLOPs speedup, not timed'})")
    chosen = next((r for r in rows if r.get("chosen")), None)
    if chosen is not None:
        lat = chosen.get("latency_ratio")
        x = 1 / lat if lat is not None else 1 / chosen["flops_ratio"]
        ax.scatter([x], [chosen["fidelity"]], marker="*", s=260, color="crimson", edgecolors="black", zorder=5,
                   label=f"chosen: {chosen['label']}"[:80])
    for kind, value in plan.budget.items():
        ax.axvline(1 / value, color="grey", linestyle="--", linewidth=1)
        ax.text(1 / value, ax.get_ylim()[0], f" {kind} budget {value}", color="grey", va="bottom", fontsize=8)
    ax.set_xlabel(f"speedup over the full model ({plan.target or 'FLOPs'}"
                  + (f", batch {plan.batch})" if plan.batch else ")"))
    ax.set_ylabel(f"fidelity ({plan.measured.get('metric', 'metric')})")
    ax.set_title(title or f"tokenreduce tune: {plan.model}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return write_bytes(path, buf.getvalue())
