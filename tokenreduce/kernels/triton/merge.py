"""Apply a plan: size-weighted merge and keep-index gather of tokens and sizes in one pass.

Source: ToMe's `merge_wavg` (Bolya et al., ICLR 2023: `x = merge(x * size) / merge(size)`) and EViT's
keep-index gather plus attention-weighted fusion (Liang et al., ICLR 2022), both the `apply_plan` op of
`kernels/reference.py`: `x'[s] = sum_{slot[i]=s} w_i x_i / sum w_i` and `size'[s] = sum_{w_i>0} size_i`.

The unfused graph (and the reference) scatter-adds `w * x` into an fp32/`x.dtype` accumulator, scatter-adds
the weights and sizes, then divides: `x` is read once, but `w * x` and the accumulator are written and
read again. Here each output slot is one program that reads its source rows and writes its output row
once. The sources of every slot come from a CSR view of the plan built in torch on `[B, N]` integers
(a stable sort of `slot` and `searchsorted` for the segment starts), so the sum is deterministic, in
token order, with no atomics; a gather (EViT keep, one source per slot) is the same loop of length one.

Accumulates in fp32 whatever the input dtype (the reference accumulates in `x.dtype`). Slot values
outside `0..n_out` are not checked on the device (the reference raises); a slot equal to `n_out` is
dropped. Refuses: `n_out` or batch beyond the CUDA grid limits, tensors past 32-bit offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels.triton._common import check_device, check_dim, check_dtype, check_grid, check_size


@triton.jit
def _merge_kernel(
    x_ptr, w_ptr, size_ptr, order_ptr, start_ptr, out_ptr, osize_ptr,
    sxb, sxn, sxc, swb, swn, ssb, ssn,
    N, C, n_out,
    HAS_W: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One output slot (and one chunk of channels): weighted mean of its source tokens and their sizes."""
    slot = tl.program_id(0)
    b = tl.program_id(1)
    pid_c = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    begin = tl.load(start_ptr + b * (n_out + 1) + slot)
    end = tl.load(start_ptr + b * (n_out + 1) + slot + 1)
    acc = tl.zeros([BLOCK_C], tl.float32)
    w_sum = tl.zeros([], tl.float32)
    s_sum = tl.zeros([], tl.float32)
    for i in range(begin, end):
        tok = tl.load(order_ptr + b * N + i)
        x = tl.load(x_ptr + b * sxb + tok * sxn + offs_c * sxc, mask=c_ok, other=0.0).to(tl.float32)
        if HAS_SIZE:
            size = tl.load(size_ptr + b * ssb + tok * ssn).to(tl.float32)
        else:
            size = 1.0
        if HAS_W:
            w = tl.load(w_ptr + b * swb + tok * swn).to(tl.float32)
        else:
            w = size
        acc += tl.where(w > 0, w * x, 0.0)  # a dropped source's NaN/inf never reaches the slot
        w_sum += w
        s_sum += tl.where(w > 0, size, 0.0)  # a zero-weight source is dropped, not counted
    out = acc / tl.where(w_sum > 0, w_sum, 1.0)
    tl.store(out_ptr + (b * n_out + slot) * C + offs_c, out.to(out_ptr.dtype.element_ty), mask=c_ok)
    if pid_c == 0:
        tl.store(osize_ptr + b * n_out + slot, s_sum.to(osize_ptr.dtype.element_ty))


def merge_blocks(channels: int) -> tuple[int, int]:
    """(BLOCK_C, num_warps): a whole row of up to 1024 channels per program (ViT-B: 768 -> 1024)."""
    return min(1024, triton.next_power_of_2(channels)), 4


def plan_segments(slot: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR view of a plan: `order [B, N]` (tokens sorted by slot, token order within a slot) and
    `start [B, n_out + 1]` (slot s's sources are `order[start[s]:start[s+1]]`)."""
    sorted_slot, order = torch.sort(slot, dim=1, stable=True)
    bounds = torch.arange(n_out + 1, device=slot.device, dtype=slot.dtype).expand(slot.shape[0], n_out + 1)
    start = torch.searchsorted(sorted_slot.contiguous(), bounds.contiguous())
    return order.contiguous(), start.contiguous()


def apply_plan(
    x: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor | None, size: torch.Tensor | None, n_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel version of `kernels.reference.apply_plan`: `x' [B, n_out, C]` (x's dtype) and
    `size' [B, n_out]` (size's dtype, x's without sizes)."""
    op = "apply_plan"
    check_dim(op, "x", x, 3, "[B, N, C]")
    check_dtype(op, "x", x)
    bsz, n, c = x.shape
    if slot.shape != (bsz, n) or slot.dtype not in (torch.int64, torch.int32):
        raise TokenReduceError(f"{op}: slot must be int64 [B, N] = {(bsz, n)}, got {slot.dtype} {tuple(slot.shape)}")
    for name, t in (("weight", weight), ("size", size)):
        if t is not None:
            if t.shape != (bsz, n):
                raise TokenReduceError(f"{op}: {name} must be [B, N] = {(bsz, n)}, got {tuple(t.shape)}")
            check_dtype(op, name, t)
    if n_out < 0:
        raise TokenReduceError(f"{op}: n_out={n_out} must be >= 0")
    check_device(op, _merge_kernel, x, slot, weight, size)
    check_grid(op, "batch", bsz)
    out = torch.empty((bsz, n_out, c), dtype=x.dtype, device=x.device)
    out_size = torch.empty((bsz, n_out), dtype=size.dtype if size is not None else x.dtype, device=x.device)
    check_size(op, x, out)
    if n_out == 0 or bsz == 0:
        return out, out_size
    order, start = plan_segments(slot.long(), n_out)
    block_c, warps = merge_blocks(c)
    check_grid(op, "channel blocks", triton.cdiv(c, block_c))
    grid = (n_out, bsz, triton.cdiv(c, block_c))
    _merge_kernel[grid](
        x, weight if weight is not None else x, size if size is not None else x, order, start, out, out_size,
        *x.stride(), *(weight.stride() if weight is not None else (0, 0)),
        *(size.stride() if size is not None else (0, 0)),
        n, c, n_out,
        HAS_W=weight is not None, HAS_SIZE=size is not None, BLOCK_C=block_c, num_warps=warps,
    )
    return out, out_size
