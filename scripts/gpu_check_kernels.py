"""Section "kernels" of scripts/gpu_check.py: every Triton kernel against its pure-torch reference.

On a GPU the kernels run compiled; in the dry run (CPU) the parent starts this section with
`TRITON_INTERPRET=1`, and the section records whether the kernels it launched were interpreted
(`plan.interpreted`), so neither mode can pass for the other.

Kernels and what each case compares (errors as max abs / max rel, pass = abs <= atol or rel <= rtol,
per-dtype tolerances of tests/kernels/test_triton_interpreter.py):

- `attention_with_scores` (forward + row scores, `col_mean=True` runs the column-sum kernel too) and the
  one-row `query_row_scores` kernel, against `kernels/triton/reference.py` on float64 copies of the inputs;
- the bipartite matching kernel, against the reference matching on the float64 head-mean keys (row max, and
  the reference score of the B token the kernel picked: a near-tie may pick another token of equal score);
  the `tome_plan` op's plan against `tome_plan`'s reference (exactly, on the interpreter test's fp32
  shapes; elsewhere a complete slot map, since near-equal row maxima may order differently);
- the merge kernel, against `kernels/reference.py`'s `apply_plan` in float64 (sizes exactly);
- each custom op called through `torch.ops.tokenreduce` on the device (on a GPU: the CUDA registration,
  i.e. the kernel), and the escape hatch: under `use_reference_kernels()` the op must return exactly what
  its reference returns;
- a float64 input through the op (outside the kernels: the reference runs, with a warning on a GPU).

Shapes: the interpreter test's tables (read from tests/kernels/test_triton_interpreter.py with `ast`, so
they stay one definition; the dry run keeps those of at most 17 tokens), plus realistic sizes: 197, 577,
1024 and 4096 tokens in fp16/bf16/fp32 (ViT-B heads; the causal last-row case FastV runs at 1024/4096).
Realistic cases are also timed: kernel vs the reference path the op would otherwise run.
"""

from __future__ import annotations

import ast
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gpu_check_common import REPO, Section, kernel_ms

INTERPRETER_TESTS = REPO / "tests" / "kernels" / "test_triton_interpreter.py"
TOL = {"float32": (2e-5, 1e-4), "float16": (2e-3, 1e-2), "bfloat16": (2e-2, 2e-2)}
DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GPU_TOKENS = (197, 577, 1024, 4096)
TIMING = {"cuda": (20, 5), "cpu": (1, 1)}  # (calls per round, rounds); the interpreter is slow
DRY_TOKENS = (9,)
DRY_MAX_TOKENS = 17
TOKEN_FIELD = {"ATTN": 3, "MATCH": 2, "MERGE": 1}  # where each table's tuple holds the token count


# ------------------------------------------------------------------------------------------------ cases
def interpreter_tables(path: Path = INTERPRETER_TESTS) -> dict[str, dict[str, tuple[Any, ...]]]:
    """The ATTN / MATCH / MERGE case tables of the interpreter test (literal dicts), read without importing
    it (it needs pytest, which a GPU image may lack)."""
    tree = ast.parse(path.read_text())
    tables = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("ATTN", "MATCH", "MERGE"):
                tables[node.targets[0].id] = ast.literal_eval(node.value)
    missing = {"ATTN", "MATCH", "MERGE"} - set(tables)
    if missing:
        raise ValueError(f"{path} has no literal {sorted(missing)} case tables any more")
    return tables


