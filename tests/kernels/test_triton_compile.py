"""Compile-only: every kernel builds to PTX and a cubin for sm_80 and sm_90 on this CPU-only machine.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs the whole pipeline (TTIR, TTGIR,
LLVM, PTX, then `ptxas` from the triton wheel to a cubin), so code that would fail to build on a GPU fails
here: layout or type errors, unsupported ops for the architecture, a `tl.dot` shape the MMA units cannot
take. The specialisations are the launchers' own (`kernels/triton/aot.py`), with every optional feature
on (bias, padding validity, row scores, column means, weights and sizes). The shared memory each build
needs is checked against what one program can get on that architecture (a launch past it fails only at
run time on a GPU). Besides the fp16 / head-dim-64 builds (ViT-B), the attention forward is built at its
largest tiles' footprint: fp32 with a 256-wide head (IEEE fp32 dots, the smallest tiles).

No PTX-only fallback: Triton 3.8 keys its compile cache on `ptxas --version`, so without the wheel's
`ptxas` nothing compiles at all; the first test says so if it is missing. A fresh cache directory makes
every build real (a cached cubin would prove nothing).
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

triton = pytest.importorskip("triton")

from tokenreduce.kernels.triton import aot  # noqa: E402

ARCHS = (80, 90)
FP16_VARIANTS = {v.name: v for v in aot.variants(torch.float16, head_dim=64, channels=768)}


@pytest.fixture(scope="module", autouse=True)
def fresh_cache(tmp_path_factory):
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    yield
    if old is None:
        os.environ.pop("TRITON_CACHE_DIR", None)
    else:
        os.environ["TRITON_CACHE_DIR"] = old


def test_ptxas_ships_with_triton():
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90)
    out = subprocess.run([ptxas.path, "--version"], capture_output=True, text=True, check=True).stdout
    assert "Cuda compilation tools" in out


def _check_build(compiled, arch: int, name: str) -> None:
    ptx = compiled.asm["ptx"]
    assert f".target sm_{arch}" in ptx, f"{name}: PTX not for sm_{arch}"
    assert f".entry {name}" in ptx or f".entry {compiled.metadata.name}" in ptx
    cubin = compiled.asm["cubin"]
    assert isinstance(cubin, bytes) and cubin[:4] == b"\x7fELF", f"{name}: ptxas produced no ELF cubin"
    assert compiled.metadata.shared <= aot.MAX_SHARED[arch], (
        f"{name} needs {compiled.metadata.shared} B of shared memory; sm_{arch} gives {aot.MAX_SHARED[arch]}"
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(FP16_VARIANTS))
def test_kernel_builds_fp16(name, arch):
    v = FP16_VARIANTS[name]
    _check_build(aot.compile_variant(v, arch), arch, v.kernel.fn.__name__)


def test_attention_builds_at_largest_tiles_fp32_d256():
    v = next(v for v in aot.variants(torch.float32, head_dim=256, causal=True) if v.name == "attention_fwd")
    assert v.constexprs["DOT_MODE"] == 1  # IEEE fp32 dots (no TF32)
    _check_build(aot.compile_variant(v, 80), 80, v.kernel.fn.__name__)


def test_variant_signature_follows_kernel_arguments():
    v = FP16_VARIANTS["attention_fwd"]
    assert v.signature["q_ptr"] == "*fp16" and v.signature["lse_ptr"] == "*fp32"
    assert v.signature["qk_scale"] == "fp32" and v.signature["row"] == "i32"
    assert v.signature["BLOCK_D"] == "constexpr" and v.constexprs["BLOCK_D"] == 64
    m = FP16_VARIANTS["match"]
    assert m.signature["valid_ptr"] == "*u8" and m.signature["idx_ptr"] == "*i64"
