"""The model matrix: every family of issue 11 x every check, against the expectations table.

Each test runs one check on one tiny random-init model (`builders.py`; checks in `harness.py`) and compares
what happened with `expectations.py`: "works", "refused: <substring of the TokenReduceError>", "unreduced:
<substring of the skip reason>", "crash: <ExceptionType>" or "n/a: ...". A family that starts working fails its
test until the table says "works"; one that stops working fails too -- no silent passes either way. The failure
message is the measured outcome, ready to paste into the table (then run `python scripts/support_table.py`).

With TOKENREDUCE_MATRIX_RESULTS=FILE every outcome is also appended to FILE (JSON lines) for
`scripts/support_table.py --results FILE`. Families share their capture and compiled modules across checks
(run them in order; `-k` still works, each check builds what it needs).
"""

from __future__ import annotations

import json
import os
import time

import pytest
from matrix.builders import FAMILIES
from matrix.expectations import expected
from matrix.harness import checks_of, matches, run_check

pytestmark = pytest.mark.matrix

CASES = [pytest.param(f, c, id=f"{f}-{c}", marks=[pytest.mark.onnx] if c in ("onnx", "fastv-onnx") else [])
         for f in FAMILIES for c in checks_of(f)]


@pytest.mark.parametrize("family, check", CASES)
def test_family_check(family, check, tmp_path):
    start = time.perf_counter()
    outcome = run_check(family, check, tmp_path)
    seconds = time.perf_counter() - start
    want = expected(family, check)
    out_file = os.environ.get("TOKENREDUCE_MATRIX_RESULTS")
    if out_file:
        with open(out_file, "a") as f:
            f.write(json.dumps({"family": family, "check": check, "kind": outcome.kind, "text": outcome.text,
                                "last_line": outcome.last_line, "expected": want,
                                "matches": matches(outcome, want), "seconds": round(seconds, 2)}) + "\n")
    assert matches(outcome, want), (
        f"{family} / {check}: expected {want!r}, measured {str(outcome)!r}"
        + (f"\n  crash at {outcome.last_line}" if outcome.last_line else "")
        + "\n  update tests/matrix/expectations.py and run `python scripts/support_table.py`")


def test_capture_leaves_every_module_in_its_own_mode():
    """Found by the matrix (GPT-2's FastV keep-1 logits were off by 0.2): capturing an eval-mode model inside a
    fresh wrapper module (reduce_decoder's prefill) put the whole model into training mode, dropout on."""
    import torch

    from tokenreduce.compiler.capture import export_graph

    inner = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).eval()
    wrapper = torch.nn.Sequential(inner)  # a new module: training mode
    export_graph(wrapper, (torch.randn(2, 4),), {}, dynamic_batch=True)
    assert wrapper.training and not inner.training and not inner[1].training
