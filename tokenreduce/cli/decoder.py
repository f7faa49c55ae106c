"""`tokenreduce inspect|bench|convert hf:PATH --method fastv ...` for decoder LLMs / VLMs.

The command modules hand over here (`route`) when MODEL is a local Hugging Face folder whose config names
a causal LM (`*ForCausalLM`) or a vision-language model (`*ForConditionalGeneration` with an image token
id). The prompt is `--prompt TEXT` (or `--prompt @FILE`, tokenized with the folder's tokenizer) or random
token ids of `--seq-len` tokens; the span a method may drop is `--span START:END` (token indices, Python
slice rules, negatives count from the end), by default everything but the first and last 16 tokens for a
text model and the image tokens for a VLM. What ran is always printed (span, stages, tokens per block).

    tokenreduce inspect hf:./smollm2 --prompt @doc.txt --span 40:-30
    tokenreduce bench hf:./smollm2 --method gemfilter --layers 5 --keep-tokens 256 --seq-len 2048
    tokenreduce convert hf:./smollm2 --method fastv -o prefill.onnx

Refuses: a decoder method on any other model, an encoder method on a decoder, the onnxruntime/TensorRT
bench targets (the pruned prefill runs eager or inductor; ONNX export is `convert`), `--to tensorrt`,
spans outside the prompt.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenreduce.cli.methods import DECODER_METHODS, settings_from_args
from tokenreduce.cli.ui import EXIT_OK, UI
from tokenreduce.errors import TokenReduceError

if TYPE_CHECKING:
    import torch

DEFAULT_SEQ_LEN = 512
DEFAULT_MARGIN = 16  # text models: tokens kept outside the default span at each end


def decoder_folder(spec: str) -> Path | None:
    """The folder of an `hf:` MODEL that is a decoder LLM or a VLM, else None."""
    if not spec.startswith("hf:"):
        return None
    path = Path(spec[3:]).expanduser()
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    archs = cfg.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return path
    if "text_config" in cfg and ("image_token_id" in cfg or "image_token_index" in cfg):
        return path
    return None


def route(args: argparse.Namespace) -> Path | None:
    """The folder when MODEL is a decoder LLM / VLM (handled here); a decoder method on any other model is
    an error that says so."""
    folder = decoder_folder(args.model)
    if folder is None and args.method in DECODER_METHODS:
        raise TokenReduceError(f"--method {args.method} prunes the prefill of a decoder LLM/VLM; {args.model} is not "
                               "an hf: folder of a *ForCausalLM or vision-language model")
    return folder


def require_decoder_method(args: argparse.Namespace) -> None:
    if args.method not in DECODER_METHODS:
        raise TokenReduceError(f"{args.model} is a decoder: choose --method {' | '.join(DECODER_METHODS)}")


@dataclass
class DecoderPrompt:
    model: torch.nn.Module
    input_ids: torch.Tensor  # [B, L]
    span: tuple[int, int] | None
    extra: dict[str, torch.Tensor]
    description: str
    notes: list[str] = field(default_factory=list)

    @property
    def span_text(self) -> str:
        if self.span is None:
            return "image tokens (from the model's image token id)"
        return f"tokens {self.span[0]}..{self.span[1] - 1}"


def parse_span(text: str | None, n: int, vlm: bool) -> tuple[int, int] | None:
    if text is None:
        if vlm:
            return None
        if n <= 2 * DEFAULT_MARGIN:
            raise TokenReduceError(f"the prompt has {n} tokens; the default span leaves {DEFAULT_MARGIN} at each "
                                   "end, so give --span START:END or a longer prompt")
        return DEFAULT_MARGIN, n - DEFAULT_MARGIN
    try:
        a, b = text.split(":")
        start = int(a) if a else 0
        end = int(b) if b else n
    except ValueError as exc:
        raise TokenReduceError(f"--span takes START:END token indices (e.g. 16:-32), got {text!r}") from exc
    start, end = (start + n if start < 0 else start), (end + n if end < 0 else end)
    if not 0 <= start < end <= n:
        raise TokenReduceError(f"--span {text} selects nothing inside the {n}-token prompt")
    return start, end


def load(args: argparse.Namespace, folder: Path, batch: int = 1) -> DecoderPrompt:
    """The model (weights if the folder has them, else seeded random init) and a prompt batch."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    arch = (getattr(cfg, "architectures", None) or [""])[0]
    cls = getattr(transformers, arch, None)
    vlm = hasattr(cfg, "text_config") and hasattr(cfg, "vision_config")
    if cls is None:
        cls = transformers.AutoModelForImageTextToText if vlm else transformers.AutoModelForCausalLM
    torch.manual_seed(args.seed)
    weights = any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"))
    # SDPA where the model class has it; Gemma 2 does not (its attention soft-capping runs in eager attention)
    attn = "sdpa" if getattr(cls, "_supports_sdpa", True) else "eager"
    try:
        if weights:
            model = cls.from_pretrained(str(folder), local_files_only=True, attn_implementation=attn)
        else:
            cfg._attn_implementation = attn
            model = cls._from_config(cfg) if hasattr(cls, "_from_config") else cls.from_config(cfg)
    except Exception as exc:  # noqa: BLE001
        raise TokenReduceError(f"transformers could not load {folder}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    text_cfg = cfg.get_text_config()
    if args.prompt is not None:
        text = Path(args.prompt[1:]).read_text() if args.prompt.startswith("@") else args.prompt
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise TokenReduceError(f"{folder} has no usable tokenizer for --prompt ({str(exc).splitlines()[0]}); "
                                   "use --seq-len for random token ids") from exc
        ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)[None]
        source = f"--prompt ({ids.shape[1]} tokens)"
    else:
        n = args.seq_len or DEFAULT_SEQ_LEN
        g = torch.Generator().manual_seed(args.seed + 1)
        ids = torch.randint(min(100, text_cfg.vocab_size - 1), text_cfg.vocab_size, (1, n), generator=g)
        source = f"random token ids ({n} tokens; --prompt for text)"
    extra: dict[str, torch.Tensor] = {}
    if vlm:
        image_id = getattr(cfg, "image_token_id", None)
        image_id = getattr(cfg, "image_token_index", None) if image_id is None else image_id
        if image_id is None:
            raise TokenReduceError(f"{folder}/config.json has no image_token_id: cannot place the image tokens")
        vc = cfg.vision_config
        n_img = (vc.image_size // vc.patch_size) ** 2 + (1 if getattr(cfg, "vision_feature_select_strategy", "default") == "full" else 0)
        ids = torch.cat([ids[:, :1], torch.full((1, n_img), int(image_id)), ids[:, 1:]], dim=1)
        g = torch.Generator().manual_seed(args.seed + 2)
        extra["pixel_values"] = torch.randn(batch, vc.num_channels, vc.image_size, vc.image_size, generator=g)
        source += f" + {n_img} image tokens (random pixels)"
    ids = ids.expand(batch, -1).contiguous()
    span = parse_span(args.span, ids.shape[1], vlm)
    desc = f"{folder.name} ({type(model).__name__}, {'weights' if weights else 'random init'}), {source}"
    return DecoderPrompt(model, ids, span, extra, desc)


def summary(dec: Any) -> dict[str, Any]:
    rep = dec.report
    return {"method": rep.method, "settings": rep.settings, "prompt_tokens": rep.num_tokens, "span_tokens": rep.span_tokens,
            "stages": [vars(s) for s in rep.stages], "tokens_per_block": rep.tokens_per_block,
            "flops_before": rep.flops_before, "flops_after": rep.flops_after, "flops_ratio": rep.flops_ratio,
            "not_pruned": [{"block": n, "reason": r} for n, r in rep.skipped]}


def blocks_text(tokens: list[int]) -> str:
    """Run-length text of tokens per block: `0-1: 2048, 2-29: 1100`."""
    parts, start = [], 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or tokens[i] != tokens[start]:
            parts.append(f"{start}-{i - 1}: {tokens[start]}" if i - 1 > start else f"{start}: {tokens[start]}")
            start = i
    return ", ".join(parts)


# ============================================================================================ bench
def prefill_call(dec: Any, ids: torch.Tensor, span: tuple[int, int] | None, extra: dict[str, torch.Tensor]
                 ) -> Callable[[], Any]:
    return lambda: dec.prefill(ids, None, span, **extra)


def bench(args: argparse.Namespace, ui: UI, folder: Path) -> int:
    import torch

    import tokenreduce
    from tokenreduce.bench import interleaved, iqr

    bad = [t for t in args.target if t not in ("eager", "inductor")]
    if bad:
        raise TokenReduceError(f"decoder prefill benchmarks run on eager or inductor, not {', '.join(bad)} "
                               "(export the pruned prefill with `tokenreduce convert` for ONNX)")
    require_decoder_method(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    batches = args.batch if isinstance(args.batch, list) else [args.batch or 1]
    total = 1 + len(args.target) * len(batches) * (2 + args.warmup + args.repeats)
    with ui.steps(total, "loading model") as steps:
        with steps.stage(f"loading {args.model}"):
            p = load(args, folder, 1)
        for target in args.target:
            for b in batches:
                ids = p.input_ids.expand(b, -1).contiguous()
                extra = {k: v.expand(b, *v.shape[1:]).contiguous() for k, v in p.extra.items()}
                with steps.stage(f"{target}, batch {b}: preparing the unpruned prefill"):
                    base = tokenreduce.reduce_decoder(p.model, "none", inner=target, count_model_flops=True)
                    base.prefill(ids, None, p.span, **extra)
                with steps.stage(f"{target}, batch {b}: preparing {args.method}"):
                    dec = tokenreduce.reduce_decoder(p.model, args.method, inner=target, count_model_flops=True,
                                                     **settings_from_args(args))
                    dec.prefill(ids, None, p.span, **extra)
                steps.describe(f"{target}, batch {b}: timing {args.repeats} interleaved rounds")
                t = interleaved(prefill_call(base, ids, p.span, extra), prefill_call(dec, ids, p.span, extra),
                                args.repeats, args.warmup, on_round=steps.advance)
                assert dec.report is not None and base.report is not None
                assert dec.report.flops_after is not None and base.report.flops_after  # count_model_flops=True
                fr = dec.report.flops_after / base.report.flops_after
                speed = t.median_unreduced_ms / t.median_reduced_ms
                rows.append({"target": target, "batch": b, "full_ms": t.median_unreduced_ms,
                             "pruned_ms": t.median_reduced_ms, "speedup": speed, "flops_ratio": fr,
                             "efficiency": speed * fr, "samples_full_ms": t.samples_unreduced_ms,
                             "samples_pruned_ms": t.samples_reduced_ms, **summary(dec)})
    if ui.json_mode:
        ui.emit_json({"command": "bench", "model": p.description, "decoder": True, "span": p.span_text,
                      "repeats": args.repeats, "warmup": args.warmup, "rows": rows})
        return EXIT_OK
    from rich.table import Table

    ui.print(f"model: {p.description}; span: {p.span_text}")
    opts = " ".join(f"{k}={v}" for k, v in rows[0]["settings"].items()) if rows else ""
    table = Table(title=f"prefill: {args.method} {opts} vs unpruned")
    for col in ("target", "batch", "tokens per block", "full ms", "pruned ms", "speedup", "FLOPs ratio", "efficiency"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["target"], str(r["batch"]), blocks_text(r["tokens_per_block"]), f"{r['full_ms']:.0f}",
                      f"{r['pruned_ms']:.0f}", f"{r['speedup']:.2f}x", f"{r['flops_ratio']:.3f}", f"{r['efficiency']:.2f}")
    ui.print(table)
    noise = ", ".join(f"{r['target']} b{r['batch']}: {iqr(r['samples_full_ms']):.0f} / {iqr(r['samples_pruned_ms']):.0f}"
                      for r in rows)
    ui.print(f"medians of {args.repeats} interleaved rounds; IQR ms (full / pruned) {noise}; speedup = full / pruned, "
             "efficiency = speedup / FLOPs speedup")
    return EXIT_OK


# ============================================================================================ convert
def convert(args: argparse.Namespace, ui: UI, folder: Path) -> int:
    """Export the pruned prefill to ONNX, verified in onnxruntime; `export_onnx` writes the file atomically
    (nothing at the output until the checks pass; nothing left on an interrupt)."""
    import tokenreduce

    if args.to != "onnx":
        raise TokenReduceError("decoder prefills convert to ONNX only (--to onnx); a TensorRT engine for the pruned "
                               "prefill is not built by tokenreduce yet")
    require_decoder_method(args)
    with ui.steps(3, "loading model") as steps:
        with steps.stage(f"loading {args.model}"):
            p = load(args, folder, args.batch or 1)
        with steps.stage(f"capturing and pruning the prefill ({args.method})"):
            dec = tokenreduce.reduce_decoder(p.model, args.method, **settings_from_args(args))
            dec.compiled_for(p.input_ids, None, p.span, **p.extra)
        with steps.stage("exporting to ONNX and verifying in onnxruntime"):
            written = dec.export_onnx(args.output, p.input_ids, p.span, verify=not args.no_verify, atol=args.atol,
                                      **p.extra)
    payload = {"command": "convert", "model": p.description, "decoder": True, "output": str(written.path),
               "inputs": written.input_names, "outputs": written.output_names, "verified": written.verified,
               "max_abs_diff": written.max_abs_diff, **summary(dec)}
    if ui.json_mode:
        ui.emit_json(payload)
        return EXIT_OK
    ui.print(f"wrote {written.path}: pruned prefill of {p.description}")
    ui.print(f"  inputs {', '.join(written.input_names)}; outputs: last-position logits, per-layer keys and values, "
             "kept positions")
    ui.print(f"  tokens per block: {blocks_text(payload['tokens_per_block'])}")
    if written.verified:
        ui.print(f"  verified in onnxruntime: max |diff| {written.max_abs_diff:.2e} (tolerance {args.atol:g})")
    return EXIT_OK
