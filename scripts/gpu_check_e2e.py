"""Sections "vit" and "decoder" of scripts/gpu_check.py: whole models on the device, kernels on and off.

vit: timm ViT-B/16 and ViT-L/16 (random init, no download; fp16 on the GPU) reduced with ToMe r=8/13/16 and
EViT keep 0.7 (its default layers, depth x 1/4, 2/4, 3/4), eager and inductor, batch 1/32/256. Each
reduced model is timed against the unreduced one on the same target (`tokenreduce.bench.interleaved`:
untimed first call and warm-up rounds, then A, B, A, B ... with every call followed by a CUDA
synchronisation; medians) with the fused kernels on (the default) and off (`use_reference_kernels()`:
the ops run their references and the score-attention fusion pass does not fire; EViT is compiled again
for that, ToMe's graph is the same and only the ops' dispatch changes). `tokenreduce.bench.make_row` gives
latency ratio, speedup, FLOPs ratio (`report.flops_ratio`) and efficiency = speedup / (1 / FLOPs ratio).

decoder: FastV and GemFilter (their defaults) on a random-init transformers `LlamaForCausalLM` of 1B-class
dimensions (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192), fp16, 4k and 16k prompt
tokens, eager, prefill timed against `reduce_decoder(model, "none")` (the same captured prefill without
pruning); kernels on, then off.

A full matrix does not fit the 8-minute run (each inductor compile of a ViT takes tens of seconds, batch 1
recompiles), so jobs run in priority order (ToMe r=13 and EViT first; eager before inductor; ViT-B before
ViT-L) and whatever the section's time budget leaves undone is listed under `skipped` with the
reason; `--vit-models`, `--vit-settings`, `--inners` on the command line pick a subset for another run.
The dry run uses tiny seeded configs on the CPU in fp32: one ViT with ToMe r=13 and EViT, eager only (an
inductor compile takes about a minute on a CPU core; the GPU run covers it), batch 1 and 2; a 4-layer Llama
at 64 tokens.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from gpu_check_common import Section, synced

VIT_SETTINGS: dict[str, dict[str, Any]] = {
    "tome_r13": {"method": "tome", "r": 13},
    "evit_0.7": {"method": "evit", "keep_ratio": 0.7},
    "tome_r8": {"method": "tome", "r": 8},
    "tome_r16": {"method": "tome", "r": 16},
}
GPU_VIT = {"vit_b16": "vit_base_patch16_224", "vit_l16": "vit_large_patch16_224"}
DRY_VIT: dict[str, dict[str, Any]] = {"tiny": {"embed_dim": 32, "depth": 3, "num_heads": 2}}
DRY_SETTINGS = ("tome_r13", "evit_0.7")  # one ToMe (a graph shared by fused on/off) and EViT (compiled twice)
GPU_BATCHES, DRY_BATCHES = (1, 32, 256), (1, 2)
INNERS = ("eager", "inductor")
# rough costs (s) a job must fit in before it starts; replaced by what the run measures
FIRST_GUESS = {"eager": 30.0, "inductor": 120.0, "decoder": 30.0}

LLAMA_1B: dict[str, Any] = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 8192,
                            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8}
LLAMA_TINY: dict[str, Any] = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2}
GPU_TOKENS, DRY_TOKENS = (4096, 16384), (64,)
DECODER_METHODS = ("fastv", "gemfilter")


def fusion_rewrites(passes: list[str]) -> int | None:
    """Rewrites of the score-attention fusion pass, read from a report's pass lines."""
    for line in passes:
        m = re.match(r"fuse_attention_scores: (\d+) rewrites", line)
        if m:
            return int(m.group(1))
    return None


def kernels(fused: bool) -> AbstractContextManager[None]:
    """The kernel backend of a fused-on / fused-off run, whatever $TOKENREDUCE_KERNELS says."""
    from tokenreduce.kernels import use_kernel_backend

    return use_kernel_backend("triton" if fused else "reference")


def timing_plan(dev: str, batch: int) -> tuple[int, int]:
    """(repeats, warmup rounds)."""
    if dev == "cpu":
        return 4, 0  # 4: the interquartile range needs 4 samples
    return (10, 2) if batch >= 256 else (20, 3)


def max_abs_diff(a: Any, b: Any) -> float:
    a, b = (t.logits if hasattr(t, "logits") else t for t in (a, b))
    return float((a.double() - b.double()).abs().max())


