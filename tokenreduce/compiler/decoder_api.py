"""`tokenreduce.reduce_decoder`: prefill token pruning for Hugging Face decoder LLMs and VLMs.

    dec = tokenreduce.reduce_decoder(model, method="gemfilter", layers=[6], keep_tokens=256)
    out = dec.generate(input_ids, attention_mask=mask, span=span, max_new_tokens=16)
    print(dec.report)

The prefill is captured with `torch.export` (`use_cache=False`, last-position logits only), rewritten by
`prune_decoder_tokens` and `emit_kv_cache`, shape-fixed, and run eagerly or through inductor. The graph
is specialised to the input shapes and the span size (the keep counts are constants), and cached per
shape. Decoding then continues in the user's own model through transformers' `generate()`, with a
`ReducedCache` holding only the kept tokens (see `runtime/kv_cache.py`).

The span -- the tokens a method may drop -- is, in order of precedence: the `span` argument (a `[B, N]`
bool mask or a `(start, end)` range applied to every row), or, for a VLM, the positions of the model's
image token id. Tokens outside the span (system prompt, the question at the end, padding) are always
kept, and so is the last prompt token (the query that ranks the span and whose logits are returned): a span
that covers it is clipped and the report says so. Every row must have the same number of span tokens (the
keep counts are static); rows that differ are refused with the counts, never silently trimmed.

Refuses (TokenReduceError): models without causal self-attention, a text model without a span, spans of
unequal size, keep counts or layers out of range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from tokenreduce import targets
from tokenreduce.compiler.capture import export_graph
from tokenreduce.compiler.pipeline import reduce_prefill
from tokenreduce.compiler.report import Report, count_flops
from tokenreduce.errors import TokenReduceError
from tokenreduce.methods import registry
from tokenreduce.methods.settings import Settings
from tokenreduce.targets import TargetOptions

CLIPPED_NOTE = ("the span covered the last prompt token (the query that ranks the span and whose logits are "
                "returned); it was taken out of the span and kept")


class _Prefill(torch.nn.Module):
    """What is captured: one prefill call returning the last position's logits, without a cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if pixel_values is None else {"pixel_values": pixel_values}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, logits_to_keep=1, **extra)
        return out.logits


@dataclass
class Prefill:
    """Result of a pruned prefill: the last position's logits and the cache holding the kept tokens."""

    logits: torch.Tensor  # [B, V]
    cache: Any  # runtime.kv_cache.ReducedCache
    kept: list[torch.Tensor]  # per block [B, M_l] original positions


@dataclass
class _Compiled:
    gm: fx.GraphModule
    runner: Any
    report: Report
    names: list[str]