def realistic_tables(dry_run: bool) -> dict[str, dict[str, tuple[Any, ...]]]:
    """Same tuple layouts as the interpreter tables, at ViT/decoder sizes (tiny ones in the dry run)."""
    heads, d, chans = (2, 32, 48) if dry_run else (12, 64, 768)
    dec_heads = 2 if dry_run else 32
    attn, match, merge = {}, {}, {}
    for n in DRY_TOKENS if dry_run else GPU_TOKENS:
        for dt in ("float16", "bfloat16", "float32"):
            short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dt]
            attn[f"vit-n{n}-{short}-logsize-cls"] = (2, heads, n, n, d, dt, False, "log", 0, True)
            if dry_run or n >= 1024:
                attn[f"dec-n{n}-{short}-causal-last"] = (1, dec_heads, n, n, d, dt, True, "none", -1, True)
            match[f"vit-n{n}-{short}-p1"] = (2, heads, n, d, 1, dt, 0, n // 4)
            merge[f"tome-n{n}-{short}"] = (4, n, chans, dt, "tome")
            merge[f"evit-fuse-n{n}-{short}"] = (4, n, chans, dt, "evit")
    return {"ATTN": attn, "MATCH": match, "MERGE": merge}


# ------------------------------------------------------------------------------------------------ checks
def max_error(got: torch.Tensor, exp: torch.Tensor) -> dict[str, float]:
    """Max abs and max rel (|d| / max(|exp|, 1e-3)) error over finite entries; inf when finiteness differs."""
    got, exp = got.detach().double().cpu(), exp.detach().double().cpu()
    if got.shape != exp.shape:
        raise ValueError(f"shape {tuple(got.shape)} differs from the reference's {tuple(exp.shape)}")
    fin = torch.isfinite(exp)
    if not torch.equal(fin, torch.isfinite(got)):
        return {"abs": math.inf, "rel": math.inf}
    if not fin.any():
        return {"abs": 0.0, "rel": 0.0}
    d = (got[fin] - exp[fin]).abs()
    return {"abs": float(d.max()), "rel": float((d / exp[fin].abs().clamp_min(1e-3)).max())}


def check(got: torch.Tensor, exp: torch.Tensor, dt: str) -> dict[str, Any]:
    err = max_error(got, exp)
    atol, rtol = TOL[dt]
    return {**err, "atol": atol, "rtol": rtol, "pass": err["abs"] <= atol or err["rel"] <= rtol}


def exact(got: tuple[torch.Tensor, ...], exp: tuple[torch.Tensor, ...]) -> bool:
    return len(got) == len(exp) and all(torch.equal(a, b) for a, b in zip(got, exp))


def _randn(shape: tuple[int, ...], g: torch.Generator, dtype: torch.dtype, dev: str) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype).to(dev)


# ------------------------------------------------------------------------------------------------ kernels
def attn_case(dev: str, timed: bool, bsz: int, heads: int, m: int, n: int, d: int, dt: str, causal: bool,
              mask: str, row: int, head_mean: bool) -> dict[str, Any]:
    from tokenreduce.kernels import use_reference_kernels
    from tokenreduce.kernels.triton import attention
    from tokenreduce.kernels.triton import reference as kref

    g = torch.Generator().manual_seed(m * 7 + n + d)
    dtype = DT[dt]
    q, k, v = (_randn((bsz, heads, t, d), g, dtype, dev) for t in (m, n, n))
    bias = None
    if mask == "log":
        bias = torch.randint(1, 5, (bsz, 1, 1, n), generator=g).float().log().to(dtype).to(dev)
    elif mask == "bool":
        cpu_bias = torch.rand(bsz, 1, 1, n, generator=g) > 0.3
        cpu_bias[..., 0] = True  # row 0 of a causal attention sees key 0 only
        bias = cpu_bias.to(dev)
    scale = d**-0.5
    score_dt = "float32" if dt == "float32" else "float16"  # scores are fp32: only the logits' inputs round
    out, rows, cols = attention.attention_with_scores(q, k, v, bias, scale, causal, row, True, head_mean)
    b64 = bias.double() if bias is not None and bias.dtype != torch.bool else bias
    ref_out, ref_rows, ref_cols = kref.attention_with_scores(q.double(), k.double(), v.double(), b64, scale, causal,
                                                             row, True, head_mean)
    assert rows is not None and cols is not None and ref_rows is not None and ref_cols is not None
    checks = {"out": check(out, ref_out, dt), "rows": check(rows, ref_rows, score_dt),
              "cols": check(cols, ref_cols, score_dt)}
    rec: dict[str, Any] = {}
    if not causal:
        checks["query_row_scores"] = check(attention.query_row_scores(q, k, bias, scale, row, head_mean), ref_rows,
                                           score_dt)
    if head_mean:  # the ops (head-averaged scores, returned in the input dtype) and the escape hatch
        op_out, op_rows = torch.ops.tokenreduce.attention_with_scores(q, k, v, bias, scale, causal, row)
        checks["op out"] = check(op_out, ref_out, dt)
        checks["op rows"] = check(op_rows, ref_rows, dt)
        with use_reference_kernels():
            hatch = torch.ops.tokenreduce.attention_with_scores(q, k, v, bias, scale, causal, row)
        rec["hatch_equal"] = exact(hatch, kref.attention_with_row_scores(q, k, v, bias, scale, causal, row))
        if not causal:
            checks["op query_row_scores"] = check(torch.ops.tokenreduce.query_row_scores(q, k, bias, scale, row),
                                                  ref_rows, dt)
    if timed:
        rec["kernel_ms"] = kernel_ms(lambda: attention.attention_with_scores(q, k, v, bias, scale, causal, row),
                                     dev, *TIMING[dev])
        rec["reference_ms"] = kernel_ms(lambda: kref.attention_with_row_scores(q, k, v, bias, scale, causal, row),
                                        dev, *TIMING[dev])
        rec["timed"] = "attention + one score row: kernel vs SDPA + reference row"
    return {"checks": checks, **rec}


