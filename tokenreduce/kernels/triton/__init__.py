"""Fused Triton kernels for the token-reduction ops (GPU runtime only).

One module per kernel, each in three layers (Liger-Kernel style): the `@triton.jit` `_kernel`, a launcher
that checks shapes, dtypes, devices and limits (raising `TokenReduceError` with the limit and the fix)
and picks block sizes, and the custom op in `kernels/ops.py` that calls the launcher on CUDA tensors.
The pure-torch references the kernels are tested against (and which the CPU path runs) are in
`reference.py` beside them and in `kernels/reference.py`.

- `attention.py`: FlashAttention-2 style forward that also emits the attention of one query row over the
  keys and the column mean of attention over the queries, without writing the attention matrix; and a
  one-row score kernel for `query_row_scores`.
- `matching.py`: ToMe bipartite matching: cosine similarity of A to B tokens fused with the row max and
  argmax; the `|A| x |B|` matrix is never written.
- `merge.py`: size-weighted merge and keep-index gather of tokens and sizes in one pass.
- `traffic.py`: the analytical memory-traffic count behind docs/kernels.md (no triton needed).

Importing this package never fails when triton is missing: `HAS_TRITON` says whether the kernel modules
can be imported and `TRITON_IMPORT_ERROR` why not; `require_triton()` raises a `TokenReduceError` with
that reason. Launchers raise `KernelLimitError` for inputs outside what a kernel covers and
`TokenReduceError` for invalid inputs. The kernels are a runtime concern: ONNX/TensorRT export uses the
references (docs/kernels.md).
"""

from __future__ import annotations

from tokenreduce.errors import TokenReduceError

try:  # the kernel modules import triton at module level; this package must not
    import triton as _triton  # noqa: F401

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = ""
except Exception as exc:  # noqa: BLE001  (ImportError, or a broken install raising anything else)
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


class KernelLimitError(TokenReduceError):
    """Inputs the kernel does not cover (dtype, head dim, grid or offset limits) though the op accepts them:
    the custom ops catch this one and run the reference instead, with a warning. Invalid inputs (bad
    shapes, impossible settings) raise a plain `TokenReduceError` on every path."""


def require_triton() -> None:
    """Raise a `TokenReduceError` saying why the Triton kernels cannot be used, if they cannot."""
    if not HAS_TRITON:
        raise TokenReduceError(
            f"the tokenreduce Triton kernels need the `triton` package ({TRITON_IMPORT_ERROR}); "
            "install triton (it ships with CUDA builds of torch) or run on the pure-torch reference ops"
        )


__all__ = ["HAS_TRITON", "TRITON_IMPORT_ERROR", "KernelLimitError", "require_triton"]
