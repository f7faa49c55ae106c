"""tokenreduce: a compiler that makes transformers cheaper by reducing their tokens.

    reduced = tokenreduce.compile(model, example_inputs, method="tome", r=13)
    reduced(x); print(reduced.report)

    dec = tokenreduce.reduce_decoder(llm, method="gemfilter", layers=[6], keep_tokens=256)   # decoder prefill
    dec.generate(input_ids, span=(start, end), max_new_tokens=16)

    plan = tokenreduce.tune(model, calib_inputs, budget={"latency": 0.6}, target="onnxruntime")   # choose settings
    reduced = tokenreduce.compile(model, example_inputs, plan=plan)

or, without importing anything: `torch.compile(model, backend="tokenreduce", options={"method": "tome", "r": 13})`.
"""

import importlib
from typing import Any

from tokenreduce.compiler.api import ReducedModule, compile
from tokenreduce.compiler.backend import register as _register_backend
from tokenreduce.compiler.backend import stats as backend_stats
from tokenreduce.compiler.decoder_api import ReducedDecoder, reduce_decoder
from tokenreduce.compiler.report import Report
from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels import ops as _ops  # noqa: F401  (registers torch.ops.tokenreduce.*)
from tokenreduce.methods.plan import Plan
from tokenreduce.methods.settings import Settings

_register_backend()


def tune(model: Any, calib_inputs: Any, budget: Any, target: str | None = None, **options: Any) -> Plan:
    """Choose the method and per-block schedule for `budget` (`tokenreduce.tuning.search.tune`, whose docstring
    lists the options); returns a `Plan` for `compile(..., plan=...)`.

    Loaded on first call: the tuner sits above `evaluate` and `bench`, which import this package."""
    search = importlib.import_module("tokenreduce.tuning.search")
    return search.tune(model, calib_inputs, budget, target, **options)  # type: ignore[no-any-return]


def calibrate_dymu(model: Any, inputs: Any, **options: Any) -> Any:
    """Per-block DyMU thresholds for a target mean merge count (`tokenreduce.tuning.dymu_calibration`, whose
    docstring lists the options); the result's `.settings()` go to `compile(..., method="dymu", ...)`."""
    calibration = importlib.import_module("tokenreduce.tuning.dymu_calibration")
    return calibration.calibrate_dymu(model, inputs, **options)


__all__ = ["Plan", "ReducedDecoder", "ReducedModule", "Report", "Settings", "TokenReduceError", "backend_stats",
           "calibrate_dymu", "compile", "reduce_decoder", "tune"]
__version__ = "0.1.0"