def masked_cosines(metric: torch.Tensor, num_protected: int, valid: torch.Tensor | None) -> torch.Tensor:
    """The `[B, ceil(N/2), N//2]` A-to-B cosine matrix with protected rows/columns at -inf and padding
    pairs at -2 / -3 (docs/methods.md, ToMe steps 3-4), from `metric [B, N, d]`."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    cos = metric[:, 0::2] @ metric[:, 1::2].transpose(-1, -2)
    if valid is not None:
        va, vb = valid[:, 0::2], valid[:, 1::2]
        cos = cos.masked_fill(~va[:, :, None] & vb[:, None, :], -2.0)
        cos = cos.masked_fill(va[:, :, None] & ~vb[:, None, :], -3.0)
    cos[:, : (num_protected + 1) // 2, :] = -math.inf
    cos[:, :, : num_protected // 2] = -math.inf
    return cos


def match_case(dev: str, timed: bool, bsz: int, heads: int, n: int, d: int, p: int, dt: str, pad: int,
               r: int) -> dict[str, Any]:
    from tokenreduce.kernels import use_reference_kernels
    from tokenreduce.kernels.triton import matching
    from tokenreduce.kernels.triton import reference as kref

    g = torch.Generator().manual_seed(n * 3 + p)
    k = _randn((bsz, heads, n, d), g, DT[dt], dev)
    valid = None
    if pad:
        valid = torch.ones(bsz, n, dtype=torch.bool)
        valid[-pad:, n - 5:] = False  # the last rows are right-padded
        valid = valid.to(dev)
    node_max, node_idx = matching.bipartite_match(k, p, valid)
    metric = k.mean(dim=1).double()  # the kernel averages heads in the input dtype too
    ref_max, _ = kref.bipartite_match(metric, p, valid)
    picked = masked_cosines(metric, p, valid).gather(-1, node_idx[:, :, None])[:, :, 0]
    checks = {"row max": check(node_max, ref_max, dt), "score of the picked B token": check(picked, ref_max, dt)}
    rec: dict[str, Any] = {"idx_in_range": bool(((node_idx >= 0) & (node_idx < n // 2)).all())}
    plan = torch.ops.tokenreduce.tome_plan(k, r, p, valid)
    slot, rep, keep = plan
    counts = torch.zeros(bsz, n - r, dtype=torch.long, device=dev).scatter_add(1, slot, torch.ones_like(slot))
    rec["plan_valid"] = bool((counts >= 1).all()) and tuple(rep.shape) == (bsz, n - r) and keep.dtype == k.dtype
    rec["plan_equal"] = exact(plan, kref.tome_plan(k, r, p, valid))
    # exact on the interpreter test's fp32 shapes (no near-ties at its seeds); realistic sizes hold thousands
    # of row maxima, where two within fp32 rounding of each other may sort either way
    rec["plan_equal_required"] = dt == "float32" and not timed
    with use_reference_kernels():
        hatch = torch.ops.tokenreduce.tome_plan(k, r, p, valid)
    rec["hatch_equal"] = exact(hatch, kref.tome_plan(k, r, p, valid))
    if timed:
        rec["kernel_ms"] = kernel_ms(lambda: matching.tome_plan(k, r, p, valid), dev, *TIMING[dev])
        rec["reference_ms"] = kernel_ms(lambda: kref.tome_plan(k, r, p, valid), dev, *TIMING[dev])
        rec["timed"] = f"ToMe plan r={r}: matching kernel + plan tail vs reference plan"
    return {"checks": checks, **rec}


def merge_plan(kind: str, bsz: int, n: int, g: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
    """(slot, weight, size, n_out) of a plan of the given kind, made by the plan ops on the CPU."""
    size = torch.randint(1, 5, (bsz, n), generator=g).float()
    if kind == "tome":
        slot, _, _ = torch.ops.tokenreduce.tome_plan(torch.randn(bsz, 2, n, 16, generator=g), n // 3, 1, None)
        return slot, None, size, n - n // 3
    if kind in ("evit", "evit-drop"):
        scores = torch.rand(bsz, n, generator=g).softmax(-1)
        slot, weight, rep = torch.ops.tokenreduce.topk_plan(scores, (n - 1) // 2, 1, kind == "evit", None)
        return slot, weight, size, rep.shape[1]
    if kind == "zero":
        return torch.tensor([[0, 1, 1, 2]]), torch.tensor([[1.0, 0.0, 0.0, 2.0]]), size, 3
    if kind == "identity":
        return torch.arange(n).expand(bsz, n), None, None, n
    raise ValueError(f"unknown merge plan kind {kind!r}")


def merge_case(dev: str, timed: bool, bsz: int, n: int, c: int, dt: str, kind: str) -> dict[str, Any]:
    from tokenreduce.kernels import reference, use_reference_kernels
    from tokenreduce.kernels.triton import merge

    g = torch.Generator().manual_seed(n + c)
    x = _randn((bsz, n, c), g, DT[dt], dev)
    slot, weight, size, n_out = merge_plan(kind, bsz, n, g)
    slot = slot.to(dev)
    weight = weight.to(DT[dt]).to(dev) if weight is not None else None
    size = size.to(dev) if size is not None else None
    out, out_size = merge.apply_plan(x, slot, weight, size, n_out)
    ref_out, ref_size = reference.apply_plan(x.double(), slot, weight.double() if weight is not None else None,
                                             size.double() if size is not None else None, n_out)
    checks = {"out": check(out, ref_out, dt)}
    rec: dict[str, Any] = {"size_exact": max_error(out_size, ref_size)["abs"] == 0.0}
    op_out, _ = torch.ops.tokenreduce.apply_plan(x, slot, weight, size, n_out)
    checks["op out"] = check(op_out, ref_out, dt)
    with use_reference_kernels():
        hatch = torch.ops.tokenreduce.apply_plan(x, slot, weight, size, n_out)
    rec["hatch_equal"] = exact(hatch, reference.apply_plan(x, slot, weight, size, n_out))
    if timed:
        rec["kernel_ms"] = kernel_ms(lambda: merge.apply_plan(x, slot, weight, size, n_out), dev, *TIMING[dev])
        rec["reference_ms"] = kernel_ms(lambda: reference.apply_plan(x, slot, weight, size, n_out), dev, *TIMING[dev])
        rec["timed"] = f"merge {n} -> {n_out} tokens: kernel vs reference"
    return {"checks": checks, **rec}


def fallback_case(dev: str) -> dict[str, Any]:
    """float64 is outside the kernels: the op runs the reference (on a GPU with a one-time warning)."""
    from tokenreduce.kernels import reference

    x = torch.randn(1, 5, 8, dtype=torch.float64, device=dev)
    slot = torch.tensor([[0, 0, 1, 2, 2]], device=dev)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.ops.tokenreduce.apply_plan(x, slot, None, None, 3)
    warned = [str(w.message) for w in caught if "pure-torch reference" in str(w.message)]
    rec: dict[str, Any] = {"warned": warned, "hatch_equal": exact(out, reference.apply_plan(x, slot, None, None, 3))}
    if dev == "cuda":
        rec["warned_ok"] = any("apply_plan" in w and "float64" in w for w in warned)
    return {"checks": {}, **rec}


def case_passed(rec: dict[str, Any]) -> bool:
    ok = all(c["pass"] for c in rec["checks"].values())
    for flag in ("hatch_equal", "idx_in_range", "plan_valid", "size_exact", "warned_ok"):
        ok = ok and rec.get(flag, True)
    if rec.get("plan_equal_required"):
        ok = ok and rec["plan_equal"]
    return bool(ok)


# ------------------------------------------------------------------------------------------------ section
def kernels_are_interpreted() -> dict[str, bool]:
    """Every `@triton.jit` kernel defined in the kernel modules: is it an interpreter function?"""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from tokenreduce.kernels.triton import attention, matching, merge

    found = {}
    for mod in (attention, matching, merge):
        for name, obj in vars(mod).items():
            defined_here = getattr(getattr(obj, "fn", None), "__module__", None) == mod.__name__
            if defined_here and isinstance(obj, (JITFunction, InterpretedFunction)):
                found[f"{mod.__name__.rsplit('.', 1)[-1]}.{name}"] = isinstance(obj, InterpretedFunction)
    if not found:
        raise RuntimeError("found no Triton kernels in tokenreduce.kernels.triton.{attention,matching,merge}")
    return found


def run(sec: Section, dry_run: bool) -> bool:
    """Every case; returns True when some case failed its tolerances (errors are recorded separately)."""
    dev = "cpu" if dry_run else "cuda"
    import tokenreduce  # noqa: F401  (registers torch.ops.tokenreduce)

    interpreted = kernels_are_interpreted()
    sec.data["plan"].update(interpreted=interpreted, tolerances=TOL, device=dev)
    if any(flag != dry_run for flag in interpreted.values()):
        raise RuntimeError(f"kernels interpreted: {interpreted}, dry run: {dry_run}; TRITON_INTERPRET=1 must be set "
                           "exactly for the dry run (scripts/gpu_check.py sets it for this section)")
    groups: list[tuple[str, dict[str, tuple[Any, ...]], bool]] = []
    with sec.guard("reading the interpreter test's case tables"):
        tables = interpreter_tables()
        for name, table in tables.items():
            kept = {cid: args for cid, args in table.items()
                    if not dry_run or args[TOKEN_FIELD[name]] <= DRY_MAX_TOKENS}
            groups.append((name, kept, False))
    for name, table in realistic_tables(dry_run).items():
        groups.append((name, table, True))
    sec.data["plan"]["cases"] = {f"{'realistic' if real else 'interpreter'}/{name}": list(table)
                                 for name, table, real in groups}
    failed = False
    with sec.guard("fallback"):
        rec = {"id": "fallback/float64-apply_plan", "kernel": "apply_plan (op, float64)", **fallback_case(dev)}
        rec["pass"] = case_passed(rec)
        failed |= not rec["pass"]
        sec.add(rec)
    runners: dict[str, tuple[str, Callable[..., dict[str, Any]]]] = {
        "ATTN": ("attention_with_scores", attn_case),
        "MATCH": ("bipartite_match + tome_plan", match_case),
        "MERGE": ("apply_plan", merge_case),
    }
    for name, table, real in groups:
        kernel, fn = runners[name]
        for cid, args in table.items():
            full_id = f"{'realistic' if real else 'interpreter'}/{name.lower()}/{cid}"
            if not sec.afford(full_id, 2.0):
                continue
            with sec.guard(full_id):
                rec = {"id": full_id, "kernel": kernel, "args": list(args), **fn(dev, real, *args)}
                rec["pass"] = case_passed(rec)
                failed |= not rec["pass"]
                worst = max((c["abs"] for c in rec["checks"].values()), default=0.0)
                sec.progress(f"{'ok  ' if rec['pass'] else 'FAIL'} {full_id}  max abs err {worst:.2e}")
                sec.add(rec)
    return failed
