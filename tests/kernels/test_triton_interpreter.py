"""The Triton kernels run under the Triton interpreter (`TRITON_INTERPRET=1`, CPU) against arithmetic
written out here: materialised float64 attention, a dense one-hot merge matrix, float64 cosine matrices.

`TRITON_INTERPRET` is read when `@triton.jit` decorates a kernel, i.e. when the kernel module is first
imported, and the compile-only tests need the same modules compiled for real; so the numerics run in one
subprocess with the variable set (this file, run as a script with `--worker`), which first proves the
kernels it launches are `InterpretedFunction`s, then prints one JSON record per case. The tests below
hold the tolerances. Shapes cross 1, 17, 197 and 257 tokens, head dims 32/40/64, batch 1 and 3, causal
or not, no / float / bool masks, fp32/fp16/bf16; the whole run takes ~15 s on two cores.

The ops' CUDA implementations in `kernels/ops.py` (`_*_cuda`) run here too: in interpreter mode the
launchers accept CPU tensors, so the dispatch code (dtype casts, plan tail, reference fallback past a
kernel limit) is exercised as on a GPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

TOL = {  # (atol, rtol) per dtype: outputs in the input dtype, scores in fp32 from 16-bit inputs
    "float32": (2e-5, 1e-4),
    "float16": (2e-3, 1e-2),
    "bfloat16": (2e-2, 2e-2),
}
DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# id: (batch, heads, q rows, keys, head dim, dtype, causal, mask ("none" | "log" | "bool"), row, head_mean)
ATTN = {
    "n1-fp32": (1, 2, 1, 1, 32, "float32", False, "none", 0, True),
    "n17-b3-fp16-causal-last": (3, 2, 17, 17, 64, "float16", True, "none", -1, True),
    "n197-fp16-logsize-cls": (1, 2, 197, 197, 64, "float16", False, "log", 0, True),
    "n257-bf16-causal-bool-last": (1, 1, 257, 257, 32, "bfloat16", True, "bool", -1, True),
    "n17-b3-fp32-bool-row5-perhead": (3, 2, 17, 17, 32, "float32", False, "bool", 5, False),
    "n17-fp32-d40-causal-row3": (1, 2, 17, 17, 40, "float32", True, "log", 3, True),
    "m5-n17-fp32-cross": (2, 2, 5, 17, 32, "float32", False, "log", -1, False),
}
# id: (batch, heads, tokens, head dim, protected, dtype, padded rows, r)
MATCH = {
    "n197-b3-fp32-p1": (3, 2, 197, 64, 1, "float32", 0, 13),
    "n17-fp16-p2-padding": (2, 1, 17, 32, 2, "float16", 1, 5),
    "n257-bf16-p0": (1, 2, 257, 64, 0, "bfloat16", 0, 100),
    "n2-fp32-p0": (3, 1, 2, 16, 0, "float32", 0, 1),
    "n18-fp32-p5-padding": (3, 2, 18, 32, 5, "float32", 2, 6),
}
# id: (batch, tokens, channels, dtype, plan kind)
MERGE = {
    "tome-n197-fp32": (1, 197, 48, "float32", "tome"),
    "tome-n17-b3-fp16": (3, 17, 64, "float16", "tome"),
    "evit-fuse-n17-b3-bf16": (3, 17, 40, "bfloat16", "evit"),
    "evit-drop-n33-fp32": (2, 33, 32, "float32", "evit-drop"),
    "zero-weight-slot-fp32": (1, 4, 24, "float32", "zero"),
    "gather-n1-fp16": (1, 1, 16, "float16", "identity"),
}


# ---------------------------------------------------------------------------------- independent math
def _attention64(q, k, v, bias, scale, causal):
    """float64 softmax(q k^T * scale + bias) materialised: (probabilities [B, H, M, N], out)."""
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + (torch.where(bias, 0.0, -math.inf).double() if bias.dtype == torch.bool else bias.double())
    if causal:
        m, n = logits.shape[-2:]
        logits = logits.masked_fill(torch.ones(m, n, dtype=torch.bool).triu(1), -math.inf)
    p = logits.softmax(-1)
    return p, p @ v.double()


def _merge64(x, slot, weight, size, n_out):
    """x' = (W @ x) / W.sum, size' = (S @ size) with W[b, s, i] = w_i [slot_i == s] (dense one-hot)."""
    bsz, n, _ = x.shape
    size = torch.ones(bsz, n, dtype=torch.float64) if size is None else size.double()
    w = size if weight is None else weight.double()
    onehot = (slot[:, None, :] == torch.arange(n_out)[None, :, None]).double()  # [B, n_out, N]
    wmat = onehot * w[:, None, :]
    wsum = wmat.sum(-1, keepdim=True)
    out = (wmat @ x.double()) / torch.where(wsum > 0, wsum, torch.ones_like(wsum))
    out_size = (onehot * torch.where(w > 0, size, 0.0)[:, None, :]).sum(-1)
    return out, out_size


def _err(got, exp):
    got, exp = got.double(), exp.double()
    fin = torch.isfinite(exp)
    if not torch.equal(fin, torch.isfinite(got)):
        return {"abs": math.inf, "rel": math.inf}
    if not fin.any():
        return {"abs": 0.0, "rel": 0.0}
    d = (got[fin] - exp[fin]).abs()
    return {"abs": float(d.max()), "rel": float((d / exp[fin].abs().clamp_min(1e-3)).max())}


# ---------------------------------------------------------------------------------- worker (subprocess)
def _attn_case(bsz, heads, m, n, d, dt, causal, mask, row, head_mean):
    from tokenreduce.kernels import ops
    from tokenreduce.kernels.triton import attention

    g = torch.Generator().manual_seed(m * 7 + n + d)
    dtype = DT[dt]
    q, k, v = (torch.randn(bsz, heads, t, d, generator=g).to(dtype) for t in (m, n, n))
    bias = None
    if mask == "log":
        bias = torch.randint(1, 5, (bsz, 1, 1, n), generator=g).float().log().to(dtype)
    elif mask == "bool":
        bias = torch.rand(bsz, 1, 1, n, generator=g) > 0.3
        bias[..., 0] = True  # row 0 of a causal attention sees key 0 only
    scale = d**-0.5
    out, rows, cols = attention.attention_with_scores(q, k, v, bias, scale, causal, row, True, head_mean)
    p, ref_out = _attention64(q, k, v, bias, scale, causal)
    ridx = row % m
    ref_rows = p[:, :, ridx, :]
    ref_cols = p.mean(dim=2)
    if head_mean:
        ref_rows, ref_cols = ref_rows.mean(1), ref_cols.mean(1)
    rec = {"out": _err(out, ref_out), "rows": _err(rows, ref_rows), "cols": _err(cols, ref_cols),
           "out_dtype": str(out.dtype).removeprefix("torch."), "rows_shape": list(rows.shape)}
    if not causal:  # the one-row kernel (query_row_scores) and the ops' CUDA paths
        qrs = attention.query_row_scores(q, k, bias, scale, row, head_mean)
        rec["qrs"] = _err(qrs, ref_rows)
        if head_mean:
            op_out, op_rows = ops._attention_with_scores_cuda(q, k, v, bias, scale, causal, row)
            rec["op_out"], rec["op_rows"] = _err(op_out, ref_out), _err(op_rows, ref_rows)
            rec["op_dtypes"] = [str(op_out.dtype), str(op_rows.dtype)]
            rec["op_qrs"] = _err(ops._query_row_scores_cuda(q, k, bias, scale, row), ref_rows)
    return rec


def _match_case(bsz, heads, n, d, p, dt, pad, r):
    from tokenreduce.kernels import ops, plans
    from tokenreduce.kernels.triton import matching

    g = torch.Generator().manual_seed(n * 3 + p)
    k = torch.randn(bsz, heads, n, d, generator=g).to(DT[dt])
    valid = None
    if pad:
        valid = torch.ones(bsz, n, dtype=torch.bool)
        valid[-pad:, n - 5:] = False  # the last rows are right-padded
    node_max, node_idx = matching.bipartite_match(k, p, valid)
    # float64 cosine matrix from the same head-averaged keys, masked as docs/methods.md steps 3-4
    metric = k.mean(dim=1).double()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, 0::2], metric[:, 1::2]
    cos = a @ b.transpose(-1, -2)
    if valid is not None:
        va, vb = valid[:, 0::2], valid[:, 1::2]
        cos = cos.masked_fill(~va[:, :, None] & vb[:, None, :], -2.0).masked_fill(va[:, :, None] & ~vb[:, None, :], -3.0)
    cos[:, : (p + 1) // 2, :] = -math.inf
    cos[:, :, : p // 2] = -math.inf
    exp_max = cos.max(-1).values
    picked = cos.gather(-1, node_idx[:, :, None])[:, :, 0]  # the score of the B token the kernel chose
    rec = {"max": _err(node_max, exp_max), "picked": _err(picked, exp_max),
           "dtypes": [str(node_max.dtype), str(node_idx.dtype)],
           "idx_in_range": bool(((node_idx >= 0) & (node_idx < n // 2)).all())}
    if dt == "float32":  # exact plan equality with the reference on fp32 keys (no near-ties at these seeds)
        got = ops._tome_plan_cuda(k, r, p, valid)
        exp = plans.bipartite_plan(k, r, p, valid)
        rec["plan_equal"] = all(torch.equal(x, y) for x, y in zip(got, exp))
        rec["plan_dtypes"] = [str(t.dtype) for t in got]
    else:  # plan invariants: a permutation-complete slot map of N - r slots
        slot, rep, keep = ops._tome_plan_cuda(k, r, p, valid)
        counts = torch.zeros(bsz, n - r, dtype=torch.long).scatter_add(1, slot, torch.ones_like(slot))
        rec["plan_valid"] = bool((counts >= 1).all()) and rep.shape == (bsz, n - r) and keep.dtype == k.dtype
    return rec


def _plan(kind, bsz, n, g):
    """(slot, weight, size, n_out) for a plan of the given kind."""
    from tokenreduce.kernels import plans

    size = torch.randint(1, 5, (bsz, n), generator=g).float()
    if kind == "tome":
        slot, _, _ = plans.bipartite_plan(torch.randn(bsz, 2, n, 16, generator=g), n // 3, 1)
        return slot, None, size, n - n // 3
    if kind in ("evit", "evit-drop"):
        scores = torch.rand(bsz, n, generator=g).softmax(-1)
        fuse = kind == "evit"
        slot, weight, rep = plans.topk_plan(scores, (n - 1) // 2, 1, fuse)
        return slot, weight, size, rep.shape[1]
    if kind == "zero":
        return torch.tensor([[0, 1, 1, 2]]), torch.tensor([[1.0, 0.0, 0.0, 2.0]]), size, 3
    return torch.arange(n).expand(bsz, n), None, None, n


def _merge_case(bsz, n, c, dt, kind):
    from tokenreduce.kernels import ops
    from tokenreduce.kernels.triton import merge

    g = torch.Generator().manual_seed(n + c)
    x = torch.randn(bsz, n, c, generator=g).to(DT[dt])
    slot, weight, size, n_out = _plan(kind, bsz, n, g)
    if weight is not None:
        weight = weight.to(DT[dt])
    out, out_size = merge.apply_plan(x, slot, weight, size, n_out)
    ref_out, ref_size = _merge64(x, slot, weight, size, n_out)
    op_out, op_size = ops._apply_plan_cuda(x, slot, weight, size, n_out)
    return {"out": _err(out, ref_out), "size": _err(out_size, ref_size), "op": _err(op_out, ref_out),
            "dtypes": [str(out.dtype), str(out_size.dtype)], "shape": list(out.shape)}


def _fallback_case():
    """float64 is outside the kernels: the CUDA op path warns and runs the reference."""
    import warnings

    from tokenreduce.kernels import ops

    x = torch.randn(1, 5, 8, dtype=torch.float64)
    slot = torch.tensor([[0, 0, 1, 2, 2]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, size = ops._apply_plan_cuda(x, slot, None, None, 3)
    ref_out, ref_size = _merge64(x, slot, None, None, 3)
    return {"warned": [str(w.message) for w in caught], "out": _err(out, ref_out), "dtype": str(out.dtype)}


def _worker() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from triton.runtime.interpreter import InterpretedFunction

    from tokenreduce.kernels.triton import attention, matching, merge

    kernels = [attention._attn_fwd_kernel, attention._attn_colsum_kernel, attention._row_scores_kernel,
               matching._match_kernel, merge._merge_kernel]
    results = {"interpreted": all(isinstance(kern, InterpretedFunction) for kern in kernels), "cases": {}}
    for group, cases, fn in (("attn", ATTN, _attn_case), ("match", MATCH, _match_case), ("merge", MERGE, _merge_case)):
        for cid, args in cases.items():
            results["cases"][f"{group}/{cid}"] = fn(*args)
    results["cases"]["fallback"] = _fallback_case()
    print("RESULTS " + json.dumps(results))


# ---------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def interp():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__, "--worker"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


def _close(err, dt, name):
    atol, rtol = TOL[dt]
    assert err["abs"] <= atol or err["rel"] <= rtol, f"{name}: {err} beyond atol={atol} rtol={rtol} ({dt})"


def test_worker_ran_the_interpreter(interp):
    assert interp["interpreted"] is True


@pytest.mark.parametrize("cid", list(ATTN))
def test_attention_with_scores(interp, cid):
    bsz, heads, m, n, d, dt, causal, mask, row, head_mean = ATTN[cid]
    rec = interp["cases"][f"attn/{cid}"]
    assert rec["out_dtype"] == dt
    assert rec["rows_shape"] == ([bsz, n] if head_mean else [bsz, heads, n])
    _close(rec["out"], dt, "out")
    for key in ("rows", "cols", "qrs"):
        if key in rec:  # fp32 scores: fp16/bf16 error only comes from the inputs' logits
            _close(rec[key], "float32" if dt == "float32" else "float16", key)
    if "op_out" in rec:
        _close(rec["op_out"], dt, "op out")
        _close(rec["op_rows"], dt, "op rows")  # returned in the input dtype
        _close(rec["op_qrs"], dt, "op query_row_scores")
        assert rec["op_dtypes"] == [f"torch.{dt}"] * 2


@pytest.mark.parametrize("cid", list(MATCH))
def test_bipartite_match(interp, cid):
    dt = MATCH[cid][5]
    rec = interp["cases"][f"match/{cid}"]
    assert rec["dtypes"] == ["torch.float32", "torch.int64"]
    assert rec["idx_in_range"]
    _close(rec["max"], dt, "row max")
    _close(rec["picked"], dt, "score of the chosen B token")  # argmax up to ties within rounding
    if dt == "float32":
        assert rec["plan_equal"], "GPU plan (kernel + plan_from_matches) differs from plans.bipartite_plan"
        assert rec["plan_dtypes"] == ["torch.int64", "torch.int64", "torch.float32"]
    else:
        assert rec["plan_valid"]


@pytest.mark.parametrize("cid", list(MERGE))
def test_apply_plan(interp, cid):
    bsz, n, c, dt, kind = MERGE[cid]
    rec = interp["cases"][f"merge/{cid}"]
    assert rec["dtypes"] == [f"torch.{dt}", "torch.float32" if kind != "identity" else f"torch.{dt}"]
    assert rec["shape"][0] == bsz and rec["shape"][2] == c
    _close(rec["out"], dt, "merged tokens")
    _close(rec["op"], dt, "op merged tokens")
    assert rec["size"]["abs"] == 0.0  # sizes are sums of small integers: exact


def test_unsupported_dtype_falls_back_with_warning(interp):
    rec = interp["cases"]["fallback"]
    assert any("apply_plan" in w and "torch.float64" in w for w in rec["warned"]), rec["warned"]
    assert rec["dtype"] == "torch.float64"
    assert rec["out"]["abs"] < 1e-12


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
