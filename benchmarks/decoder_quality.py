"""Quality of FastV / PyramidDrop / GemFilter on a real decoder LLM (SmolLM2-135M-Instruct).

Two measurements, each for the full model and every method, with the same samples:

* Needle in a haystack (tokenreduce.evaluate.llm.needle_samples): a 5-digit "secret number" planted at a
  random depth of WikiText-2 text, the question after the text, greedy answer; accuracy = the number
  appears in the first `--max-new-tokens` generated tokens. The span (what a method may drop) is the
  haystack including the needle: the method has to find it.
* WikiText-2 continuation perplexity: a `--ppl-context`-token context (span: all but the first 4 and last
  16 tokens) is prefilled with pruning, then the next `--ppl-continuation` tokens are scored by teacher
  forcing through the pruned KV cache (ReducedDecoder.continuation_logits).

Usage (numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/decoder_quality.py --lengths 1024 2048 4096 --n 20 --ppl-n 20 \
        --json docs/decoder_quality.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import tokenreduce
from tokenreduce.evaluate import llm

# name -> (method, settings). GemFilter's filter layer is where SmolLM2-135M's last query starts finding
# the needle (layer 13-14 of 30, close to the paper's 13/32); `+pool` adds the SnapKV-style score pooling.
SETTINGS: dict[str, tuple[str, dict]] = {
    "fastv": ("fastv", dict(layers=[2], keep_ratio=0.5)),
    "pyramiddrop": ("pyramiddrop", dict(keep_ratio=0.5)),
    "gemfilter": ("gemfilter", dict(layers=[14], keep_tokens=512)),
    "gemfilter+pool": ("gemfilter", dict(layers=[14], keep_tokens=512, score_pool=15)),
    "gemfilter-L8": ("gemfilter", dict(layers=[8], keep_tokens=256, score_pool=15)),  # the fast setting
    "divprune": ("divprune", dict(keep_ratio=0.5)),
    "dart": ("dart", dict(layers=[2], keep_ratio=0.5)),
    "sparsevlm": ("sparsevlm", dict(layers=[2], keep_ratio=0.5)),
    "visiondrop": ("visiondrop", dict(layers=[2], keep_ratio=0.5)),
}


def generate_fn(dec: tokenreduce.ReducedDecoder):  # type: ignore[no-untyped-def]
    def gen(ids: torch.Tensor, span: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        return dec.generate(ids, None, span, max_new_tokens=max_new_tokens)[:, ids.shape[1]:]

    return gen


def nll_fn(dec: tokenreduce.ReducedDecoder):  # type: ignore[no-untyped-def]
    def nll(ctx: torch.Tensor, span: torch.Tensor, cont: torch.Tensor) -> float:
        logits = dec.continuation_logits(ctx, cont, None, span)
        return float(torch.nn.functional.cross_entropy(logits[0].float(), cont[0], reduction="sum"))

    return nll


def _reused(full: dict, n_tok: int, n: int) -> dict | None:
    """The first `n` per-sample results of a full-model run at `n_tok` tokens, if it has that many."""
    for entry in ((full.get("needle") or {}).get(str(n_tok)), full.get(f"needle_{n_tok}")):
        if entry and len(entry.get("results", [])) >= n:
            res = entry["results"][:n]
            correct = sum(bool(r["correct"]) for r in res)
            return {"accuracy": correct / n, "n": n, "correct": correct, "results": res, "reused": True}
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096])
    ap.add_argument("--n", type=int, default=20, help="needle samples per length")
    ap.add_argument("--ppl-n", type=int, default=20, help="perplexity windows (0: skip)")
    ap.add_argument("--ppl-context", type=int, default=512)
    ap.add_argument("--ppl-continuation", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--methods", nargs="+", default=["full", "fastv", "pyramiddrop", "gemfilter", "gemfilter+pool"],
                    choices=["full", *SETTINGS],
                    help="full and named settings (see SETTINGS)")
    ap.add_argument("--full-results", type=Path, default=None,
                    help="reuse full-model needle results from `python -m tokenreduce.evaluate.llm --json` (same "
                         "seed: its first --n samples per length are these samples)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    settings = {k: v[1] for k, v in SETTINGS.items()}
    model, tok = llm.load_smollm2()
    results: dict = {"settings": settings, "needle": {}, "perplexity": {}}
    reuse = json.loads(args.full_results.read_text()) if args.full_results else None
    for method in args.methods:
        dec = None if method == "full" else tokenreduce.reduce_decoder(model, SETTINGS[method][0], **settings[method])
        for n_tok in args.lengths:
            if dec is None and reuse is not None:
                prev = _reused(reuse, n_tok, args.n)
                if prev is not None:
                    results["needle"].setdefault(method, {})[n_tok] = prev
                    print(f"needle full {n_tok:5d} tokens: {prev['correct']}/{prev['n']} (reused)", flush=True)
                    continue
            samples = llm.needle_samples(tok, args.data_dir, n_tok, args.n, seed=0)
            t0 = time.perf_counter()
            fn = llm.hf_generate_fn(model) if dec is None else generate_fn(dec)
            acc = llm.needle_accuracy(fn, samples, tok, max_new_tokens=args.max_new_tokens)
            acc["seconds"] = time.perf_counter() - t0
            if dec is not None and dec.report is not None:
                acc["tokens_per_block"] = dec.report.tokens_per_block
            results["needle"].setdefault(method, {})[n_tok] = acc
            print(f"needle {method:12s} {n_tok:5d} tokens: {acc['correct']}/{acc['n']} = {acc['accuracy']:.2f} "
                  f"({acc['seconds']:.0f} s)", flush=True)
        if args.ppl_n:
            ppl_settings = dict(settings.get(method, {}))
            if SETTINGS.get(method, ("",))[0] == "gemfilter":
                ppl_settings.pop("keep_tokens", None)  # a quarter of the span (the default) at 512 tokens
            dec_ppl = None if method == "full" else tokenreduce.reduce_decoder(model, SETTINGS[method][0],
                                                                             **ppl_settings)
            fn2 = llm.hf_nll_fn(model) if dec_ppl is None else nll_fn(dec_ppl)
            ppl = llm.continuation_perplexity(fn2, tok, args.data_dir, args.ppl_context, args.ppl_continuation,
                                              n=args.ppl_n)
            if dec_ppl is not None and dec_ppl.report is not None:
                ppl["settings"] = dec_ppl.report.settings
                ppl["tokens_per_block"] = dec_ppl.report.tokens_per_block
            results["perplexity"][method] = ppl
            print(f"perplexity {method:12s}: {ppl['perplexity']:.2f} over {ppl['tokens']} tokens", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    full = results["needle"].get("full", {})
    print("\n| method | " + " | ".join(f"needle {n}" for n in args.lengths) + " | ppl |")
    print("|---|" + "---|" * (len(args.lengths) + 1))
    for method in args.methods:
        cells = []
        for n_tok in args.lengths:
            acc = results["needle"][method][n_tok]
            rel = f" ({acc['accuracy'] / full[n_tok]['accuracy']:.0%} of full)" if method != "full" and full.get(
                n_tok, {}).get("accuracy") else ""
            cells.append(f"{acc['correct']}/{acc['n']}{rel}")
        ppl_cell = f"{results['perplexity'][method]['perplexity']:.2f}" if method in results["perplexity"] else "-"
        opts = " ".join(f"{k}={v}" for k, v in settings.get(method, {}).items())
        print(f"| {method} {opts} | " + " | ".join(cells) + f" | {ppl_cell} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
