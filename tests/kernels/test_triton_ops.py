"""The kernels' pure-torch references and the ops around them, in-process (no interpreter needed).

- `kernels/triton/reference.py` splits ToMe's plan where the matching kernel cuts it
  (`bipartite_match` + `plan_from_matches`); the split must give exactly `plans.bipartite_plan`'s plan.
- `reference.attention_with_scores` against attention written out in the test (float64, materialised).
- the `tokenreduce::attention_with_scores` op contract (`opcheck`), one node under torch.export and
  Dynamo, its FLOP formula.
- the launchers' refusals: each limit raises `KernelLimitError` (the ops then fall back to the reference)
  and each invalid input a plain `TokenReduceError`, with the numbers in the message.
- without triton, the package still imports, says why, and the CUDA op path runs the reference.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce  # noqa: F401  (registers torch.ops.tokenreduce.*)
from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels import plans
from tokenreduce.kernels.triton import KernelLimitError
from tokenreduce.kernels.triton import reference as kref

tr = torch.ops.tokenreduce


# ------------------------------------------------------------------------------ references
@pytest.mark.parametrize("n,p,r,pad", [(17, 1, 5, 0), (18, 2, 4, 0), (16, 0, 8, 0), (21, 5, 3, 0), (197, 1, 13, 0),
                                       (16, 1, 6, 2), (17, 2, 7, 3), (9, 1, 4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_plan_split_equals_bipartite_plan(n, p, r, pad, dtype):
    g = torch.Generator().manual_seed(n * 31 + p * 7 + r)
    k = torch.randn(3, 2, n, 16, generator=g).to(dtype)
    valid = None
    if pad:
        valid = torch.ones(3, n, dtype=torch.bool)
        valid[1:, n - 5 * pad:] = False
    got = kref.tome_plan(k, r, p, valid)
    exp = plans.bipartite_plan(k, r, p, valid)
    for name, a, b in zip(("slot", "rep", "keep"), got, exp):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs"


def test_plan_split_refuses_too_large_r():
    k = torch.randn(1, 1, 17, 8)
    node_max, node_idx = kref.bipartite_match(k, 1)
    with pytest.raises(TokenReduceError, match="largest valid r is 8"):
        kref.plan_from_matches(node_max, node_idx, 9, 1, None, 17, k.dtype)


def _attention64(q, k, v, bias, scale, causal):
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + (torch.where(bias, 0.0, -math.inf).double() if bias.dtype == torch.bool else bias.double())
    if causal:
        logits = logits.masked_fill(torch.ones(logits.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    p = logits.softmax(-1)
    return p, p @ v.double()


@pytest.mark.parametrize("causal,mask,row", [(False, None, 0), (False, "bool", 3), (True, None, -1), (True, "log", 2),
                                             (False, "log", -1)])
def test_reference_attention_with_scores(causal, mask, row):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 11, 8, generator=g) for _ in range(3))
    bias = None
    if mask == "bool":
        bias = torch.rand(2, 1, 1, 11, generator=g) > 0.4
        bias[..., 0] = True
    elif mask == "log":
        bias = torch.rand(2, 1, 1, 11, generator=g).add(0.5).log()
    out, rows, cols = kref.attention_with_scores(q, k, v, bias, 0.3, causal, row, col_mean=True)
    p, ref_out = _attention64(q, k, v, bias, 0.3, causal)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows.double(), p[:, :, row].mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cols.double(), p.mean(2).mean(1), atol=1e-6, rtol=1e-5)
    if not causal:  # the op the fusion pass replaces computes the same row
        torch.testing.assert_close(rows, tr.query_row_scores(q, k, bias, 0.3, row))


# ------------------------------------------------------------------------------ the op
def test_attention_with_scores_op_contract():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 7, 8, generator=g) for _ in range(3))
    bias = torch.rand(2, 1, 1, 7, generator=g).log()
    for args in ((q, k, v, None, 0.35, False, 0), (q, k, v, bias, 0.35, False, -1), (q, k, v, None, 0.35, True, -1)):
        torch.library.opcheck(tr.attention_with_scores.default, args)
    out, rows = tr.attention_with_scores(q, k, v, bias, 0.35, False, 0)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, bias, scale=0.35))
    torch.testing.assert_close(rows, tr.query_row_scores(q, k, bias, 0.35, 0))


class _Fused(torch.nn.Module):
    def forward(self, q, k, v):
        out, rows = tr.attention_with_scores(q, k, v, None, 0.25, False, 0)
        return out * 2, rows


def test_attention_with_scores_is_one_node_in_export_and_dynamo():
    q = k = v = torch.randn(2, 2, 5, 16)
    ep = torch.export.export(_Fused(), (q, k, v))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(tr.attention_with_scores.default) == 1
    assert not any("scaled_dot_product" in str(t) or "softmax" in str(t) for t in targets)
    seen = []

    def record(gm, example_inputs):
        seen.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return gm

    torch._dynamo.reset()
    torch.compile(_Fused(), backend=record, fullgraph=True)(q, k, v)
    assert sum(t is tr.attention_with_scores.default or t is tr.attention_with_scores for t in seen[0]) == 1


def test_attention_with_scores_flops():
    q = k = v = torch.randn(2, 3, 10, 16)
    with FlopCounterMode(display=False) as fc:
        tr.attention_with_scores(q, k, v, None, 0.25, False, 0)
    # QK^T and PV (2 * 2*B*H*M*N*d) plus the one score row (2*B*H*N*d)
    assert fc.get_total_flops() == 4 * 2 * 3 * 10 * 10 * 16 + 2 * 2 * 3 * 10 * 16


# ------------------------------------------------------------------------------ launcher refusals
attention = pytest.importorskip("tokenreduce.kernels.triton.attention")
matching = pytest.importorskip("tokenreduce.kernels.triton.matching")
merge = pytest.importorskip("tokenreduce.kernels.triton.merge")


def _qkv(shape=(1, 2, 5, 16), dtype=torch.float16):
    return tuple(torch.zeros(shape, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: attention.attention_with_scores(*_qkv((1, 2, 5, 512))), KernelLimitError, "head dim 512 is outside 1..256"),
    (lambda: attention.attention_with_scores(*_qkv(dtype=torch.float64)), KernelLimitError, "dtype torch.float64"),
    (lambda: attention.attention_with_scores(torch.zeros(1, 4, 5, 16), torch.zeros(1, 2, 5, 16),
                                             torch.zeros(1, 2, 5, 16)), KernelLimitError, "grouped-query"),
    (lambda: attention.attention_with_scores(*_qkv((65536, 1, 1, 16))), KernelLimitError, "65536 exceeds the CUDA grid"),
    (lambda: attention.attention_with_scores(*(t.expand(1, 2**14, 2**14, 16) for t in _qkv((1, 1, 1, 16)))),
     KernelLimitError, "32-bit offsets"),
    (lambda: attention.attention_with_scores(*_qkv()[:2], torch.zeros(1, 2, 6, 16, dtype=torch.float16)),
     TokenReduceError, "must have k's shape"),
    (lambda: attention.attention_with_scores(*_qkv(), bias=torch.zeros(1, 1, 1, 7)), TokenReduceError,
     "does not broadcast"),
    (lambda: attention.attention_with_scores(*_qkv(), row=5), TokenReduceError, "row 5 is outside the 5 query rows"),
    (lambda: attention.attention_with_scores(*_qkv()), TokenReduceError, "needs CUDA tensors, got cpu"),
    (lambda: attention.query_row_scores(*_qkv((2, 2, 5, 300))[:2], None, 1.0, 0), KernelLimitError, "head dim 300"),
    (lambda: matching.tome_plan(torch.zeros(1, 2, 17, 16), 9, 1), TokenReduceError, "largest valid r is 8"),
    (lambda: matching.bipartite_match(torch.zeros(1, 1, 16), 0), TokenReduceError, "at least 2 tokens"),
    (lambda: matching.bipartite_match(torch.zeros(1, 4, 16), 1, torch.ones(1, 4)), TokenReduceError,
     "valid must be bool"),
    (lambda: merge.apply_plan(torch.zeros(2, 4, 8), torch.zeros(2, 5, dtype=torch.long), None, None, 2),
     TokenReduceError, r"slot must be int64 \[B, N\] = \(2, 4\)"),
    (lambda: merge.apply_plan(torch.zeros(2, 4, 8, dtype=torch.int32), torch.zeros(2, 4, dtype=torch.long), None,
                              None, 2), KernelLimitError, "dtype torch.int32"),
])
def test_launcher_refusals(call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call()
    if exc is TokenReduceError:  # invalid input: not a kernel limit the ops would paper over
        assert not isinstance(info.value, KernelLimitError)


# ------------------------------------------------------------------------------ without triton
_NO_TRITON = r"""
import sys, warnings
sys.modules["triton"] = None  # `import triton` now raises ImportError, as when it is not installed
import torch, tokenreduce
from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels import ops, triton as kt
assert not kt.HAS_TRITON and "triton" in kt.TRITON_IMPORT_ERROR, kt.TRITON_IMPORT_ERROR
try:
    kt.require_triton()
    raise SystemExit("require_triton did not raise")
