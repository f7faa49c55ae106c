"""Checks and block-size helpers every launcher shares.

Launchers refuse rather than let a kernel read out of bounds or overflow its 32-bit offsets, naming the
argument, what it is and what is supported: `KernelLimitError` (a `TokenReduceError` the ops answer
with the reference) for unsupported dtypes, head dimensions above 256 and grids or sizes past CUDA's
limits; a plain `TokenReduceError` for tensors on the wrong device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels.triton import KernelLimitError

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MAX_GRID_YZ = 65535  # CUDA limit on gridDim.y and gridDim.z
MAX_ELEMENTS = 2**31 - 1  # kernels index with 32-bit offsets

TL_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# How `mma` multiplies: native (fp16/bf16 tensor cores, fp32 accumulate), IEEE fp32 (fp32 inputs: no TF32,
# as torch's fp32 matmul), or operands upcast to fp32. The last exists only for the Triton interpreter,
# whose `tl.dot` multiplies the raw bits of bfloat16 operands (triton-lang/triton#11584, "not supported
# yet"); compiled kernels never use it.
DOT_NATIVE, DOT_IEEE, DOT_UPCAST = 0, 1, 2


@triton.jit
def mma(a, b, DOT_MODE: tl.constexpr):
    """`tl.dot(a, b)` (fp32 result) in the precision `DOT_MODE` names."""
    if DOT_MODE == 2:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT_MODE == 1:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


def dot_mode(kernel: object, dtype: torch.dtype) -> int:
    if dtype == torch.float32:
        return DOT_IEEE
    if dtype == torch.bfloat16 and interpreting(kernel):
        return DOT_UPCAST
    return DOT_NATIVE


def interpreting(kernel: object) -> bool:
    """True when `kernel` was decorated under `TRITON_INTERPRET=1` (it then runs on CPU tensors)."""
    return isinstance(kernel, InterpretedFunction)


def check_device(op: str, kernel: object, *tensors: torch.Tensor | None) -> None:
    want_cuda = not interpreting(kernel)
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise TokenReduceError(f"{op}: inputs are on different devices {sorted(map(str, devices))}")
    dev = next(iter(devices))
    if want_cuda and dev.type != "cuda":
        raise TokenReduceError(
            f"{op}: the Triton kernel needs CUDA tensors, got {dev}; use the reference op on this device "
            "(or set TRITON_INTERPRET=1 before importing tokenreduce.kernels.triton to run it on the CPU)"
        )


def check_dtype(op: str, name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...] = DTYPES) -> None:
    if t.dtype not in dtypes:
        raise KernelLimitError(
            f"{op}: {name} has dtype {t.dtype}; the kernel supports {', '.join(str(d) for d in dtypes)}"
        )


def check_dim(op: str, name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise TokenReduceError(f"{op}: {name} must be {layout} ({ndim}-D), got shape {tuple(t.shape)}")


def check_size(op: str, *tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.numel() > MAX_ELEMENTS:
            raise KernelLimitError(
                f"{op}: a tensor of shape {tuple(t.shape)} has {t.numel()} elements; the kernel uses 32-bit "
                f"offsets (at most {MAX_ELEMENTS}): split the batch"
            )


def check_grid(op: str, what: str, n: int) -> None:
    if n > MAX_GRID_YZ:
        raise KernelLimitError(f"{op}: {what} = {n} exceeds the CUDA grid limit {MAX_GRID_YZ}; split the batch")


def head_block(op: str, d: int) -> int:
    """Padded head-dim block (power of two, >= 16 for `tl.dot`); refuses d > 256."""
    if d < 1 or d > MAX_HEAD_DIM:
        raise KernelLimitError(
            f"{op}: head dim {d} is outside 1..{MAX_HEAD_DIM} (one tile holds a whole head row); "
            "use the reference op for larger heads"
        )
    return max(16, triton.next_power_of_2(d))
