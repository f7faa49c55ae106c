"""Quality of FastV / PyramidDrop / GemFilter on a real decoder LLM (SmolLM2-135M-Instruct).

Two measurements, each for the full model and every method, with the same samples:

* Needle in a haystack (tokenreduce.evaluate.llm.needle_samples): a 5-digit "secret number" planted at a
  random depth of WikiText-2 text, the question after the text, greedy answer; accuracy = the number
  appears in the first `--max-new-tokens` generated tokens. The span (what a method may drop) is the
  haystack including the needle: the method has to find it.
* WikiText-2 continuation perplexity: a `--ppl-context`-token context (span: all but the first 4 and last
  16 tokens) is prefilled with pruning, then the next `--ppl-continuation` tokens are scored by teacher
  forcing through the pruned KV cache (ReducedDecoder.continuation_logits).
* With `--retention-n M` (`retention`): on M prompts, one unpruned forward each, whether GemFilter's
  ranking at each filter layer / observation window / pool / k would keep every digit of the answer.
* With `--speed-repeats R`: the prefill latency of each setting against the same captured prefill without
  pruning (`reduce_decoder(model, "none")`) on the first needle prompt of each length, interleaved A/B
  rounds (`tokenreduce.bench.interleaved`), medians and the per-round ratio, the load average before and
  after; `--threads 1` keeps a shared machine's other jobs from distorting it less.

The JSON is rewritten after every finished row, so a stopped run keeps what it measured.

Usage (numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/decoder_quality.py --lengths 1024 2048 4096 --n 20 --ppl-n 20 \
        --json docs/decoder_quality.json
    .venv/bin/python benchmarks/decoder_quality.py --lengths 4096 --n 0 --ppl-n 0 --speed-repeats 3 --threads 1 \
        --methods gemfilter-L7+pool+win4 --json speed.json
    .venv/bin/python benchmarks/decoder_quality.py --lengths 4096 --n 0 --ppl-n 0 --retention-n 10 --methods full
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers

import tokenreduce
from tokenreduce.bench import interleaved, paired_ratio
from tokenreduce.evaluate import llm

# name -> (method, settings). GemFilter's filter layer is where SmolLM2-135M's last query starts finding
# the needle (layer 13-14 of 30, close to the paper's 13/32); `+pool` adds the SnapKV-style score pooling.
SETTINGS: dict[str, tuple[str, dict]] = {
    "fastv": ("fastv", dict(layers=[2], keep_ratio=0.5)),
    "pyramiddrop": ("pyramiddrop", dict(keep_ratio=0.5)),
    "gemfilter": ("gemfilter", dict(layers=[14], keep_tokens=512)),
    "gemfilter+pool": ("gemfilter", dict(layers=[14], keep_tokens=512, score_pool=15)),
    "gemfilter-L8": ("gemfilter", dict(layers=[8], keep_tokens=256, score_pool=15)),  # the fast setting
    # The 4k goal grid (docs/benchmarks.md): filter layer 7 (the cheapest layer whose pooled ranking kept the
    # number in a probe of 10 prompts), with the last-token ranking and SnapKV's observation window (the last
    # 4 tokens: "The secret number is"; the last 24: the question and the answer prefix); layers 14 and 15
    # (where the last query finds the needle) with the 24-token window.
    "gemfilter-L7+pool": ("gemfilter", dict(layers=[7], keep_tokens=512, score_pool=15)),
    "gemfilter-L7+pool+win4": ("gemfilter", dict(layers=[7], keep_tokens=512, score_pool=15, score_window=4)),
    "gemfilter-L7+pool+win24": ("gemfilter", dict(layers=[7], keep_tokens=512, score_pool=15, score_window=24)),
    "gemfilter+pool+win24": ("gemfilter", dict(layers=[14], keep_tokens=512, score_pool=15, score_window=24)),
    "gemfilter-L15+pool+win24": ("gemfilter", dict(layers=[15], keep_tokens=256, score_pool=15, score_window=24)),
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


def prefill_speed(model: torch.nn.Module, dec: tokenreduce.ReducedDecoder, sample: llm.NeedleSample,
                  repeats: int) -> dict:
    """Interleaved prefill latency of `dec` against the unpruned capture of the same prefill, on one prompt."""
    ids, span = sample.input_ids[None], sample.span[None]
    base = tokenreduce.reduce_decoder(model, "none")
    load_before = os.getloadavg()
    t = interleaved(lambda: base.prefill(ids, None, span), lambda: dec.prefill(ids, None, span), repeats=repeats)
    full, pruned = t.median_unreduced_ms, t.median_reduced_ms
    return {"full_ms": full, "pruned_ms": pruned, "speedup": full / pruned,
            "paired_speedup": 1.0 / paired_ratio(t.samples_unreduced_ms, t.samples_reduced_ms),
            "full_samples_ms": t.samples_unreduced_ms, "pruned_samples_ms": t.samples_reduced_ms,
            "repeats": repeats, "threads": torch.get_num_threads(), "load_before": load_before,
            "load_after": os.getloadavg(), "tokens_per_block": dec.report.tokens_per_block if dec.report else None}


def retention(model: transformers.PreTrainedModel, tok: object, samples: list[llm.NeedleSample], layers: list[int],
              windows: list[int], pools: list[int], keeps: list[int]) -> dict:
    """Where GemFilter's ranking can find the needle, from one unpruned forward per prompt: for every filter
    layer L, observation window W, max-pool P and keep k, the number of prompts whose answer digits all
    rank among the top-k span tokens (head-mean attention of the last W query rows, summed, max-pooled
    over P as `kernels.plans.pool_scores`; `torch.topk` breaks ties, where `keep_plan` prefers the earlier
    token). A probe for choosing settings: it does not run the pruned model."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tokenreduce.kernels.plans import pool_scores

    rows, rec = max(windows), {}

    def record(module, query, key, value, attention_mask, **kw):  # type: ignore[no-untyped-def]
        out = sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
        k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1).float()
        n = k.shape[-2]
        logits = (query[:, :, -rows:].float() @ k.transpose(-1, -2)) * kw.get("scaling", query.shape[-1] ** -0.5)
        later = torch.arange(n)[None, :] > torch.arange(n - rows, n)[:, None]
        rec[module.layer_idx] = logits.masked_fill(later, float("-inf")).softmax(-1)[0].mean(0)  # [rows, N]
        return out

    AttentionInterface.register("tokenreduce_retention", record)
    before = model.config._attn_implementation
    model.set_attn_implementation("tokenreduce_retention")
    hits: dict[str, int] = {}
    try:
        for i, s in enumerate(samples):
            with torch.inference_mode():
                model(s.input_ids[None], logits_to_keep=1)
            a, b = s.needle
            digits = [j for j in range(a, b) if tok.decode([int(s.input_ids[j])]).strip().isdigit()]  # type: ignore[attr-defined]
            for L in layers:
                for W in windows:
                    for P in pools:
                        pooled = pool_scores(rec[L][-W:].sum(0)[None], P)[0]
                        ranked = torch.where(s.span, pooled, torch.tensor(float("-inf")))
                        for k in keeps:
                            top = set(ranked.topk(k).indices.tolist())
                            key = f"L{L}_W{W}_P{P}_k{k}"
                            hits[key] = hits.get(key, 0) + all(d in top for d in digits)
            print(f"retention: prompt {i + 1}/{len(samples)}", flush=True)
    finally:
        model.set_attn_implementation(before)
    return {"n": len(samples), "hits": hits}


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
    ap.add_argument("--first", type=int, default=0,
                    help="start at this needle sample (of the --n; splits a long run over processes)")
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
    ap.add_argument("--retention-n", type=int, default=0,
                    help="probe where the ranking finds the needle on this many prompts per length (`retention`)")
    ap.add_argument("--retention-layers", type=int, nargs="+", default=list(range(4, 17)))
    ap.add_argument("--retention-windows", type=int, nargs="+", default=[1, 4, 8, 16, 24, 32])
    ap.add_argument("--retention-pools", type=int, nargs="+", default=[1, 7, 15])
    ap.add_argument("--retention-keeps", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--speed-repeats", type=int, default=0,
                    help="also time each setting's prefill against the unpruned one, this many interleaved rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 on a shared machine)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {k: v[1] for k, v in SETTINGS.items()}
    model, tok = llm.load_smollm2()
    results: dict = {"settings": settings, "needle": {}, "perplexity": {}, "speed": {}}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))

    for n_tok in args.lengths if args.retention_n else []:
        samples = llm.needle_samples(tok, args.data_dir, n_tok, args.retention_n, seed=0)
        ret = retention(model, tok, samples, args.retention_layers, args.retention_windows, args.retention_pools,
                        args.retention_keeps)
        results.setdefault("retention", {})[n_tok] = ret
        save()
        for p in args.retention_pools:
            for k in args.retention_keeps:
                print(f"\n{n_tok} tokens, pool {p}, k={k}: prompts (of {ret['n']}) keeping every answer digit")
                print("| L | " + " | ".join(f"W={w}" for w in args.retention_windows) + " |")
                print("|---|" + "---|" * len(args.retention_windows))
                for L in args.retention_layers:
                    print(f"| {L} | " + " | ".join(str(ret["hits"][f"L{L}_W{w}_P{p}_k{k}"])
                                                   for w in args.retention_windows) + " |")
    reuse = json.loads(args.full_results.read_text()) if args.full_results else None
    for method in args.methods:
        dec = None if method == "full" else tokenreduce.reduce_decoder(model, SETTINGS[method][0], **settings[method])
        for n_tok in args.lengths if args.speed_repeats else []:
            if dec is None:  # the unpruned model is the baseline of every speed row
                continue
            sample = llm.needle_samples(tok, args.data_dir, n_tok, 1, seed=0)[0]
            sp = prefill_speed(model, dec, sample, args.speed_repeats)
            results["speed"].setdefault(method, {})[n_tok] = sp
            print(f"speed  {method:12s} {n_tok:5d} tokens: full {sp['full_ms']:.0f} ms, pruned {sp['pruned_ms']:.0f} ms,"
                  f" {sp['speedup']:.2f}x (paired {sp['paired_speedup']:.2f}x), load {sp['load_before'][0]:.1f} -> "
                  f"{sp['load_after'][0]:.1f}, {sp['threads']} thread(s)", flush=True)
            save()
        for n_tok in args.lengths if args.n else []:
            if dec is None and reuse is not None:
                prev = _reused(reuse, n_tok, args.n)
                if prev is not None:
                    results["needle"].setdefault(method, {})[n_tok] = prev
                    print(f"needle full {n_tok:5d} tokens: {prev['correct']}/{prev['n']} (reused)", flush=True)
                    continue
            samples = llm.needle_samples(tok, args.data_dir, n_tok, args.n, seed=0)[args.first:]
            t0 = time.perf_counter()
            fn = llm.hf_generate_fn(model) if dec is None else generate_fn(dec)
            done: list[dict] = []
            for i, sample in enumerate(samples):  # one at a time, saved after each (a stop keeps what ran)
                row = llm.needle_accuracy(fn, [sample], tok, max_new_tokens=args.max_new_tokens, progress=False)
                done.append(dict(row["results"][0], index=args.first + i))
                results["needle"].setdefault(method, {})[n_tok] = {"partial": done}
                save()
            correct = sum(bool(r["correct"]) for r in done)
            acc = {"accuracy": correct / max(len(done), 1), "n": len(done), "correct": correct, "results": done,
                   "first": args.first}
            acc["seconds"] = time.perf_counter() - t0
            if dec is not None and dec.report is not None:
                acc["tokens_per_block"] = dec.report.tokens_per_block
            acc["load_after"] = os.getloadavg()
            results["needle"].setdefault(method, {})[n_tok] = acc
            print(f"needle {method:12s} {n_tok:5d} tokens: {acc['correct']}/{acc['n']} = {acc['accuracy']:.2f} "
                  f"({acc['seconds']:.0f} s)", flush=True)
            save()
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
        save()
    full = results["needle"].get("full", {})
    print("\n| method | " + " | ".join(f"needle {n}" for n in args.lengths) + " | ppl |")
    print("|---|" + "---|" * (len(args.lengths) + 1))
    for method in args.methods:
        cells = []
        for n_tok in args.lengths:
            acc = results["needle"].get(method, {}).get(n_tok)
            if acc is None:
                cells.append("-")
                continue
            rel = f" ({acc['accuracy'] / full[n_tok]['accuracy']:.0%} of full)" if method != "full" and full.get(
                n_tok, {}).get("accuracy") else ""
            cells.append(f"{acc['correct']}/{acc['n']}{rel}")
        ppl_cell = f"{results['perplexity'][method]['perplexity']:.2f}" if method in results["perplexity"] else "-"
        opts = " ".join(f"{k}={v}" for k, v in settings.get(method, {}).items())
        print(f"| {method} {opts} | " + " | ".join(cells) + f" | {ppl_cell} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
