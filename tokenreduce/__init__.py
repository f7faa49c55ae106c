"""tokenreduce: a compiler that makes transformers cheaper by reducing their tokens.

    reduced = tokenreduce.compile(model, example_inputs, method="tome", r=13)
    reduced(x); print(reduced.report)

    dec = tokenreduce.reduce_decoder(llm, method="gemfilter", layers=[6], keep_tokens=256)   # decoder prefill
    dec.generate(input_ids, span=(start, end), max_new_tokens=16)

or, without importing anything: `torch.compile(model, backend="tokenreduce", options={"method": "tome", "r": 13})`.
"""

from tokenreduce.compiler.api import ReducedModule, compile
from tokenreduce.compiler.backend import register as _register_backend
from tokenreduce.compiler.backend import stats as backend_stats
from tokenreduce.compiler.decoder_api import ReducedDecoder, reduce_decoder
from tokenreduce.compiler.report import Report
from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels import ops as _ops  # noqa: F401  (registers torch.ops.tokenreduce.*)
from tokenreduce.methods.settings import Settings

_register_backend()

__all__ = ["ReducedDecoder", "ReducedModule", "Report", "Settings", "TokenReduceError", "backend_stats", "compile",
           "reduce_decoder"]
__version__ = "0.1.0"
