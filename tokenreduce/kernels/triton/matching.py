"""ToMe bipartite matching: cosine similarity of A to B tokens fused with the row max and argmax.

Source: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (`bipartite_soft_matching`):
A = even tokens, B = odd tokens of the head-averaged keys, `scores = norm(A) @ norm(B)^T`, and each A
token's best B match. The kernel computes exactly `node_max, node_idx = scores.max(-1)` of
`kernels/plans.py` (docs/methods.md steps 1-5), tiled so the `[|A|, |B|]` score matrix only ever exists as
one `BLOCK_A x BLOCK_B` register tile: one program per (A block, batch) loads its A rows once,
normalises them in fp32, streams the B rows in tiles (normalised on load), applies the padding
sentinels (-2: padding A to real B, -3: real A to padding B) and the protected mask (-inf rows and
columns), and keeps a running max/argmax (first index on ties, as `torch.max`).

The rest of the plan (sort the `|A|` edges, assign slots) is `[B, N]` integer work and stays in torch
(`reference.plan_from_matches`), as does the head mean of `k [B, H, N, d]` (one read of k).

Handles fp32/fp16/bf16 metrics with any strides and head dims 1..256. The cosine is computed from
fp32-normalised rows (the reference normalises in the input dtype), so on 16-bit inputs a near-tie may
pick a different B token with a score equal within the dtype's rounding. Refuses: head dims above 256,
batch beyond the CUDA grid limit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenreduce.errors import TokenReduceError
from tokenreduce.kernels.plans import max_r
from tokenreduce.kernels.triton import reference
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


@triton.jit
def _match_kernel(
    m_ptr, valid_ptr, max_ptr, idx_ptr,
    smb, smn, smd, svb, svn,
    D, n_a, n_b, p_a, p_b,
    HAS_VALID: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """node_max[b, i], node_idx[b, i] = max / argmax_j cos(metric[b, 2i], metric[b, 2j + 1]) (masked)."""
    pid_a = tl.program_id(0)
    b = tl.program_id(1)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, BLOCK_D)
    a_ok = offs_a < n_a
    d_ok = offs_d < D
    a = tl.load(m_ptr + b * smb + (2 * offs_a)[:, None] * smn + offs_d[None, :] * smd,
                mask=a_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    a_norm = tl.sqrt(tl.sum(a * a, axis=1))
    a = (a / tl.where(a_ok, a_norm, 1.0)[:, None]).to(m_ptr.dtype.element_ty)
    if HAS_VALID:
        va = tl.load(valid_ptr + b * svb + (2 * offs_a) * svn, mask=a_ok, other=0) != 0
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_A], tl.int32)
    for start_b in range(0, n_b, BLOCK_B):
        offs_b = start_b + tl.arange(0, BLOCK_B)
        b_ok = offs_b < n_b
        bt = tl.load(m_ptr + b * smb + (2 * offs_b + 1)[:, None] * smn + offs_d[None, :] * smd,
                     mask=b_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        b_norm = tl.sqrt(tl.sum(bt * bt, axis=1))
        bt = (bt / tl.where(b_ok, b_norm, 1.0)[:, None]).to(m_ptr.dtype.element_ty)
        s = mma(a, tl.trans(bt), DOT_MODE)  # [BLOCK_A, BLOCK_B] cosines, registers only
        if HAS_VALID:
            vb = tl.load(valid_ptr + b * svb + (2 * offs_b + 1) * svn, mask=b_ok, other=0) != 0
            s = tl.where((~va[:, None]) & vb[None, :], -2.0, s)
            s = tl.where(va[:, None] & (~vb[None, :]), -3.0, s)
        s = tl.where((offs_a[:, None] < p_a) | (offs_b[None, :] < p_b), float("-inf"), s)
        s = tl.where(b_ok[None, :], s, float("-inf"))
        tile_max, tile_idx = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_max > best  # strict: an earlier tile (lower index) wins a tie
        best_idx = tl.where(better, tile_idx + start_b, best_idx)
        best = tl.where(better, tile_max, best)
    tl.store(max_ptr + b * n_a + offs_a, best, mask=a_ok)
    tl.store(idx_ptr + b * n_a + offs_a, best_idx.to(tl.int64), mask=a_ok)


def match_blocks(block_d: int) -> tuple[int, int, int]:
    """(BLOCK_A, BLOCK_B, num_warps): 64x64 cosine tiles, 32x32 for 256-wide heads (registers)."""
    if block_d >= 256:
        return 32, 32, 4
    return 64, 64, 4


def bipartite_match(
    metric: torch.Tensor, num_protected: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel version of `reference.bipartite_match`: `node_max` (float32) and `node_idx` (int64),
    both `[B, ceil(N/2)]`, from `metric [B, N, d]` (or keys `[B, H, N, d]`, head-averaged first)."""
    op = "tome_plan (matching)"
    if metric.dim() == 4:
        check_dtype(op, "k", metric)
        metric = metric.mean(dim=1)
    check_dim(op, "metric", metric, 3, "[B, N, d]")
    check_dtype(op, "metric", metric)
    bsz, n, d = metric.shape
    block_d = head_block(op, d)
    check_size(op, metric)
    check_grid(op, "batch", bsz)
    if valid is not None:
        if valid.shape != (bsz, n) or valid.dtype != torch.bool:
            raise TokenReduceError(f"{op}: valid must be bool [B, N] = {(bsz, n)}, got {valid.dtype} "
                                   f"{tuple(valid.shape)}")
    if not 0 <= num_protected <= n:
        raise TokenReduceError(f"{op}: num_protected={num_protected} is outside 0..{n}")
    if n < 2:  # no B side (torch.max over an empty row fails the same way in the reference)
        raise TokenReduceError(f"{op}: ToMe matching needs at least 2 tokens, got {n}")
    check_device(op, _match_kernel, metric, valid)
    n_a, n_b = (n + 1) // 2, n // 2
    node_max = torch.empty((bsz, n_a), dtype=torch.float32, device=metric.device)
    node_idx = torch.empty((bsz, n_a), dtype=torch.int64, device=metric.device)
    valid_u8 = valid.view(torch.uint8) if valid is not None else None
    block_a, block_b, warps = match_blocks(block_d)
    grid = (triton.cdiv(n_a, block_a), bsz)
    _match_kernel[grid](
        metric, valid_u8 if valid_u8 is not None else metric, node_max, node_idx,
        *metric.stride(), *(valid_u8.stride() if valid_u8 is not None else (0, 0)),
        d, n_a, n_b, (num_protected + 1) // 2, num_protected // 2,
        HAS_VALID=valid is not None, DOT_MODE=dot_mode(_match_kernel, metric.dtype),
        BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_D=block_d, num_warps=warps,
    )
    return node_max, node_idx


def tome_plan(
    k: torch.Tensor, r: int, num_protected: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `tome_plan` op on the GPU: matching kernel, then the plan's `[B, N]` index work in torch.

    Same outputs as `kernels.plans.bipartite_plan(k, r, num_protected, valid)`: `slot [B, N]`,
    `rep [B, N - r]` (int64) and `keep [B, N]` (k's dtype)."""
    n = k.shape[-2]
    if r < 0 or r > max_r(n, num_protected):  # refuse before launching anything, as the reference
        raise TokenReduceError(
            f"ToMe r={r} is too large for {n} tokens with {num_protected} protected; "
            f"the largest valid r is {max_r(n, num_protected)}"
        )
    node_max, node_idx = bipartite_match(k, num_protected, valid)
    return reference.plan_from_matches(node_max, node_idx, r, num_protected, valid, n, k.dtype)
