"""Ahead-of-time builds of the kernels for a given GPU architecture, without a GPU.

`variants(dtype, head_dim, channels)` lists one specialisation per kernel with the block sizes, warps and
stages its launcher would pick, and `compile_variant(v, arch)` runs the full Triton pipeline
(`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`: TTIR -> TTGIR -> LLVM -> PTX ->
cubin through the wheel's `ptxas`). Two uses:

- tests/kernels/test_triton_compile.py builds every kernel for sm_80 and sm_90 on the CPU-only CI, so
  code that would fail to build on a GPU (or need more shared memory than the part has) fails there;
- the TensorRT plugin route (docs/kernels.md): a TensorRT 10 Quickly Deployable Plugin's
  `@tensorrt.plugin.aot_impl` returns a kernel name, its PTX and launch parameters, which is what
  `compile_variant` produces (`.asm["ptx"]`, `.metadata.name`, `.metadata.shared`, `num_warps`).

Parameter types are derived from the kernels' own signatures (`*_ptr` pointers, constexprs, the float
scales, everything else i32), so a new kernel argument cannot silently drift from what is built here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tokenreduce.kernels.triton import attention, matching, merge
from tokenreduce.kernels.triton._common import TL_DTYPE_NAMES, dot_mode, head_block

FLOAT_SCALARS = {"qk_scale", "inv_m"}
# Shared memory per block an sm_80 / sm_90 part can give one program (opt-in maximum, bytes).
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass(frozen=True)
class Variant:
    name: str
    kernel: Any
    pointers: dict[str, str]  # pointer argument -> element type ("fp16", "fp32", "i64", "u8")
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 2
    signature: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        sig = {}
        for name, p in inspect.signature(self.kernel.fn).parameters.items():
            if p.annotation is not inspect.Parameter.empty and "constexpr" in str(p.annotation):
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*" + self.pointers[name]
            elif name in FLOAT_SCALARS:
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        missing = [n for n, t in sig.items() if t == "constexpr" and n not in self.constexprs]
        if missing:
            raise ValueError(f"{self.name}: no value for constexprs {missing}")
        object.__setattr__(self, "signature", sig)


def variants(dtype: torch.dtype = torch.float16, head_dim: int = 64, channels: int = 768,
             causal: bool = False) -> list[Variant]:
    """One specialisation per kernel (all optional features on) with its launcher's block choices."""
    dt = TL_DTYPE_NAMES[dtype]
    block_d = head_block("aot", head_dim)
    bm, bn, warps, stages = attention.attn_blocks(block_d, dtype)
    mode = dot_mode(attention._attn_fwd_kernel, dtype)
    ba, bb, mwarps = matching.match_blocks(block_d)
    block_c, cwarps = merge.merge_blocks(channels)
    attn_ptrs = {"q_ptr": dt, "k_ptr": dt, "v_ptr": dt, "bias_ptr": dt, "out_ptr": dt, "lse_ptr": "fp32",
                 "rowp_ptr": "fp32", "col_ptr": "fp32"}
    return [
        Variant("attention_fwd", attention._attn_fwd_kernel, attn_ptrs,
                dict(HAS_BIAS=True, IS_CAUSAL=causal, WITH_ROW=True, WITH_LSE=True, DOT_MODE=mode,
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d), warps, stages),
        Variant("attention_colsum", attention._attn_colsum_kernel, attn_ptrs,
                dict(HAS_BIAS=True, IS_CAUSAL=causal, DOT_MODE=mode, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d),
                warps, stages),
        Variant("row_scores", attention._row_scores_kernel, attn_ptrs,
                dict(HAS_BIAS=True, BLOCK_N=attention.row_block(block_d), BLOCK_D=block_d), 4),
        Variant("match", matching._match_kernel,
                {"m_ptr": dt, "valid_ptr": "u8", "max_ptr": "fp32", "idx_ptr": "i64"},
                dict(HAS_VALID=True, DOT_MODE=dot_mode(matching._match_kernel, dtype),
                     BLOCK_A=ba, BLOCK_B=bb, BLOCK_D=block_d), mwarps),
        Variant("merge", merge._merge_kernel,
                {"x_ptr": dt, "w_ptr": dt, "size_ptr": dt, "order_ptr": "i64", "start_ptr": "i64", "out_ptr": dt,
                 "osize_ptr": dt},
                dict(HAS_W=True, HAS_SIZE=True, BLOCK_C=block_c), cwarps),
    ]


def compile_variant(v: Variant, arch: int) -> Any:
    """Build `v` for `sm_<arch>` (e.g. 80, 90); returns Triton's CompiledKernel (`.asm["ptx"|"cubin"]`)."""
    src = ASTSource(fn=v.kernel, signature=v.signature, constexprs=v.constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": v.num_warps, "num_stages": v.num_stages})
