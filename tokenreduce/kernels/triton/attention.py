"""Attention that also emits token scores, without materialising the attention matrix.

Source: FlashAttention-2 (Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", 2023), Algorithm 1: one program per (query block, batch*head), keys/values streamed in
tiles, online softmax with a running max `m` and sum `l` (in base 2: logits pre-multiplied by
`log2(e)`, as the Triton fused-attention tutorial), output rescaled once at the end, and the row
log-sum-exp `lse = m + log2(l)` kept for a second pass, as FlashAttention's backward recomputes
`P = exp(S - lse)` tile by tile.

Score vectors the reduction methods read (EViT: CLS row; FastV/GemFilter: last query row; attention
received per key for column-mean methods), all fp32:

- **row scores** (`row`): the program that owns the chosen query row also writes that row's raw logits
  (`[N]` per head) while it streams the keys, and after the loop rewrites them as `exp2(s - lse)`
  (a barrier orders the two, within one program). No recomputation, `8N` bytes per head of extra traffic.
- **column mean** (`col_mean`): a second kernel, one program per key block, streams the query tiles,
  recomputes `S` and sums `exp2(S - lse)` over the queries (FlashAttention's dK/dV loop structure).
  Costs one extra `Q K^T`; never writes `[M, N]`.
- `head_mean` averages the `[B, H, N]` fp32 scores over heads with one torch reduction after the kernel
  (`B*H*N*4` bytes; deterministic, unlike atomics across head programs).

`_row_scores_kernel` is the one-row score alone (the `query_row_scores` op, for graphs where the
attention itself is not an SDPA node the fusion pass can replace).

Handles: fp32/fp16/bf16, any head dim 1..256 (padded to a power of two >= 16 with masked loads),
any strides, causal (top-left, `j <= i`, as SDPA) and an additive bias (float: added to the logits,
e.g. `log(size)`; bool: False keys get probability 0) broadcastable to `[B, H, M, N]` (broadcast
dims read with stride 0, never expanded in memory). fp32 inputs use IEEE fp32 dots (no TF32), as torch's
fp32 SDPA. Refuses: head dims above 256, q/k/v head counts or head dims that differ, grids beyond CUDA
limits. A query row whose every key is masked gets output 0 and row scores 0 (SDPA's `_safe_softmax`
gives 0 output; the reference `query_row_scores` gives a uniform row).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels.triton import KernelLimitError
from tokenreduce.kernels.triton._common import (
    check_device,
    check_dim,
    check_dtype,
    check_grid,
    check_size,
    dot_mode,
    head_block,
    mma,
)

LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, lse_ptr, rowp_ptr,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sbb, sbh, sbm, sbn,
    sob, soh, som, sod,
    H, M, N, D, qk_scale, row,
    HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, WITH_ROW: tl.constexpr, WITH_LSE: tl.constexpr,
    DOT_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = softmax(Q K^T * scale + bias) V for one (query block, batch*head); optionally lse and one row."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    owns_row = (row >= start_m) & (row < start_m + BLOCK_M)
    hi = N
    if IS_CAUSAL:
        hi = tl.minimum(N, start_m + BLOCK_M)  # later key tiles are fully masked for this query block
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k = tl.load(k_ptr + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = mma(q, tl.trans(k), DOT_MODE) * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_ptr + b * sbb + h * sbh + offs_m[:, None] * sbm + offs_n[None, :] * sbn,
                           mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            s = s + bias.to(tl.float32) * 1.4426950408889634
        visible = n_ok[None, :] & m_ok[:, None]
        if IS_CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
        if WITH_ROW:
            if owns_row:
                s_row = tl.sum(tl.where(offs_m[:, None] == row, s, 0.0), axis=0)
                tl.store(rowp_ptr + pid_bh * N + offs_n, s_row, mask=n_ok)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far: keep exp2 finite
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_MODE)
        m_i = m_new
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(out_ptr + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if WITH_LSE:
        lse = tl.where(l_i > 0, m_fin + tl.math.log2(l_safe), float("inf"))  # inf: the row adds nothing
        tl.store(lse_ptr + pid_bh * M + offs_m, lse, mask=m_ok)
    if WITH_ROW:
        if owns_row:
            sel = offs_m == row
            row_m = tl.sum(tl.where(sel, m_fin, 0.0), axis=0)
            row_l = tl.sum(tl.where(sel, l_i, 0.0), axis=0)
            inv_l = tl.where(row_l > 0, 1.0 / tl.where(row_l > 0, row_l, 1.0), 0.0)
            tl.debug_barrier()  # the raw logits above were stored by other threads of this program
            for start_n in range(0, N, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                n_ok = offs_n < N
                s_row = tl.load(rowp_ptr + pid_bh * N + offs_n, mask=n_ok, other=float("-inf"))
                p_row = tl.math.exp2(s_row - row_m) * inv_l
                if IS_CAUSAL:
                    p_row = tl.where(offs_n <= row, p_row, 0.0)  # never written past the causal limit
                tl.store(rowp_ptr + pid_bh * N + offs_n, p_row, mask=n_ok)


@triton.jit
def _attn_colsum_kernel(
    q_ptr, k_ptr, bias_ptr, lse_ptr, col_ptr,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    sbb, sbh, sbm, sbn,
    H, M, N, D, qk_scale, inv_m,
    HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """col[j] = mean_i exp2(S[i, j] - lse[i]) for one (key block, batch*head), recomputing S per tile."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N
    d_ok = offs_d < D
    k = tl.load(k_ptr + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    col = tl.zeros([BLOCK_N], tl.float32)
    lo = 0
    if IS_CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # earlier queries see none of these keys
    for start_m in range(lo, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        s = mma(q, tl.trans(k), DOT_MODE) * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_ptr + b * sbb + h * sbh + offs_m[:, None] * sbm + offs_n[None, :] * sbn,
                           mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            s = s + bias.to(tl.float32) * 1.4426950408889634
        lse = tl.load(lse_ptr + pid_bh * M + offs_m, mask=m_ok, other=float("inf"))
        p = tl.math.exp2(s - lse[:, None])
        visible = m_ok[:, None] & n_ok[None, :]
        if IS_CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        col += tl.sum(tl.where(visible, p, 0.0), axis=0)
    tl.store(col_ptr + pid_bh * N + offs_n, col * inv_m, mask=n_ok)


@triton.jit
def _row_scores_kernel(
    q_ptr, k_ptr, bias_ptr, out_ptr,
    sqb, sqh, sqd,
    skb, skh, skn, skd,
    sbb, sbh, sbn,
    H, N, D, qk_scale,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """softmax(q_row . K^T * scale + bias_row) for one batch*head: online max/sum, then normalise."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_d * sqd, mask=d_ok, other=0.0).to(tl.float32)
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.zeros([], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k = tl.load(k_ptr + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_ptr + b * sbb + h * sbh + offs_n * sbn, mask=n_ok, other=0.0)
            s = s + bias.to(tl.float32) * 1.4426950408889634
        s = tl.where(n_ok, s, float("-inf"))
        tl.store(out_ptr + pid_bh * N + offs_n, s, mask=n_ok)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_use) + tl.sum(tl.math.exp2(s - m_use), axis=0)
        m_i = m_new
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    tl.debug_barrier()  # the raw logits were stored by other threads of this program
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        s = tl.load(out_ptr + pid_bh * N + offs_n, mask=n_ok, other=float("-inf"))
        tl.store(out_ptr + pid_bh * N + offs_n, tl.math.exp2(s - m_fin) * inv_l, mask=n_ok)


# ------------------------------------------------------------------------------------------ launchers
def _bias_view(op: str, bias: torch.Tensor | None, shape: tuple[int, int, int, int]) -> torch.Tensor | None:
    """The bias as a broadcast (stride-0) `[B, H, M, N]` view; bool masks become additive (-inf = masked)."""
    if bias is None:
        return None
    if bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device).masked_fill(~bias, -torch.inf)
    elif bias.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KernelLimitError(f"{op}: bias has dtype {bias.dtype}; use bool or a float type")
    if bias.dim() > 4:
        raise TokenReduceError(f"{op}: bias has {bias.dim()} dims; it must broadcast to [B, H, M, N] = {shape}")
    try:
        return bias.expand(shape)
    except RuntimeError as exc:
        raise TokenReduceError(
            f"{op}: bias of shape {tuple(bias.shape)} does not broadcast to [B, H, M, N] = {shape}"
        ) from exc


def _check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> int:
    check_dim(op, "q", q, 4, "[B, H, M, d]")
    check_dim(op, "k", k, 4, "[B, H, N, d]")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is not None:
            check_dtype(op, name, t)
    if k.dtype != q.dtype or (v is not None and v.dtype != q.dtype):
        raise KernelLimitError(f"{op}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, "
                               f"{v.dtype if v is not None else '-'}")
    if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
        raise KernelLimitError(
            f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head dim "
            "(grouped-query attention is not supported by this kernel)"
        )
    if v is not None:
        check_dim(op, "v", v, 4, "[B, H, N, d]")
        if v.shape != k.shape:
            raise TokenReduceError(f"{op}: v {tuple(v.shape)} must have k's shape {tuple(k.shape)}")
    if k.shape[2] < 1 or q.shape[2] < 1:
        raise TokenReduceError(f"{op}: empty token axis (q {tuple(q.shape)}, k {tuple(k.shape)})")
    check_size(op, q, k, v)
    check_grid(op, "batch * heads", q.shape[0] * q.shape[1])
    return head_block(op, q.shape[3])


def attn_blocks(block_d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a padded head dim: 64x64 tiles; smaller tiles where
    the Q tile plus double-buffered K/V tiles would pass sm_80's 163 KB of shared memory (checked for every
    case by tests/kernels/test_triton_compile.py)."""
    wide = block_d * (4 if dtype == torch.float32 else 2)  # bytes per row of a tile
    if wide >= 1024:  # fp32 d=256
        return 32, 32, 4, 1
    if wide >= 512:  # 16-bit d=256, fp32 d=128
        return 64, 32, 4, 2
    return 64, 64, 4, 2


def row_block(block_d: int) -> int:
    """Key tile of the one-row kernel: 128 keys of a <=64-wide head, 64 above."""
    return 128 if block_d <= 64 else 64


def attention_with_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    row: int | None = 0,
    col_mean: bool = False,
    head_mean: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Attention plus score vectors in one pass over K/V (a second for `col_mean`).

    Args and returns as `tokenreduce.kernels.triton.reference.attention_with_scores`; the scores are
    returned in float32 (`[B, N]` with `head_mean`, else `[B, H, N]`). `scale=None` means `1/sqrt(d)`.
    """
    op = "attention_with_scores"
    block_d = _check_qkv(op, q, k, v)
    bsz, heads, m, d = q.shape
    n = k.shape[2]
    bias4 = _bias_view(op, bias, (bsz, heads, m, n))
    if row is not None and not -m <= row < m:
        raise TokenReduceError(f"{op}: row {row} is outside the {m} query rows")
    check_device(op, _attn_fwd_kernel, q, k, v, bias)
    row_idx = -1 if row is None else row % m
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    block_m, block_n, warps, stages = attn_blocks(block_d, q.dtype)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((bsz, heads, m), dtype=torch.float32, device=q.device) if col_mean else out
    rowp = torch.empty((bsz, heads, n), dtype=torch.float32, device=q.device) if row is not None else out
    bias_arg = bias4 if bias4 is not None else q
    bstr = bias4.stride() if bias4 is not None else (0, 0, 0, 0)
    mode = dot_mode(_attn_fwd_kernel, q.dtype)
    grid = (triton.cdiv(m, block_m), bsz * heads)
    _attn_fwd_kernel[grid](
        q, k, v, bias_arg, out, lse, rowp,
        *q.stride(), *k.stride(), *v.stride(), *bstr, *out.stride(),
        heads, m, n, d, scale * LOG2E, row_idx,
        HAS_BIAS=bias4 is not None, IS_CAUSAL=bool(is_causal), WITH_ROW=row is not None, WITH_LSE=col_mean,
        DOT_MODE=mode, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )
    cols = None
    if col_mean:
        cols = torch.empty((bsz, heads, n), dtype=torch.float32, device=q.device)
        grid_c = (triton.cdiv(n, block_n), bsz * heads)
        _attn_colsum_kernel[grid_c](
            q, k, bias_arg, lse, cols,
            *q.stride(), *k.stride(), *bstr,
            heads, m, n, d, scale * LOG2E, 1.0 / m,
            HAS_BIAS=bias4 is not None, IS_CAUSAL=bool(is_causal), DOT_MODE=mode,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
        )
        cols = cols.mean(dim=1) if head_mean else cols
    rows = None
    if row is not None:
        rows = rowp.mean(dim=1) if head_mean else rowp
    return out, rows, cols


def query_row_scores(
    q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float, row: int, head_mean: bool = True
) -> torch.Tensor:
    """Attention probabilities of query `row` over the keys, float32 `[B, N]` (or `[B, H, N]`).

    Same arithmetic as `kernels.reference.query_row_scores` (a bias with one query row broadcasts over
    rows, otherwise its row `row` is used), one program per batch*head.
    """
    op = "query_row_scores"
    block_d = _check_qkv(op, q, k, None)
    bsz, heads, m, d = q.shape
    n = k.shape[2]
    if not -m <= row < m:
        raise TokenReduceError(f"{op}: row {row} is outside the {m} query rows")
    row_idx = row % m
    bias_row = None
    if bias is not None:
        if bias.dim() >= 2 and bias.shape[-2] != 1:
            bias = bias[..., row_idx : row_idx + 1, :]
        bias_row = _bias_view(op, bias, (bsz, heads, 1, n))[:, :, 0, :]  # type: ignore[index]
    check_device(op, _row_scores_kernel, q, k, bias)
    out = torch.empty((bsz, heads, n), dtype=torch.float32, device=q.device)
    q_row = q[:, :, row_idx, :]
    bstr = bias_row.stride() if bias_row is not None else (0, 0, 0)
    _row_scores_kernel[(bsz * heads,)](
        q_row, k, bias_row if bias_row is not None else q, out,
        *q_row.stride(), *k.stride(), *bstr,
        heads, n, d, float(scale) * LOG2E,
        HAS_BIAS=bias_row is not None, BLOCK_N=row_block(block_d), BLOCK_D=block_d, num_warps=4,
    )
    return out.mean(dim=1) if head_mean else out
