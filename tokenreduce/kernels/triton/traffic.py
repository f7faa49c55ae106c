"""Analytical memory traffic of one reduction step, fused kernels vs the unfused graph.

The case for the kernels, counted rather than measured (CI has no GPU): for each reduction step of one
block, the global-memory bytes every kernel of the unfused graph reads and writes, op by op as the
reference code (`kernels/reference.py`, `kernels/plans.py`) runs on a GPU without fusion, against the
fused kernels of this package. Model, the same on both sides:

- every op reads each input once and writes its output once (compulsory traffic); views (slices,
  transposes, expands) are free; a tile that several programs of one kernel re-read is counted once (it
  is L2-resident: K or V of one head at ViT-B/16 is 197 x 64 x 2 = 25 KB);
- out-of-place `scatter_add` copies its destination (read + write) and reads source and index;
- `[B, N]` integer work that both sides share (ToMe's edge sort and slot assignment, EViT's top-k) is
  left out; the CSR indices the merge kernel needs are counted on the fused side;
- the unfused attention is one fused SDPA kernel (FlashAttention on a GPU): the saving counted for the
  attention step is the score recomputation, not the attention itself.

Run `python -m tokenreduce.kernels.triton.traffic` (no GPU, no triton needed) for the table in
docs/kernels.md; arguments change the shape (`--help`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

F32, I64 = 4, 8


@dataclass(frozen=True)
class Shape:
    """One block's shape; defaults: ViT-B/16 at 224 px (197 tokens, 12 heads of 64, C=768), fp16, batch 1."""

    batch: int = 1
    tokens: int = 197
    heads: int = 12
    head_dim: int = 64
    channels: int = 768
    elem: int = 2  # bytes per activation element (fp16)
    protected: int = 1  # CLS
    tome_r: int = 13
    evit_keep_ratio: float = 0.7

    @property
    def tome_out(self) -> int:
        return self.tokens - self.tome_r

    @property
    def evit_out(self) -> int:  # protected + kept + one fused token
        return self.protected + math.ceil(self.evit_keep_ratio * (self.tokens - self.protected)) + 1


Op = tuple[str, int, int]  # (kernel, bytes read, bytes written)


def attention_scores_unfused(s: Shape) -> list[Op]:
    """SDPA, then `reference.query_row_scores(q, k, None, scale, 0)` op by op (EViT, no bias)."""
    b, n, h, d, e = s.batch, s.tokens, s.heads, s.head_dim, s.elem
    return [
        ("sdpa (flash)", 3 * b * h * n * d * e, b * h * n * d * e),
        ("q[:, :, 0:1].float()", b * h * d * e, b * h * d * F32),
        ("k.float()", b * h * n * d * e, b * h * n * d * F32),
        ("q_row @ k^T", b * h * d * F32 + b * h * n * d * F32, b * h * n * F32),
        ("* scale", b * h * n * F32, b * h * n * F32),
        ("softmax", b * h * n * F32, b * h * n * F32),
        ("mean(heads)", b * h * n * F32, b * n * F32),
        (".to(fp16)", b * n * F32, b * n * e),
    ]


def attention_scores_one_kernel(s: Shape) -> list[Op]:
    """The best unfused graph: SDPA plus one ideal score kernel (q row and K in, `[B, N]` out)."""
    b, n, h, d, e = s.batch, s.tokens, s.heads, s.head_dim, s.elem
    return [
        ("sdpa (flash)", 3 * b * h * n * d * e, b * h * n * d * e),
        ("ideal one-row score kernel", b * h * d * e + b * h * n * d * e, b * n * e),
    ]


def attention_scores_fused(s: Shape) -> list[Op]:
    """`attention_with_scores` on CUDA: the forward kernel writes the row logits and rewrites them as
    probabilities; head mean and cast in torch."""
    b, n, h, d, e = s.batch, s.tokens, s.heads, s.head_dim, s.elem
    return [
        ("attention fwd + row (q, k, v -> out)", 3 * b * h * n * d * e, b * h * n * d * e),
        ("  row logits, then probabilities", b * h * n * F32, 2 * b * h * n * F32),
        ("mean(heads)", b * h * n * F32, b * n * F32),
        (".to(fp16)", b * n * F32, b * n * e),
    ]


def matching_unfused(s: Shape) -> list[Op]:
    """`plans.bipartite_plan` up to `scores.max(-1)` (the part the matching kernel replaces)."""
    b, n, h, d, e = s.batch, s.tokens, s.heads, s.head_dim, s.elem
    na, nb = (n + 1) // 2, n // 2
    ops = [
        ("k.mean(heads)", b * h * n * d * e, b * n * d * e),
        ("norm(dim=-1)", b * n * d * e, b * n * e),
        ("metric / norm", b * n * d * e + b * n * e, b * n * d * e),
        ("a @ b^T", b * n * d * e, b * na * nb * e),
    ]
    if (s.protected + 1) // 2:
        ops.append(("masked_fill protected rows", b * na * nb * e + na, b * na * nb * e))
    if s.protected // 2:
        ops.append(("masked_fill protected cols", b * na * nb * e + nb, b * na * nb * e))
    ops.append(("max(-1)", b * na * nb * e, b * na * (e + I64)))
    return ops


def matching_fused(s: Shape) -> list[Op]:
    b, n, h, d, e = s.batch, s.tokens, s.heads, s.head_dim, s.elem
    na = (n + 1) // 2
    return [
        ("k.mean(heads)", b * h * n * d * e, b * n * d * e),
        ("match kernel (A, B -> max, argmax)", b * n * d * e, b * na * (F32 + I64)),
    ]


