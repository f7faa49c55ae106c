"""tomesd speed on CPU: one denoiser call, reduced against unreduced, on eager / inductor / onnxruntime.

Models (random init; the ratio of two latencies does not depend on the weights):

* `unet`: an SD-1.5-shaped `UNet2DConditionModel` (diffusers' default layout: 4 levels, 8 heads, 77 x 768 text,
  860M parameters at `--unet-width 320`). `--unet-width 160` halves every channel count and keeps the token
  counts, the heads and the layout (215M parameters; its ONNX file fits in one protobuf, no external data);
  attention is then a larger share of the FLOPs than at full width, so read its FLOPs ratio next to its latency.
  `max_downsample=1` (tomesd's default): only the finest level's transformer blocks merge.
* `dit`: a DiT-XL/2-shaped `DiTTransformer2DModel` (hidden 1152 = 16 heads x 72, patch 2, AdaLN-Zero, 1000
  classes) with `--dit-layers` blocks instead of 28: every block is the same and every block merges, so the
  latency ratio hardly depends on the depth (only the patch embedding and the final layer do not scale with it).
  `max_downsample=2` (a patch-2 model's tokens are 2x coarser than its latent).

Per (model, latent side, target): the unreduced model is prepared once (`tokenreduce.bench.prepare_baseline`:
eager = the module, inductor = `torch.compile(module)`, onnxruntime = the `method="none"` graph exported and
verified); per ratio the reduced graph is compiled once (FLOPs counted with attention) and lowered on each
target. Timing: `tokenreduce.bench.interleaved` (one untimed first call each, which is where inductor compiles
and onnxruntime warms up, then `--warmup` untimed rounds and `--repeats` rounds of A, B, A, B, ...; medians).
`--fused-attention`: both onnxruntime sides export attention as onnxruntime's fused `MultiHeadAttention`
(`TargetOptions.fused_attention`); without it the exported attention is MatMul-Softmax-MatMul over a
materialised score tensor (8.6 GB per call for the 1024-px UNet's finest level, which does not fit 23 GB).
Each row holds the load average before and after its timing and is appended to `--json` (one JSON object per
line) as soon as it is measured, so a stopped run keeps what it measured.

Usage:
    python benchmarks/tomesd_speed.py --model dit --side 64 --targets eager,inductor,onnxruntime --json out.jsonl
    python benchmarks/tomesd_speed.py --model unet --unet-width 160 --side 64 --repeats 3 --json out.jsonl
    python benchmarks/tomesd_speed.py --model unet --side 128 --targets eager --ratios 0.5 --repeats 3
    python benchmarks/tomesd_speed.py --model unet --side 128 --targets onnxruntime --fused-attention --ratios 0.5
    python benchmarks/tomesd_speed.py --table out.jsonl        # the rows as the markdown table of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

import tokenreduce
from tokenreduce.bench import bench_targets, interleaved, make_row, paired_ratio, prepare_baseline, threads_used
from tokenreduce.targets.base import TargetOptions


def build(args: argparse.Namespace, side: int) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any], str,
                                                       dict[str, Any]]:
    """The model, one call's inputs (batch `--batch`), a description, and the tomesd settings it needs."""
    import diffusers

    torch.manual_seed(0)
    b = args.batch
    model: Any  # diffusers classes (mypy does not see them as nn.Module)
    inputs: tuple[tuple[Any, ...], dict[str, Any]]
    if args.model == "unet":
        w = args.unet_width
        model = diffusers.UNet2DConditionModel(sample_size=side, block_out_channels=(w, 2 * w, 4 * w, 4 * w),
                                               cross_attention_dim=768, attention_head_dim=8)
        inputs = (torch.randn(b, 4, side, side), torch.full((b,), 500)), \
            {"encoder_hidden_states": torch.randn(b, 77, 768)}
        desc = f"SD-1.5-shaped UNet, channels {w}/{2 * w}/{4 * w}/{4 * w}, 8 heads"
        extra: dict[str, Any] = {"max_downsample": 1}
    else:
        model = diffusers.DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                                out_channels=8, num_layers=args.dit_layers, sample_size=side,
                                                patch_size=2, num_embeds_ada_norm=1000)
        inputs = (torch.randn(b, 4, side, side),), {"timestep": torch.full((b,), 500),
                                                     "class_labels": torch.arange(b) % 1000}
        desc = f"DiT-XL/2-shaped transformer (hidden 1152, 16 heads, patch 2), {args.dit_layers} of 28 blocks"
        extra = {"max_downsample": 2}
    model.eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return model, inputs[0], inputs[1], f"{desc}, {params:.0f}M parameters", extra