class ReducedDecoder:
    """A decoder LLM/VLM whose prefill is pruned (see the module docstring). The model is not modified."""

    def __init__(self, model: torch.nn.Module, settings: Settings, count_model_flops: bool = False) -> None:
        self.model = model
        self.settings = settings
        self.count_model_flops = count_model_flops
        self._cache: dict[tuple, _Compiled] = {}
        self.report: Report | None = None
        self.clipped = False  # a span covered the last prompt token and was clipped

    # ------------------------------------------------------------------------------------------- inputs
    def _image_token_id(self) -> int | None:
        cfg = getattr(self.model, "config", None)
        for name in ("image_token_id", "image_token_index"):
            v = getattr(cfg, name, None)
            if isinstance(v, int):
                return v
        return None

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                span: torch.Tensor | tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Attention mask, position ids (left padding aware, as `generate` computes them) and the span."""
        if input_ids.dim() != 2:
            raise TokenReduceError(f"input_ids must be [B, N], got shape {tuple(input_ids.shape)}")
        bsz, n = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise TokenReduceError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        if span is None and self.settings.method == "none":
            return attention_mask, position_ids, torch.zeros_like(attention_mask, dtype=torch.bool), 0
        if span is None:
            image_id = self._image_token_id()
            if image_id is None:
                raise TokenReduceError(
                    "no span given: pass span=(start, end) or a [B, N] bool mask marking the context tokens the "
                    "method may drop (the system prompt and the final question should stay outside it); only "
                    "vision-language models find their span (image tokens) on their own")
            span_mask = input_ids == image_id
        elif isinstance(span, tuple):
            start, end = span
            if not 0 <= start < end <= n:
                raise TokenReduceError(f"span {span} is outside the prompt (0..{n})")
            span_mask = torch.zeros(bsz, n, dtype=torch.bool, device=input_ids.device)
            span_mask[:, start:end] = True
        else:
            span_mask = span.to(torch.bool)
            if span_mask.shape != input_ids.shape:
                raise TokenReduceError(f"span mask {tuple(span_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        span_mask = span_mask & attention_mask.bool()
        # The last real token is the query every method ranks with and whose logits are returned: it is never
        # droppable. A span that covers it is clipped, and the report says so (`CLIPPED_NOTE`).
        rows = torch.arange(bsz, device=input_ids.device)
        last = n - 1 - attention_mask.long().flip(-1).argmax(-1)
        if bool(span_mask[rows, last].any()):
            span_mask = span_mask.clone()
            span_mask[rows, last] = False
            self.clipped = True
        counts = span_mask.sum(-1).tolist()
        if len(set(counts)) != 1:
            raise TokenReduceError(
                f"every row needs the same number of span tokens (the keep counts are static); got {counts}. "
                "Pad or trim the contexts to equal length, or reduce rows one at a time")
        if counts[0] == 0 and self.settings.method != "none":
            raise TokenReduceError("the span is empty: nothing to prune")
        return attention_mask, position_ids, span_mask, int(counts[0])

    # ------------------------------------------------------------------------------------------ compile
    def _compile(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 span: torch.Tensor, span_size: int, extra: dict[str, torch.Tensor]) -> _Compiled:
        key = (tuple(input_ids.shape), span_size, tuple((k, tuple(v.shape)) for k, v in sorted(extra.items())),
               input_ids.device.type)
        if key in self._cache:
            self.report = self._cache[key].report
            return self._cache[key]
        wrapper = _Prefill(self.model)
        captured = export_graph(wrapper, (input_ids, attention_mask, position_ids), extra, dynamic_batch=False)
        red = reduce_prefill(captured.gm, self.settings, span_size)
        gm, report = red.gm, red.report
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        flat = self._flat(names, input_ids, attention_mask, position_ids, span, extra)
        runner = targets.get(self.settings.inner).lower(gm, tuple(flat), {}, TargetOptions(dynamic_batch=False)).runner
        compiled = _Compiled(gm, runner, report, names)
        if self.count_model_flops:
            report.flops_before = count_flops(wrapper, (input_ids, attention_mask, position_ids), extra)
            report.flops_after = count_flops(gm, tuple(flat), {})
        self._cache[key] = compiled
        self.report = report
        return compiled

    @staticmethod
    def _flat(names: list[str], input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
              span: torch.Tensor, extra: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        by_name = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                   "span": span, **extra}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise TokenReduceError(f"the captured prefill expects inputs {missing} that were not given")
        return [by_name[n] for n in names]

    def compiled_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     span: torch.Tensor | tuple[int, int] | None = None, **extra: torch.Tensor
                     ) -> tuple[_Compiled, list[torch.Tensor]]:
        """The rewritten prefill graph for these inputs and its flat positional inputs (ONNX export)."""
        mask, pos, span_mask, span_size = self.prepare(input_ids, attention_mask, span)
        c = self._compile(input_ids, mask, pos, span_mask, span_size, extra)
        if self.clipped and CLIPPED_NOTE not in c.report.notes:
            c.report.notes.append(CLIPPED_NOTE)
        return c, self._flat(c.names, input_ids, mask, pos, span_mask, extra)

    # --------------------------------------------------------------------------------------------- run
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                span: torch.Tensor | tuple[int, int] | None = None, **extra: torch.Tensor) -> Prefill:
        """Run the pruned prefill: last-position logits and a cache holding only the kept tokens."""
        from tokenreduce.runtime.kv_cache import ReducedCache

        c, flat = self.compiled_for(input_ids, attention_mask, span, **extra)
        logits, ks, vs, kept = c.runner(*flat)
        bsz, n = input_ids.shape
        full = torch.arange(n, device=input_ids.device).expand(bsz, n)
        positions = [p if p is not None else full for p in kept]
        cache = ReducedCache(ks, vs, positions, n)
        return Prefill(logits=logits[:, -1], cache=cache, kept=positions)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 span: torch.Tensor | tuple[int, int] | None = None, max_new_tokens: int = 20,
                 **generate_kwargs: Any) -> torch.Tensor:
        """Greedy generation after a pruned prefill; returns the prompt followed by the new tokens, like
        `model.generate`. Decoding runs in transformers' `generate()` with the pruned cache."""
        if generate_kwargs.get("do_sample") or generate_kwargs.get("num_beams", 1) != 1:
            raise TokenReduceError("reduce_decoder.generate decodes greedily (do_sample=False, num_beams=1)")
        extra = {k: generate_kwargs.pop(k) for k in list(generate_kwargs) if k in ("pixel_values", "image_sizes")}
        pre = self.prefill(input_ids, attention_mask, span, **extra)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        first = pre.logits.argmax(-1, keepdim=True)
        ids = torch.cat([input_ids, first], dim=-1)
        if max_new_tokens <= 1:
            return ids
        mask = torch.cat([mask, torch.ones_like(first)], dim=-1)
        from tokenreduce.runtime.kv_cache import cache_kwargs

        generate = getattr(self.model, "generate")  # noqa: B009 - transformers' GenerationMixin
        with pre.cache.activate(self.model):
            out = generate(input_ids=ids, attention_mask=mask, **cache_kwargs(self.model, pre.cache),
                           max_new_tokens=max_new_tokens - 1, do_sample=False, **generate_kwargs)
        return out

    @torch.no_grad()
    def continuation_logits(self, input_ids: torch.Tensor, continuation: torch.Tensor,
                            attention_mask: torch.Tensor | None = None,
                            span: torch.Tensor | tuple[int, int] | None = None) -> torch.Tensor:
        """Logits predicting `continuation [B, T]` after a pruned prefill of `input_ids`: `[B, T, V]`, where
        position t predicts continuation token t (position 0 comes from the prefill)."""
        pre = self.prefill(input_ids, attention_mask, span)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        mask = torch.cat([mask, torch.ones_like(continuation)], dim=-1)
        n = input_ids.shape[1]
        pos = (mask.long().cumsum(-1) - 1)[:, n:]
        from tokenreduce.runtime.kv_cache import cache_kwargs

        with pre.cache.activate(self.model):
            out = self.model(input_ids=continuation[:, :-1], attention_mask=mask[:, :-1],
                             position_ids=pos[:, :-1], **cache_kwargs(self.model, pre.cache), use_cache=True)
        return torch.cat([pre.logits[:, None], out.logits], dim=1)


