"""Prefill latency of visual-token reduction on a LLaVA-shaped model of realistic size (random init).

The model: `LlavaForConditionalGeneration` with a CLIP ViT-L/14-336 vision tower (24 layers, width 1024: 576
patch tokens) and a Qwen2-0.5B-shaped language model (24 layers, width 896, 14 heads / 2 KV heads, MLP 4864,
vocabulary 151936), SDPA attention, float32. The prompt: 16 text tokens, the 576 image tokens, 48 text tokens
(640 in all), batch 1. Random weights decide nothing here: every setting keeps a fixed number of tokens, so the
work done is the same whatever is kept (quality is measured elsewhere: docs/benchmarks.md).

For each target (eager, inductor) and setting, the whole prefill (vision tower, projector, language model, the
last-position logits and the KV cache) of the pruned model is timed against the same captured prefill without
pruning (`reduce_decoder(model, "none")`), interleaved A/B rounds after an untimed call, medians and the paired
per-round ratio (`tokenreduce.bench`), with the compiler's FLOPs ratio for the same prefill beside it. The
settings keep 25% (144) and 11% (64) of the image tokens:

* `visionzip`: before the LLM (dominant tokens by CLS attention plus merged contextual tokens): every LLM layer
  runs on the kept tokens;
* `divprune`: before the LLM (max-min diversity selection);
* `fastv`: inside the LLM after layer 2 (layers 0-1 see all 640 tokens);
* `flowcut`: before the LLM (cumulative CLS-relay score over vision layers 0-21), selected once at the
  projector's layer;
* `flowcut-progressive`: the same score, with patches dropped inside the tower after layers 1, 3, ..., 21
  (counts falling linearly to the kept count), so the tower's later layers run on fewer tokens.

The vision tower runs in full in every setting but `flowcut-progressive` (VisionZip reads its attention), so
their ratio is bounded by the tower's share of the prefill; the `llm_share` column gives that share (the
unpruned language model's FLOPs over the whole prefill's).

    .venv/bin/python benchmarks/vlm_prefill.py --targets eager inductor --repeats 3 --json docs/vlm_prefill.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

import tokenreduce
from tokenreduce.bench import interleaved, paired_ratio

IMAGE_TOKEN = 151646
N_IMAGE = 576
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "visionzip": ("visionzip", {}),
    "divprune": ("divprune", {}),
    "fastv": ("fastv", {"layers": [2]}),
    "flowcut": ("flowcut", {}),
    "flowcut-progressive": ("flowcut", {"progressive": True}),
}


def build(tiny: bool = False) -> torch.nn.Module:
    """The LLaVA-shaped model (random init, seed 0); `tiny`: the same structure at toy size (a smoke test)."""
    import transformers

    torch.manual_seed(0)
    if tiny:
        vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                           num_attention_heads=2, image_size=336, patch_size=14)
        tc = transformers.Qwen2Config(vocab_size=151936 // 64 * 64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    else:
        vc = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        tc = transformers.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                                      tie_word_embeddings=True)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN,
                                   vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg._attn_implementation = "sdpa"
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def prompt() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(100, 20000, (1, 16), generator=g), torch.full((1, N_IMAGE), IMAGE_TOKEN),
                     torch.randint(100, 20000, (1, 48), generator=g)], 1)
    return ids, torch.randn(1, 3, 336, 336, generator=g)


def llm_share(model: torch.nn.Module, ids: torch.Tensor, px: torch.Tensor) -> float | None:
    """The unpruned language model's FLOPs over the whole prefill's (vision tower + projector + LLM)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as whole:
        model(input_ids=ids, pixel_values=px, use_cache=False, logits_to_keep=1)
    embeds = torch.randn(1, ids.shape[1], model.config.text_config.hidden_size)
    with torch.no_grad(), FlopCounterMode(display=False) as lm:
        model.model.language_model(inputs_embeds=embeds, use_cache=False)
    total = whole.get_total_flops()
    return lm.get_total_flops() / total if total else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=["eager", "inductor"], choices=["eager", "inductor"])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--keep", type=float, nargs="+", default=[0.25, 64 / 576], help="fractions of the image tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="toy-size model of the same structure (smoke test)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here (after every row)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.tiny)
    ids, px = prompt()
    share = llm_share(model, ids, px)
    print(f"model: LLaVA-shaped ({'tiny' if args.tiny else 'CLIP-L/14-336 + Qwen2-0.5B dims'}), prompt "
          f"{ids.shape[1]} tokens ({N_IMAGE} image), threads {torch.get_num_threads()}; LLM share of the "
          f"unpruned prefill FLOPs: {share:.3f}" if share else "LLM share unavailable", flush=True)
    rows: list[dict[str, Any]] = []
    print("| target | setting | kept image tokens | full ms | pruned ms | speedup (medians) | paired | FLOPs ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for target in args.targets:
        base = tokenreduce.reduce_decoder(model, "none", inner=target)
        for name in args.settings:
            method, opts = SETTINGS[name]
            for keep in args.keep:
                dec = tokenreduce.reduce_decoder(model, method, inner=target, count_model_flops=True,
                                                 keep_ratio=keep, **opts)
                load_before = os.getloadavg()
                t = interleaved(lambda b=base: b.prefill(ids, None, None, pixel_values=px),
                                lambda d=dec: d.prefill(ids, None, None, pixel_values=px), repeats=args.repeats)
                report = dec.report
                assert report is not None
                kept = report.tokens_per_block[-1] - (ids.shape[1] - N_IMAGE)
                row = {"target": target, "setting": name, "keep_ratio": keep, "kept_image_tokens": kept,
                       "full_ms": t.median_unreduced_ms, "pruned_ms": t.median_reduced_ms,
                       "speedup": t.median_unreduced_ms / t.median_reduced_ms,
                       "paired_speedup": 1.0 / paired_ratio(t.samples_unreduced_ms, t.samples_reduced_ms),
                       "flops_ratio": report.flops_ratio, "tokens_per_block": report.tokens_per_block,
                       "full_samples_ms": t.samples_unreduced_ms, "pruned_samples_ms": t.samples_reduced_ms,
                       "repeats": args.repeats, "threads": torch.get_num_threads(), "load_before": load_before,
                       "load_after": os.getloadavg(), "llm_share": share, "tiny": args.tiny}
                rows.append(row)
                flops = f"{report.flops_ratio:.3f}" if report.flops_ratio is not None else "-"
                print(f"| {target} | {name} | {kept} | {row['full_ms']:.0f} | {row['pruned_ms']:.0f} | "
                      f"{row['speedup']:.2f}x | {row['paired_speedup']:.2f}x | {flops} |", flush=True)
                if args.json:
                    tmp = args.json.with_suffix(".tmp")
                    tmp.write_text(json.dumps(rows, indent=1))
                    tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