except TokenReduceError as exc:
    assert "need the `triton` package" in str(exc), str(exc)
x, slot = torch.randn(1, 4, 3), torch.tensor([[0, 0, 1, 1]])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out, size = ops._apply_plan_cuda(x, slot, None, None, 2)
assert any("triton is not importable" in str(w.message) for w in caught)
assert torch.allclose(out[0, 0], x[0, :2].mean(0)) and size.tolist() == [[2.0, 2.0]]
print("NO_TRITON_OK")
"""


def test_package_imports_and_reports_without_triton():
    proc = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "NO_TRITON_OK" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------------------ docs numbers
def test_docs_traffic_table_is_what_the_counter_prints():
    from pathlib import Path

    from tokenreduce.kernels.triton import traffic

    docs = (Path(__file__).resolve().parents[2] / "docs" / "kernels.md").read_text()
    table = traffic.table(traffic.Shape())
    assert table in docs, "docs/kernels.md's memory-traffic table is stale: rerun python -m tokenreduce.kernels.triton.traffic"
    saved, n_last = traffic.tome_model_saving(traffic.Shape())
    assert n_last == 41 and f"move {saved / 1e6:.1f} MB less" in docs
    # one line checked by hand: the fused merge reads x once (197 x 768 fp16) and writes x' once (184 x 768)
    merge_kernel = traffic.merge_fused(traffic.Shape(), 184)[-1]
    assert merge_kernel[1] >= 197 * 768 * 2 and merge_kernel[2] == 184 * 768 * 2 + 184 * 2