def table(path: Path) -> str:
    """The JSON rows of `path` as a markdown table. `paired` is the median over rounds of (reduced / unreduced) in
    the same round: on a loaded machine it is less moved by load changes between rounds than the ratio of medians."""
    lines = ["| model | latent | merged blocks (tokens) | ratio | target | FLOPs ratio | unreduced s | reduced s | "
             "latency ratio | paired | efficiency | load before -> after |", "|" + "---|" * 12]
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    order = {"eager": 0, "inductor": 1, "onnxruntime": 2}
    for r in sorted(rows, key=lambda r: (r["model"], r["side"], r["ratio"], order.get(r["target"], 3))):
        tokens = ", ".join(f"{a}->{b}" for a, b in r["tokens"])
        paired = paired_ratio(r["samples_unreduced_ms"], r["samples_reduced_ms"])
        lines.append(f"| {r['model']} | {r['side']}x{r['side']} | {r['merged_blocks']} ({tokens}) | {r['ratio']} | "
                     f"{r['target']}{' (fused attention)' if r.get('fused_attention') else ''} | {r['flops_ratio']:.3f} | {r['latency_unreduced_ms'] / 1e3:.2f} | "
                     f"{r['latency_reduced_ms'] / 1e3:.2f} | {r['latency_ratio']:.3f} | {paired:.3f} | "
                     f"{r['efficiency']:.2f} | {r['load_before'][0]:.0f} -> {r['load_after'][0]:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("unet", "dit"), default="unet")
    ap.add_argument("--side", type=int, default=64, help="latent height and width (64 = 512 px, 128 = 1024 px)")
    ap.add_argument("--targets", default="eager", help=f"comma-separated, of {', '.join(bench_targets())}")
    ap.add_argument("--ratios", default="0.3,0.5,0.6", help="tomesd ratios, comma-separated")
    ap.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds (use ~3 for heavy calls)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed rounds after the untimed first call")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads and onnxruntime intra-op threads")
    ap.add_argument("--batch", type=int, default=1, help="one denoiser call's batch (odd: top-left destinations)")
    ap.add_argument("--unet-width", type=int, default=320, help="first level's channels (SD 1.5: 320)")
    ap.add_argument("--dit-layers", type=int, default=2, help="DiT blocks (DiT-XL/2 has 28)")
    ap.add_argument("--atol", type=float, default=1e-4,
                    help="onnxruntime verification tolerance (max abs diff to eager); fp32 attention over 16384 "
                         "tokens, unfused in the exported graph, differs from fused SDPA by ~3e-3 on the UNet")
    ap.add_argument("--fused-attention", action="store_true",
                    help="onnxruntime: export attention as onnxruntime's fused MultiHeadAttention on both sides")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON row per measurement to this file")
    ap.add_argument("--table", type=Path, default=None, help="print the rows of this JSON file as markdown; no run")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.table))
        return
    torch.set_num_threads(args.threads)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    ratios = [float(r) for r in args.ratios.split(",")]
    start = time.perf_counter()
    model, call_args, call_kwargs, desc, extra = build(args, args.side)
    print(f"{desc}; latent {args.side}x{args.side}, batch {args.batch}, {args.threads} thread(s); targets "
          f"{', '.join(targets)}; load average {os.getloadavg()[0]:.1f}", flush=True)
    baselines: dict[str, Any] = {}
    for ratio in ratios:
        with torch.no_grad():
            red = tokenreduce.compile(model, call_args, call_kwargs, method="tomesd", ratio=ratio, inner="eager",
                                      dynamic_batch=False, **extra)
        rep = red.report
        merged = [b for b in rep.blocks if b.action != "-"]
        for target in targets:
            if target not in baselines:
                t0 = time.perf_counter()
                baselines[target] = prepare_baseline(model, call_args, call_kwargs, target, dynamic_batch=False,
                                                     threads=args.threads, atol=args.atol,
                                                     fused_attention=args.fused_attention)
                print(f"  {target}: unreduced prepared in {time.perf_counter() - t0:.0f} s", flush=True)
            t0 = time.perf_counter()
            lowered = bench_targets()[target].lower(red.graph_module, red.example_args, red.example_kwargs,
                                                    TargetOptions(dynamic_batch=False, threads=args.threads,
                                                                  atol=args.atol,
                                                                  fused_attention=args.fused_attention))
            prepared_s = time.perf_counter() - t0
            load_before = os.getloadavg()
            timing = interleaved(baselines[target].bind(call_args, call_kwargs),
                                 lowered.bind(red.example_args, red.example_kwargs),
                                 repeats=args.repeats, warmup=args.warmup)
            load_after = os.getloadavg()
            row = make_row(f"tomesd ratio={ratio}", args.batch, target, timing, rep, threads=threads_used(lowered))
            fused = args.fused_attention and target == "onnxruntime"
            record = {"model": args.model, "description": desc, "side": args.side, "ratio": ratio,
                      "fused_attention": fused, "unet_width": args.unet_width if args.model == "unet" else None,
                      "merged_blocks": f"{len(merged)}/{len(rep.blocks)}",
                      "tokens": sorted({(b.tokens_in, b.tokens_out) for b in merged}),
                      "load_before": [round(x, 2) for x in load_before],
                      "load_after": [round(x, 2) for x in load_after], "reduced_prepare_s": round(prepared_s, 1),
                      **dataclasses.asdict(row)}
            print(f"{args.model} {args.side}x{args.side} {target + (' (fused attention)' if fused else ''):11s} "
                  f"ratio {ratio}: FLOPs ratio "
                  f"{row.flops_ratio:.3f}; {row.latency_unreduced_ms:.0f} -> {row.latency_reduced_ms:.0f} ms "
                  f"(latency ratio {row.latency_ratio:.3f}, efficiency {row.efficiency:.2f}); load "
                  f"{load_before[0]:.1f} -> {load_after[0]:.1f}", flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                with args.json.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            del lowered
            gc.collect()
        del red
        gc.collect()
    print(f"{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
