"""The prepared GPU check: are the Triton kernels right on a real GPU, and what do they buy end to end?

    PYTHONPATH=. python scripts/gpu_check.py OUTDIR                # one CUDA GPU, under 8 minutes
    PYTHONPATH=. python scripts/gpu_check.py OUTDIR --dry-run      # the same on the CPU, tiny shapes (~30 s)
    PYTHONPATH=. python scripts/gpu_check.py OUTDIR --sections kernels --budget kernels=200

Sections (each in its own process with its own time budget, so a CUDA fault, a failed import or a hung
compile costs that section only; each records its traceback and the run goes on; one after the other on
the GPU, all at once in the dry run):

- kernels: every Triton kernel compiled against its pure-torch reference, on the interpreter test's shapes
  and dtypes plus 197/577/1024/4096 tokens in fp16/bf16/fp32: max error per case, pass/fail against per-dtype
  tolerances, the ops through `torch.ops.tokenreduce` and the `TOKENREDUCE_KERNELS=reference` escape hatch
  (`scripts/gpu_check_kernels.py`);
- vit: timm ViT-B/16 and ViT-L/16 with ToMe r=8/13/16 and EViT, eager and inductor, batch 1/32/256, fused
  kernels on and off: latency ratio, FLOPs ratio, efficiency (`scripts/gpu_check_e2e.py`);
- decoder: FastV and GemFilter prefill on a random-init 1B-class Llama at 4k and 16k tokens against the
  unpruned prefill (`scripts/gpu_check_e2e.py`).

Everything lands in OUTDIR: `gpu_check.json` (all sections), `gpu_check.md` (the same as tables),
`<section>.json` (written by the section as it goes) and `<section>.log` (its stderr). Each section
records torch/triton/transformers/timm/onnxruntime versions, the GPU, its capability and the date.

Runs from an uninstalled copy of the working tree (`PYTHONPATH=.`; the script also puts the repository
first on `sys.path`) with whatever torch, triton, timm and transformers the machine has: it imports
nothing else. `--dry-run` runs the kernels under `TRITON_INTERPRET=1` and the models as tiny seeded
configs on the CPU (tests/scripts/test_gpu_check.py runs it, so the script cannot rot without a GPU).
Exit status: 0 when no section failed (an "incomplete" section, cut by its time budget, says what it
skipped), 1 when one failed, 2 for bad arguments or no GPU without --dry-run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_common import REPO, Section, add_repo_to_path, env_info, write_json  # noqa: E402

SECTIONS = ("kernels", "vit", "decoder")
GPU_BUDGET_S = {"kernels": 90.0, "vit": 230.0, "decoder": 100.0}
DRY_BUDGET_S = {"kernels": 300.0, "vit": 300.0, "decoder": 300.0}  # ~20 s each on an idle CPU; room for a busy one
GPU_TOTAL_S = 420.0  # all sections together; with the last one's grace and start-ups: under 8 minutes
GRACE_S = {"gpu": 30.0, "dry": 120.0}  # past budget + grace a section is killed (what it saved is kept)


# ------------------------------------------------------------------------------------------------ worker
def run_worker(args: argparse.Namespace) -> int:
    """One section in this process; its record goes to OUTDIR/<section>.json."""
    add_repo_to_path()
    dev = "cpu" if args.dry_run else "cuda"
    sec = Section(args.worker, args.outdir, args.budget_s, args.dry_run, dev)
    failed = False
    with sec.guard(f"section {args.worker}"):
        if args.worker == "kernels":
            import gpu_check_kernels

            failed = gpu_check_kernels.run(sec, args.dry_run)
        elif args.worker == "vit":
            import gpu_check_e2e

            failed = gpu_check_e2e.run_vit(sec, args.dry_run, args.vit_models, args.vit_settings, args.inners)
        else:
            import gpu_check_e2e

            failed = gpu_check_e2e.run_decoder(sec, args.dry_run)
    sec.finish(failed)
    return 0


# ------------------------------------------------------------------------------------------------ parent
def section_env(name: str, dry_run: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TOKENREDUCE_KERNELS", None)  # each run chooses its kernels itself (on / off)
    if dry_run and name == "kernels":
        env["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: set before the process starts
    else:
        env.pop("TRITON_INTERPRET", None)
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is a CPU run, also on a machine with a GPU
    return env


@dataclass
class Running:
    name: str
    proc: subprocess.Popen[bytes]
    budget: float
    started: float
    log: Path


def section_budget(name: str, args: argparse.Namespace, budgets: dict[str, float], elapsed: float) -> float:
    """The section's budget, cut so that the later sections' budgets still fit in `--total` seconds."""
    if not args.total:
        return budgets[name]
    later = sum(budgets[n] for n in args.sections[args.sections.index(name) + 1:])
    return max(0.0, min(budgets[name], args.total - elapsed - later))


def start_section(name: str, args: argparse.Namespace, budget: float) -> Running:
    (args.outdir / f"{name}.json").unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), str(args.outdir), "--worker", name,
           "--budget-s", f"{budget:.0f}"]
    if args.dry_run:
        cmd.append("--dry-run")
    for flag in ("vit_models", "vit_settings", "inners"):
        if getattr(args, flag):
            cmd += [f"--{flag.replace('_', '-')}", *getattr(args, flag)]
    print(f"[gpu_check] section {name}: budget {budget:.0f} s", flush=True)
    log = args.outdir / f"{name}.log"
    with log.open("w") as err:  # the child keeps its own handle
        proc = subprocess.Popen(cmd, env=section_env(name, args.dry_run), stderr=err, cwd=str(REPO))
    return Running(name, proc, budget, time.monotonic(), log)


def collect_section(run: Running, dry_run: bool) -> dict[str, Any]:
    """Wait for a section (killing it past budget + grace) and read its record, adding what went wrong with
    the process itself (exit status, kill, no record) as an error with the tail of its stderr."""
    problem = None
    grace = GRACE_S["dry" if dry_run else "gpu"]
    try:
        rc = run.proc.wait(timeout=max(0.0, run.started + run.budget + grace - time.monotonic()))
        if rc != 0:
            problem = f"the section's process exited with status {rc}"
    except subprocess.TimeoutExpired:
        run.proc.kill()
        run.proc.wait()
        problem = f"killed after {run.budget + grace:.0f} s (budget {run.budget:.0f} s + {grace:.0f} s grace)"
    out = run.log.with_suffix(".json")
    data: dict[str, Any]
    if out.exists():
        data = json.loads(out.read_text())
    else:
        data = {"section": run.name, "status": "failed", "results": [], "skipped": [], "errors": [], "notes": [],
                "plan": {}, "env": env_info("cpu" if dry_run else "cuda"), "budget_s": run.budget}
        problem = problem or "the section wrote no record"
    if data.get("status") == "running" and problem is None:
        problem = "the section stopped before finishing its record"
    if problem:
        data["status"] = "failed"
        data["errors"].append({"where": f"section {run.name} process", "error": problem,
                               "traceback": run.log.read_text()[-4000:]})
    data["process_wall_s"] = round(time.monotonic() - run.started, 1)
    return data


def parse_budgets(items: list[str], dry_run: bool) -> dict[str, float]:
    budgets = dict(DRY_BUDGET_S if dry_run else GPU_BUDGET_S)
    for item in items:
        name, _, value = item.partition("=")
        if name not in SECTIONS or not value:
            raise SystemExit(f"--budget takes SECTION=SECONDS with SECTION one of {', '.join(SECTIONS)}; got {item!r}")
        budgets[name] = float(value)
    return budgets


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from gpu_check_e2e import GPU_VIT, INNERS, VIT_SETTINGS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", type=Path, help="folder for gpu_check.json, gpu_check.md and the sections' logs")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, kernels under TRITON_INTERPRET=1")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                   help=f"a section's time budget (defaults: GPU {GPU_BUDGET_S}, dry run {DRY_BUDGET_S})")
    p.add_argument("--total", type=float, default=None, metavar="SECONDS",
                   help=f"GPU run: cut section budgets so all fit in this (default {GPU_TOTAL_S:.0f}; 0: no cut)")
    p.add_argument("--vit-models", nargs="+", choices=sorted(GPU_VIT), help="vit: models (default both)")
    p.add_argument("--vit-settings", nargs="+", choices=list(VIT_SETTINGS), help="vit: settings (default all)")
    p.add_argument("--inners", nargs="+", choices=INNERS, help="vit: inner compilers (default eager inductor)")
    p.add_argument("--worker", choices=SECTIONS, help=argparse.SUPPRESS)
    p.add_argument("--budget-s", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run and args.vit_models:
        p.error("--vit-models names the GPU models; the dry run uses its own tiny configs")
    if args.total is None:
        args.total = 0.0 if args.dry_run else GPU_TOTAL_S
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return run_worker(args)
    budgets = parse_budgets(args.budget, args.dry_run)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("scripts/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); run it with "
                  "--dry-run to check the script on the CPU", file=sys.stderr)
            return 2
    t0 = time.monotonic()
    report: dict[str, Any] = {
        "script": "scripts/gpu_check.py", "argv": sys.argv[1:] if argv is None else argv, "dry_run": args.dry_run,
        "budgets_s": {s: budgets[s] for s in args.sections}, "total_s": args.total, "sections": {},
    }
    # dry run: CPU work, nothing timed that matters, so all sections at once; GPU: one after the other
    running = [start_section(name, args, budgets[name]) for name in args.sections] if args.dry_run else []
    for name in args.sections:
        if args.dry_run:
            run = running.pop(0)
        else:
            run = start_section(name, args, section_budget(name, args, budgets, time.monotonic() - t0))
        report["sections"][name] = collect_section(run, args.dry_run)
        report["wall_s"] = round(time.monotonic() - t0, 1)
        write_report(args.outdir, report)
    statuses = {n: s["status"] for n, s in report["sections"].items()}
    print(f"[gpu_check] done in {report['wall_s']:.0f} s: {statuses}; see {args.outdir / 'gpu_check.md'}", flush=True)
    return 1 if "failed" in statuses.values() else 0


# ------------------------------------------------------------------------------------------------ markdown
def _f(v: Any, fmt: str = ".3g") -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else ("yes" if v else "NO")
    if isinstance(v, (int, float)):
        return format(v, fmt)
    return str(v)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def kernel_lines(sec: dict[str, Any]) -> list[str]:
    rows = []
    for r in sec["results"]:
        checks = r.get("checks", {})
        worst_abs = max((c["abs"] for c in checks.values() if isinstance(c.get("abs"), float)), default=None)
        worst_rel = max((c["rel"] for c in checks.values() if isinstance(c.get("rel"), float)), default=None)
        bad = [n for n, c in checks.items() if not c["pass"]] + [
            k for k in ("hatch_equal", "idx_in_range", "plan_valid", "size_exact", "warned_ok") if r.get(k) is False]
        if r.get("plan_equal_required") and not r.get("plan_equal"):
            bad.append("plan_equal")
        timing = (f"{r['kernel_ms']:.4f} / {r['reference_ms']:.4f}" if "kernel_ms" in r else "-")
        rows.append([r["id"], r["kernel"], _f(worst_abs, ".2e"), _f(worst_rel, ".2e"),
                     "pass" if r["pass"] else "FAIL: " + ", ".join(bad), _f(r.get("plan_equal")), timing])
    head = ["case", "kernel", "max abs err", "max rel err", "result", "plan equal", "kernel / reference ms"]
    return _table(head, rows)


def model_lines(sec: dict[str, Any], kind: str) -> list[str]:
    rows = []
    for r in sec["results"]:
        name = f"{r['model']} {r['setting']}" if kind == "vit" else f"{r['method']} {r['tokens']}"
        where = f"{r['target']} b{r['batch']}" if kind == "vit" else f"span {r['span_tokens']}"
        rows.append([name, where, r["fused"], _f(r["latency_unreduced_ms"], ".3f"), _f(r["latency_reduced_ms"], ".3f"),
                     _f(r["latency_ratio"], ".3f"), _f(r["speedup"], ".2f"), _f(r["flops_ratio"], ".3f"),
                     _f(r["efficiency"], ".2f"), _f(r.get("fusion_rewrites")),
                     _f(r.get("max_abs_diff_vs_fused_on"), ".2e"),
                     "; ".join(r.get("problems", [])) or "-"])
    head = ["model / method", "target / tokens", "fused", "unreduced ms", "reduced ms", "latency ratio", "speedup",
            "FLOPs ratio", "efficiency", "fusion rewrites", "max diff vs fused", "problems"]
    return _table(head, rows)


def write_report(outdir: Path, report: dict[str, Any]) -> None:
    write_json(outdir / "gpu_check.json", report)
    lines = [f"# tokenreduce GPU check{' (dry run, CPU)' if report['dry_run'] else ''}", "",
             f"`scripts/gpu_check.py {' '.join(map(str, report['argv']))}`, {report.get('wall_s', 0):.0f} s.", ""]
    for name, sec in report["sections"].items():
        env = sec.get("env", {})
        lines += [f"## {name}: {sec['status']}", "",
                  f"{env.get('date')}; GPU {env.get('gpu')} (capability {env.get('capability')}); "
                  f"versions {env.get('versions')}; commit {env.get('git_commit')}; "
                  f"{sec.get('wall_s', '?')} s of a {sec.get('budget_s', '?')} s budget.", ""]
        if sec.get("plan"):
            lines += ["Plan: `" + json.dumps(sec["plan"], default=str)[:1500] + "`", ""]
        if sec["results"]:
            lines += (kernel_lines(sec) if name == "kernels" else model_lines(sec, name)) + [""]
        for n in sec.get("notes", []):
            lines.append(f"- note: {n}")
        for s in sec["skipped"]:
            lines.append(f"- skipped {s['what']}: {s['why']}")
        for e in sec["errors"]:
            lines += [f"- ERROR in {e['where']}: {e['error']}", "", "```", e["traceback"].rstrip(), "```"]
        lines.append("")
    (outdir / "gpu_check.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
