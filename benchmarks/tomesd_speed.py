"""tomesd on an SD-1.5-shaped UNet (diffusers' default `UNet2DConditionModel` config, 860M parameters, random
init): one denoiser call, eager, batch 1, the reduced graph against the unreduced UNet in interleaved rounds
(`tokenreduce.bench.interleaved`: one untimed call each, then A, B, A, B, ..., medians), with the compile
report's FLOPs ratio (attention counted) and efficiency = speedup x FLOPs ratio.

Usage:
    python benchmarks/tomesd_speed.py --side 64 --ratios 0.3,0.5,0.6 --repeats 3     # 512 px
    python benchmarks/tomesd_speed.py --side 128 --ratios 0.5 --repeats 2            # 1024 px
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import tokenreduce
from tokenreduce.bench import interleaved


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=64, help="latent height and width (64 = 512 px)")
    ap.add_argument("--ratios", default="0.3,0.5,0.6", help="tomesd ratios, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import diffusers

    torch.manual_seed(0)
    start, load = time.perf_counter(), os.getloadavg()[0]
    unet = diffusers.UNet2DConditionModel(sample_size=args.side, cross_attention_dim=768,
                                          attention_head_dim=8).eval()
    x, t, text = torch.randn(1, 4, args.side, args.side), torch.tensor([500]), torch.randn(1, 77, 768)
    print(f"SD-1.5-shaped UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters), latent "
          f"{args.side}x{args.side}, batch 1, eager, {torch.get_num_threads()} threads", flush=True)
    for ratio in (float(r) for r in args.ratios.split(",")):
        red = tokenreduce.compile(unet, (x, t), {"encoder_hidden_states": text}, method="tomesd", ratio=ratio,
                                  inner="eager")
        rep = red.report
        assert rep.flops_before and rep.flops_after
        fr = rep.flops_after / rep.flops_before
        tm = interleaved(lambda: unet(x, t, encoder_hidden_states=text),
                         lambda r=red: r(x, t, encoder_hidden_states=text), repeats=args.repeats, warmup=0)
        lat = tm.median_reduced_ms / tm.median_unreduced_ms
        print(f"ratio {ratio}: FLOPs ratio {fr:.3f}; {tm.median_unreduced_ms:.0f} ms -> {tm.median_reduced_ms:.0f} ms "
              f"(latency ratio {lat:.3f}, efficiency {fr / lat:.2f})", flush=True)
    print(f"{time.perf_counter() - start:.0f} s, load average {load:.1f} -> {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