def merge_unfused(s: Shape, n_out: int) -> list[Op]:
    """`reference.apply_plan(x, slot, None, size, n_out)` op by op (sizes given, weights = sizes)."""
    b, n, c, e = s.batch, s.tokens, s.channels, s.elem
    m = n_out + 1
    return [
        ("zeros acc [B, N'+1, C]", 0, b * m * c * e),
        ("x * w", b * n * c * e + b * n * e, b * n * c * e),
        ("scatter_add acc", b * m * c * e + b * n * c * e + b * n * I64, b * m * c * e),
        ("zeros + scatter_add weights", b * m * e + b * n * (e + I64), 2 * b * m * e),
        ("w > 0, zeros_like, where", 3 * b * n * e + b * n, b * n * (1 + 2 * e)),
        ("zeros + scatter_add sizes", b * m * e + b * n * (e + I64), 2 * b * m * e),
        ("wsum > 0, ones_like, where", 3 * b * n_out * e + b * n_out, b * n_out * (1 + 2 * e)),
        ("acc / denom", b * n_out * c * e + b * n_out * e, b * n_out * c * e),
    ]


def merge_fused(s: Shape, n_out: int) -> list[Op]:
    b, n, c, e = s.batch, s.tokens, s.channels, s.elem
    return [
        ("sort(slot) (CSR order)", b * n * I64, 2 * b * n * I64),
        ("searchsorted (CSR starts)", b * n * I64 + b * (n_out + 1) * I64, b * (n_out + 1) * I64),
        ("merge kernel (x, sizes -> x', sizes')", b * n * c * e + b * n * (e + I64) + b * (n_out + 1) * I64,
         b * n_out * c * e + b * n_out * e),
    ]


def total(ops: list[Op]) -> int:
    return sum(r + w for _, r, w in ops)


def steps(s: Shape) -> list[tuple[str, list[Op], list[Op]]]:
    """(step, unfused ops, fused ops) for every fused kernel, at this shape."""
    return [
        ("EViT score: attention + CLS row", attention_scores_unfused(s), attention_scores_fused(s)),
        ("  same, vs SDPA + one ideal score kernel", attention_scores_one_kernel(s), attention_scores_fused(s)),
        (f"ToMe matching (r={s.tome_r})", matching_unfused(s), matching_fused(s)),
        (f"ToMe merge {s.tokens} -> {s.tome_out}", merge_unfused(s, s.tome_out), merge_fused(s, s.tome_out)),
        (f"EViT gather + fuse {s.tokens} -> {s.evit_out}", merge_unfused(s, s.evit_out), merge_fused(s, s.evit_out)),
    ]


def tome_model_saving(s: Shape, blocks: int = 12) -> tuple[int, int]:
    """Bytes the matching + merge kernels save over a whole ToMe model (r merges in each of `blocks` blocks,
    counted at each block's token count), and the final token count."""
    saved, n = 0, s.tokens
    for _ in range(blocks):
        b = Shape(s.batch, n, s.heads, s.head_dim, s.channels, s.elem, s.protected, s.tome_r)
        saved += total(matching_unfused(b)) - total(matching_fused(b))
        saved += total(merge_unfused(b, n - s.tome_r)) - total(merge_fused(b, n - s.tome_r))
        n -= s.tome_r
    return saved, n


def table(s: Shape) -> str:
    """Markdown table: bytes moved per block, unfused vs fused, and the saving."""
    lines = [
        "| step | unfused kernels | unfused KB | fused kernels | fused KB | saved KB | saved |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, unf, fus in steps(s):
        tu, tf = total(unf), total(fus)
        lines.append(f"| {name} | {len(unf)} | {tu / 1e3:.1f} | {sum(not o[0].startswith('  ') for o in fus)} | "
                     f"{tf / 1e3:.1f} | {(tu - tf) / 1e3:.1f} | {100 * (tu - tf) / tu:.0f}% |")
    return "\n".join(lines)


def breakdown(s: Shape) -> str:
    out = []
    for name, unf, fus in steps(s):
        out.append(f"\n{name}")
        for side, ops in (("unfused", unf), ("fused", fus)):
            for op, r, w in ops:
                out.append(f"  {side:8s} {op:42s} read {r:>10,d} B  write {w:>10,d} B")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--channels", type=int, default=768)
    p.add_argument("--elem", type=int, default=2, help="bytes per activation element (2: fp16/bf16, 4: fp32)")
    p.add_argument("--r", type=int, default=13)
    p.add_argument("--keep-ratio", type=float, default=0.7)
    p.add_argument("--blocks", type=int, default=12, help="merging blocks for the whole-model ToMe line")
    p.add_argument("--breakdown", action="store_true", help="also list every kernel's bytes")
    a = p.parse_args(argv)
    s = Shape(a.batch, a.tokens, a.heads, a.head_dim, a.channels, a.elem, 1, a.r, a.keep_ratio)
    print(table(s))
    saved, n_last = tome_model_saving(s, a.blocks)
    print(f"\nToMe r={s.tome_r} over {a.blocks} blocks ({s.tokens} -> {n_last} tokens): matching + merge kernels "
          f"save {saved / 1e6:.1f} MB")
    if a.breakdown:
        print(breakdown(s))


if __name__ == "__main__":
    main()
