"""Prefill speed of FastV / PyramidDrop / GemFilter on a real decoder LLM (SmolLM2-135M-Instruct).

For each context length, target and method this prints the prefill latency of the unpruned model and
the pruned one, measured in the same run, and their ratio:

    method | tokens | target | full ms | pruned ms | speedup (full / pruned) | FLOPs ratio | efficiency

Methodology (as `tokenreduce/bench.py`, whose timing loop this uses):

* Same pipeline on both sides: the baseline is `reduce_decoder(model, "none")` -- the same captured prefill
  graph (last-position logits plus the per-layer K/V a cache needs) without pruning -- so `eager` compares
  two FX graphs run eagerly and `inductor` two inductor-compiled graphs. The plain transformers forward
  (`model(ids, logits_to_keep=1)`) is timed too, as a sanity line for the eager baseline.
* The prompt is a needle-in-a-haystack sample built from WikiText-2 (tokenreduce.evaluate.llm), so the
  span (the haystack) is realistic: system prompt and question stay outside it.
* Interleaved A/B rounds after untimed warm-up, medians, batch 1. Compilation is never timed.

The machine these numbers come from is a shared 2-core CPU box; run it on a quiet machine for stable
ratios. Usage:

    .venv/bin/python benchmarks/decoder_prefill.py --tokens 2048 4096 --targets eager inductor --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import tokenreduce
from tokenreduce.bench import interleaved, time_call
from tokenreduce.evaluate import llm

# name -> (method, settings); the quality runs (benchmarks/decoder_quality.py) use the same names.
METHODS: dict[str, tuple[str, dict]] = {
    "fastv": ("fastv", dict(layers=[2], keep_ratio=0.5)),
    "pyramiddrop": ("pyramiddrop", dict(keep_ratio=0.5)),
    "gemfilter+pool": ("gemfilter", dict(layers=[14], keep_tokens=512, score_pool=15)),
    "gemfilter-L8": ("gemfilter", dict(layers=[8], keep_tokens=256, score_pool=15)),
    "divprune": ("divprune", dict(keep_ratio=0.5)),
    "dart": ("dart", dict(layers=[2], keep_ratio=0.5)),
}


def _call(dec: tokenreduce.ReducedDecoder, ids: torch.Tensor, span: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda: dec.prefill(ids, None, span)


def _hf_call(model: torch.nn.Module, ids: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda: model(ids, logits_to_keep=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--targets", nargs="+", default=["eager", "inductor"], choices=["eager", "inductor"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="named settings")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = llm.load_smollm2()
    rows = []
    for n in args.tokens:
        sample = llm.needle_samples(tok, args.data_dir, n, 1, seed=0)[0]
        ids, span = sample.input_ids[None], sample.span[None]
        for target in args.targets:
            base = tokenreduce.reduce_decoder(model, "none", inner=target, count_model_flops=True)
            base.prefill(ids, None, span)
            if target == "eager":
                with torch.inference_mode():
                    hf = [time_call(_hf_call(model, ids)) for _ in range(max(1, args.repeats))]
                print(f"[{n} tokens] transformers forward (eager sanity line): {statistics.median(hf):.0f} ms",
                      file=sys.stderr)
            for method in args.methods:
                kind, settings = METHODS[method]
                dec = tokenreduce.reduce_decoder(model, kind, inner=target, count_model_flops=True, **settings)
                dec.prefill(ids, None, span)
                t = interleaved(_call(base, ids, span), _call(dec, ids, span), repeats=args.repeats,
                                warmup=args.warmup)
                full, pruned = t.median_unreduced_ms, t.median_reduced_ms
                fr = dec.report.flops_after / base.report.flops_after  # type: ignore[operator,union-attr]
                row = dict(method=method, settings=settings, tokens=n, span=int(span.sum()), target=target,
                           full_ms=full, pruned_ms=pruned, speedup=full / pruned, flops_ratio=fr,
                           efficiency=(full / pruned) * fr, repeats=args.repeats,
                           tokens_per_block=dec.report.tokens_per_block)  # type: ignore[union-attr]
                rows.append(row)
                print(f"{method:12s} {n:5d} {target:9s} full {full:8.0f} ms  pruned {pruned:8.0f} ms  "
                      f"speedup {full / pruned:5.2f}x  FLOPs x{fr:.3f}  efficiency {row['efficiency']:.2f}",
                      flush=True)
    print("\n| method | tokens | target | full ms | pruned ms | speedup | FLOPs ratio | efficiency |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} {r['settings']} | {r['tokens']} | {r['target']} | {r['full_ms']:.0f} | "
              f"{r['pruned_ms']:.0f} | {r['speedup']:.2f}x | {r['flops_ratio']:.3f} | {r['efficiency']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