class Estimates:
    """Seconds the last job of a kind took (for the budget check before the next)."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}

    def get(self, kind: str) -> float:
        return self.seen.get(kind, FIRST_GUESS[kind])

    @contextmanager
    def measure(self, kind: str) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        self.seen[kind] = time.monotonic() - t0


# ------------------------------------------------------------------------------------------------ vit
def vit_jobs(models: list[str], settings: list[str], inners: list[str]) -> list[tuple[str, str, str]]:
    """(model, inner, setting) in priority order: the first two settings before the rest; within each
    group eager before inductor (an inductor job compiles for minutes: baseline, reduced, batch-1
    recompiles), then models, then settings in order."""
    first, rest = settings[:2], settings[2:]
    return [(m, inner, s) for group in (first, rest) for inner in inners for m in models for s in group]


def build_vit(key: str, dev: str, dtype: torch.dtype) -> tuple[torch.nn.Module, tuple[int, int]]:
    import timm

    torch.manual_seed(0)
    model: torch.nn.Module
    if dev == "cpu":
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(img_size=64, patch_size=8, num_classes=10, **DRY_VIT[key])
        size = (64, 64)
    else:
        model = timm.create_model(GPU_VIT[key], pretrained=False)
        size = (224, 224)
    return model.eval().to(dev, dtype), size


def run_vit(sec: Section, dry_run: bool, models: list[str] | None, settings: list[str] | None,
            inners: list[str] | None) -> bool:
    import tokenreduce
    from tokenreduce.bench import interleaved, make_row

    dev = "cpu" if dry_run else "cuda"
    dtype = torch.float32 if dry_run else torch.float16
    models = models or list(DRY_VIT if dry_run else GPU_VIT)
    settings = settings or list(DRY_SETTINGS if dry_run else VIT_SETTINGS)
    inners = inners or (["eager"] if dry_run else list(INNERS))
    batches = DRY_BATCHES if dry_run else GPU_BATCHES
    sec.data["plan"].update(models=models, settings={s: VIT_SETTINGS[s] for s in settings}, inners=inners,
                            batches=list(batches), dtype=str(dtype), device=dev,
                            fused="on: Triton kernels + fusion pass; off: use_reference_kernels()")
    est = Estimates()
    built: dict[str, tuple[torch.nn.Module, tuple[int, int]]] = {}
    baselines: dict[tuple[str, str], Callable[..., Any]] = {}
    failed = False
    for model_key, inner, setting in vit_jobs(models, settings, inners):
        job = f"{model_key} {inner} {setting}"
        if not sec.afford(job, est.get(inner)):
            continue
        with sec.guard(job), est.measure(inner):
            if model_key not in built:  # both models stay (a few GiB): rebuilding would recompile baselines
                built[model_key] = build_vit(model_key, dev, dtype)
            model, size = built[model_key]
            if (model_key, inner) not in baselines:
                baselines[(model_key, inner)] = model if inner == "eager" else torch.compile(model, dynamic=True)
            base = baselines[(model_key, inner)]
            example = torch.randn(2, 3, *size, device=dev, dtype=dtype)
            opts = {**VIT_SETTINGS[setting], "inner": inner}
            sec.progress(f"compile {job}")
            with torch.no_grad(), kernels(True):
                fused_on = tokenreduce.compile(model, (example,), **opts)
                if opts["method"] == "tome":  # no fusion in the graph: the same module, other op dispatch
                    fused_off = fused_on
                else:
                    with kernels(False):
                        fused_off = tokenreduce.compile(model, (example,), **opts)
            if dev == "cuda" and opts["method"] == "evit" and not fusion_rewrites(fused_on.report.passes):
                sec.note(f"{job}: the fusion pass did not fire on the GPU graph: "
                         f"{getattr(fused_on.report, 'notes', None) or fused_on.report.passes}")
            for batch in batches:
                x = torch.randn(batch, 3, *size, device=dev, dtype=dtype)
                outputs = {}
                for fused, red in ((True, fused_on), (False, fused_off)):
                    reps, warm = timing_plan(dev, batch)
                    with kernels(fused):
                        t = interleaved(synced(lambda: base(x), dev), synced(lambda: red(x), dev),  # noqa: B023
                                        repeats=reps, warmup=warm)
                        with torch.inference_mode():
                            outputs[fused] = red(x)
                    row = dataclasses.asdict(make_row(setting, batch, inner, t, red.report))
                    rewrites = fusion_rewrites(red.report.passes)
                    finite = bool(torch.isfinite(outputs[fused]).all())
                    row.update(model=model_key, fused="on" if fused else "off", dtype=str(dtype),
                               fusion_rewrites=rewrites, output_finite=finite,
                               reduced_blocks=len(red.report.reduced_blocks))
                    if not fused:
                        row["max_abs_diff_vs_fused_on"] = max_abs_diff(outputs[True], outputs[False])
                    problems = []
                    if not finite:
                        problems.append("non-finite output")
                    if not fused and rewrites:
                        problems.append(f"fusion pass fired {rewrites}x with the reference kernels chosen")
                    row["problems"] = problems
                    failed |= bool(problems)
                    sec.progress(f"{job} batch {batch} fused {row['fused']}: {row['latency_unreduced_ms']:.2f} -> "
                                 f"{row['latency_reduced_ms']:.2f} ms ({row['speedup']:.2f}x, FLOPs x"
                                 f"{row['flops_ratio']:.3f}, efficiency {row['efficiency']:.2f})")
                    sec.add(row)
            del fused_on, fused_off
            if dev == "cuda":
                torch.cuda.empty_cache()
    return failed


# ------------------------------------------------------------------------------------------------ decoder
def build_llama(dev: str, dtype: torch.dtype, max_tokens: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    dims = LLAMA_TINY if dev == "cpu" else LLAMA_1B
    cfg = transformers.LlamaConfig(**dims, max_position_embeddings=max_tokens + 64)
    cfg._attn_implementation = "sdpa"
    with torch.device(dev):  # initialise on the device: a 1B model's random init on the CPU takes long
        model = transformers.LlamaForCausalLM(cfg)
    return model.eval().to(dtype)


def run_decoder(sec: Section, dry_run: bool) -> bool:
    import tokenreduce
    from tokenreduce.bench import interleaved

    dev = "cpu" if dry_run else "cuda"
    dtype = torch.float32 if dry_run else torch.float16
    lengths = DRY_TOKENS if dry_run else GPU_TOKENS
    dims = LLAMA_TINY if dry_run else LLAMA_1B
    sec.data["plan"].update(model={"LlamaForCausalLM": dims}, tokens=list(lengths), methods=list(DECODER_METHODS),
                            baseline='reduce_decoder(model, "none")', inner="eager", dtype=str(dtype), device=dev,
                            span="tokens n/16 .. n - n/16 (the rest stays)", settings="each method's defaults")
    model = build_llama(dev, dtype, max(lengths))
    base = tokenreduce.reduce_decoder(model, "none", count_model_flops=True)
    decoders = {(m, fused): tokenreduce.reduce_decoder(model, m, count_model_flops=True)
                for m in DECODER_METHODS for fused in (True, False)}
    est = Estimates()
    logits: dict[tuple[str, int], torch.Tensor] = {}
    failed = False
    jobs = [(n, m, fused) for fused in (True, False) for n in lengths for m in DECODER_METHODS]
    for n, method, fused in jobs:
        job = f"{method} {n} tokens kernels {'on' if fused else 'off'}"
        if not sec.afford(job, est.get("decoder") * (n / lengths[0]) ** 0.5):
            continue
        with sec.guard(job), est.measure("decoder"):
            g = torch.Generator().manual_seed(n)
            ids = torch.randint(0, dims["vocab_size"], (1, n), generator=g).to(dev)
            span = (n // 16, n - n // 16)
            dec = decoders[(method, fused)]
            sec.progress(f"compile + run {job}")
            with kernels(fused):
                full = synced(lambda: base.prefill(ids, None, span), dev)  # noqa: B023
                pruned = synced(lambda: dec.prefill(ids, None, span), dev)  # noqa: B023
                reps, warm = (4, 0) if dry_run else (5, 1)
                t = interleaved(full, pruned, repeats=reps, warmup=warm)
                out = dec.prefill(ids, None, span).logits
            rep, brep = dec.report, base.report
            assert rep is not None and brep is not None and rep.flops_after and brep.flops_after
            speedup = t.median_unreduced_ms / t.median_reduced_ms
            flops_ratio = rep.flops_after / brep.flops_after
            row: dict[str, Any] = {
                "method": method, "tokens": n, "span_tokens": rep.span_tokens, "fused": "on" if fused else "off",
                "dtype": str(dtype), "settings": rep.settings, "latency_unreduced_ms": t.median_unreduced_ms,
                "latency_reduced_ms": t.median_reduced_ms, "latency_ratio": 1 / speedup, "speedup": speedup,
                "flops_ratio": flops_ratio, "flops_ratio_vs_model_forward": rep.flops_ratio,
                "efficiency": speedup * flops_ratio, "repeats": reps,
                "samples_unreduced_ms": t.samples_unreduced_ms, "samples_reduced_ms": t.samples_reduced_ms,
                "tokens_per_block": rep.tokens_per_block, "fusion_rewrites": fusion_rewrites(rep.passes),
                "passes": rep.passes, "output_finite": bool(torch.isfinite(out).all()),
            }
            if fused:
                logits[(method, n)] = out
            elif (method, n) in logits:
                row["max_abs_diff_vs_fused_on"] = max_abs_diff(logits[(method, n)], out)
            row["problems"] = ([] if row["output_finite"] else ["non-finite logits"]) + (
                [f"fusion pass fired {row['fusion_rewrites']}x with the reference kernels chosen"]
                if not fused and row["fusion_rewrites"] else [])
            failed |= bool(row["problems"])
            sec.progress(f"{job}: {row['latency_unreduced_ms']:.1f} -> {row['latency_reduced_ms']:.1f} ms "
                         f"({speedup:.2f}x, FLOPs x{flops_ratio:.3f}, efficiency {row['efficiency']:.2f})")
            sec.add(row)
    return failed
