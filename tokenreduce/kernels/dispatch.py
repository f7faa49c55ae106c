"""Which implementation the tokenreduce ops run on CUDA: the Triton kernels (default) or the references.

The escape hatch for a GPU where a kernel mis-computes, fails to build or is slower than the reference:

    TOKENREDUCE_KERNELS=reference python serve.py            # environment variable, read at every decision

    import tokenreduce.kernels as trk
    trk.set_kernel_backend("reference")                      # process-wide, wins over the variable
    with trk.use_reference_kernels():                        # only inside the block, restored after
        ...

With "reference" chosen, the CUDA registrations of the custom ops (`kernels/ops.py`) run their pure-torch
references (one warning per op says so), and the fusion pass (`passes/fuse_attention_scores.py`) leaves
SDPA + `query_row_scores` apart on CUDA graphs. The op check happens at every call, so a compiled model
switches with the setting; the fusion pass runs at compile time, so a graph compiled with "triton" keeps
its fused `attention_with_scores` node (which then also runs its reference). CPU runs the references
whatever is chosen.

Refuses (TokenReduceError naming the valid values) any other value of the variable or the option, at the
first decision that reads it, never silently falling back to a default.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from tokenreduce.errors import TokenReduceError

ENV_VAR = "TOKENREDUCE_KERNELS"
BACKENDS = ("triton", "reference")
DEFAULT = "triton"

_override: str | None = None  # set_kernel_backend / the context managers; None: the environment decides


def _check(value: str, where: str) -> str:
    if value not in BACKENDS:
        raise TokenReduceError(f"{where} is {value!r}; valid values: {', '.join(repr(b) for b in BACKENDS)} "
                               f"(default {DEFAULT!r})")
    return value


def kernel_backend() -> str:
    """The backend in force: the Python setting if one is set, else `$TOKENREDUCE_KERNELS`, else "triton"."""
    if _override is not None:
        return _override
    value = os.environ.get(ENV_VAR, "").strip()
    return _check(value, f"${ENV_VAR}") if value else DEFAULT


def reference_reason() -> str | None:
    """Why the CUDA ops must run the references by the user's choice, or None when the kernels may run."""
    if kernel_backend() != "reference":
        return None
    how = "the Python option (set_kernel_backend / use_reference_kernels)" if _override is not None \
        else f"{ENV_VAR}=reference"
    return f"{how} chose the reference implementation"


def set_kernel_backend(backend: str | None) -> None:
    """Choose the backend for this process ("triton" or "reference"); None returns the choice to
    `$TOKENREDUCE_KERNELS` (default "triton")."""
    global _override
    _override = None if backend is None else _check(backend, "kernel backend")


@contextmanager
def use_kernel_backend(backend: str) -> Iterator[None]:
    """Run the block with `backend`, then restore the previous setting (also when the block raises)."""
    global _override
    previous = _override
    _override = _check(backend, "kernel backend")
    try:
        yield
    finally:
        _override = previous


@contextmanager
def use_reference_kernels() -> Iterator[None]:
    """Run the block on the pure-torch references (no Triton kernels, no score-attention fusion)."""
    with use_kernel_backend("reference"):
        yield


__all__ = ["BACKENDS", "DEFAULT", "ENV_VAR", "kernel_backend", "reference_reason", "set_kernel_backend",
           "use_kernel_backend", "use_reference_kernels"]