def reduce_decoder(model: torch.nn.Module, method: str = "fastv", *, inner: str = "eager",
                   count_model_flops: bool = False, **options: Any) -> ReducedDecoder:
    """Prune the prefill of a Hugging Face decoder LLM / VLM.

    Args:
        model: a `LlamaForCausalLM`-style model (or `LlavaForConditionalGeneration`), unmodified.
        method: a decoder method (`tokenreduce.methods.registry.names("decoder")`: "fastv", "pyramiddrop",
            "gemfilter"); "none" captures the same prefill graph without pruning (the baseline benchmarks
            compare against).
        inner: "eager" (default: runs the rewritten graph as is) or "inductor".
        count_model_flops: count prefill FLOPs before/after for the report (runs the model twice).
        **options: the method's options (None means the method's default):
            layers -- FastV: `[K]` (prune after block K-1's attention ranks, default 2); PyramidDrop: the
                stage blocks (default 8/16/24 of 32, scaled); GemFilter: `[L]`, the filter layer (default
                13/32 of the depth).
            keep_ratio -- FastV / PyramidDrop: fraction of the span kept at each stage (default 0.5).
            keep_tokens -- GemFilter: span tokens kept (default: the paper's 1024, or a quarter of the span
                when that is smaller).
            score_pool -- max-pool the last-query scores over this many neighbouring tokens before ranking
                (odd; 1, the default, is the papers' ranking; a SnapKV-style extension that keeps
                multi-token facts whole).
    """
    impl = registry.decoder(method)
    given = {k: v for k, v in options.items() if v is not None}
    settings = Settings(method=method, options=impl.options(given, registry.METHODS), inner=inner)
    return ReducedDecoder(model, settings, count_model_flops=count_model_flops)
