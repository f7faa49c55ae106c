"""GPU benchmark of the fused Triton kernels: one reduction step, then a whole ViT-B/16.

Needs a CUDA GPU (refuses otherwise) and triton. Our CI has no GPU: it never runs this script and
produces no GPU numbers; docs/kernels.md gives the analytical memory-traffic case instead
(`python -m tokenreduce.kernels.triton.traffic`). Run it on your GPU:

    python benchmarks/gpu_kernels.py                         # fp16, batch 1 and 32
    python benchmarks/gpu_kernels.py --batch 8 --dtype bf16 --skip-model

Part 1, one reduction step at ViT-B/16 shapes (197 tokens, 12 heads of 64, C=768), median of
`triton.testing.do_bench`, unfused = the pure-torch reference ops as they run on the GPU:
  - EViT score: SDPA + `query_row_scores` reference  vs  `attention_with_scores` kernel
  - ToMe plan:  `tome.bipartite_plan`                  vs  matching kernel + plan tail
  - merge:      `reference.apply_plan` (ToMe r=13)     vs  merge kernel
Part 2, timm `vit_base_patch16_224` (random init, no download), eval, inductor: the unreduced model, the
reduced model with the reference ops inlined into inductor (unfused), and the reduced model on the
kernels (fused; for EViT the fusion pass puts `attention_with_scores` in place of SDPA + score).
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def step_table(batch: int, dtype: torch.dtype) -> list[tuple[str, float, float]]:
    from tokenreduce.kernels import reference
    from tokenreduce.kernels.triton import attention, matching, merge
    from tokenreduce.methods import tome

    dev = "cuda"
    n, h, d, c = 197, 12, 64, 768
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(batch, h, n, d, device=dev, dtype=dtype, generator=g) for _ in range(3))
    x = torch.randn(batch, n, c, device=dev, dtype=dtype, generator=g)
    size = torch.randint(1, 4, (batch, n), device=dev, generator=g).to(dtype)
    scale = d**-0.5
    slot, _, _ = tome.bipartite_plan(k, 13, 1)
    rows = []

    def unfused_score():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        reference.query_row_scores(q, k, None, scale, 0)

    rows.append(("EViT score (attention + CLS row)", _bench(unfused_score),
                 _bench(lambda: attention.attention_with_scores(q, k, v, None, scale, False, 0))))
    rows.append(("ToMe plan (r=13)", _bench(lambda: tome.bipartite_plan(k, 13, 1)),
                 _bench(lambda: matching.tome_plan(k, 13, 1))))
    rows.append(("merge 197 -> 184", _bench(lambda: reference.apply_plan(x, slot, None, size, n - 13)),
                 _bench(lambda: merge.apply_plan(x, slot, None, size, n - 13))))
    return rows


def model_table(batch: int, dtype: torch.dtype) -> list[tuple[str, float, float, float]]:
    import timm

    import tokenreduce
    from tokenreduce.passes.inline_reference_ops import inline_reference_ops

    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval().to("cuda", dtype)
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
    rows = []
    with torch.inference_mode():
        base = torch.compile(model)
        base(x)
        t_base = _bench(lambda: base(x))
    for label, settings in (("ToMe r=13", dict(method="tome", r=13)),
                            ("EViT keep 0.7 @ 3,6,9", dict(method="evit", keep_ratio=0.7, layers=[3, 6, 9]))):
        red = tokenreduce.compile(model, (x,), inner="inductor", **settings)
        unfused_gm = copy.deepcopy(red.graph_module)
        inline_reference_ops(unfused_gm)
        unfused = torch.compile(unfused_gm)
        with torch.inference_mode():
            red(x)
            unfused(x)
            rows.append((label, t_base, _bench(lambda: unfused(x)), _bench(lambda: red(x))))  # noqa: B023
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="fused vs unfused token-reduction kernels on a GPU")
    p.add_argument("--batch", type=int, nargs="*", default=[1, 32])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--skip-model", action="store_true", help="only the single-step table")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "the CPU-only CI produces no GPU numbers (see docs/kernels.md for the analytical counts)")
    from tokenreduce.kernels.triton import require_triton

    require_triton()
    dtype = DTYPES[a.dtype]
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  {a.dtype}")
    for b in a.batch:
        print(f"\n## one reduction step, batch {b}\n\n| step | unfused ms | fused ms | speedup |\n|---|---:|---:|---:|")
        for name, tu, tf in step_table(b, dtype):
            print(f"| {name} | {tu:.4f} | {tf:.4f} | {tu / tf:.2f}x |")
        if a.skip_model:
            continue
        print(f"\n## vit_base_patch16_224, batch {b}\n\n| method | unreduced ms | reduced, unfused ms | "
              "reduced, fused ms | fused vs unfused | fused vs unreduced |\n|---|---:|---:|---:|---:|---:|")
        for label, tb, tu, tf in model_table(b, dtype):
            print(f"| {label} | {tb:.3f} | {tu:.3f} | {tf:.3f} | {tu / tf:.2f}x | {tb / tf:.2f}x |")


if __name__ == "__main__":
    main()
