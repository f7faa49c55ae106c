"""`tokenreduce.reduce_decoder`: prefill token pruning for Hugging Face decoder LLMs and VLMs.

    dec = tokenreduce.reduce_decoder(model, method="gemfilter", layers=[6], keep_tokens=256)
    out = dec.generate(input_ids, attention_mask=mask, span=span, max_new_tokens=16)
    print(dec.report)

The prefill is captured with `torch.export` (`use_cache=False`, last-position logits only), rewritten by
`prune_decoder_tokens` and `emit_kv_cache`, shape-fixed, and run eagerly or through inductor. The graph
is specialised to the input shapes and the span size (the keep counts are constants), and cached per
shape. Decoding then continues in the user's own model through transformers' `generate()`, with a
`ReducedCache` holding only the kept tokens (see `runtime/kv_cache.py`).

Model inputs beyond the prompt (`pixel_values`, `image_sizes`, `image_grid_thw`, `pixel_values_videos`,
`video_grid_thw`, `mm_token_type_ids`, `second_per_grid_ts`) are passed through to the model. A VLM
whose vision token count depends on grid *values* (Qwen2-VL / Qwen2.5-VL) first runs its own vision
encoder, placeholder scatter and mRoPE position code eagerly (a forward pre-hook on its language model
takes the embeddings and 3-axis position ids the model built, and stops the run there); the captured
graph starts at those embeddings, and decoding continues from the model's own `rope_deltas`. LLaVA-NeXT's
`image_sizes` also decide the token count (AnyRes grid, unpadding), but through python arithmetic on few
values: the graph is specialised on them (python ints, part of the cache key), so its vision tower and
AnyRes packing are captured; GlobalCom2 also reads the AnyRes layout (`methods.globalcom2.anyres_side_inputs`).

The span -- the tokens a method may drop -- is, in order of precedence: the `span` argument (a `[B, N]`
bool mask or a `(start, end)` range applied to every row), or, for a VLM, the positions of the model's
image and video token ids (`config.image_token_id` / `video_token_id`). Tokens outside the span (system prompt, the question at the end, padding) are always
kept, and so is the last prompt token (the query that ranks the span and whose logits are returned): a span
that covers it is clipped and the report says so. Every row must have the same number of span tokens (the
keep counts are static); rows that differ are refused with the counts, never silently trimmed.

Refuses (TokenReduceError): models without causal self-attention, a text model without a span, spans of
unequal size, keep counts or layers out of range, model inputs it does not know (named), a grid-input VLM
without `model.language_model`, a span other than exactly the image/video tokens for a method that scores them
in the eager vision tower (VisionZip on Qwen2-VL).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from tokenreduce import targets
from tokenreduce.compiler.capture import export_graph
from tokenreduce.compiler.pipeline import reduce_prefill
from tokenreduce.compiler.report import Report, count_report_flops
from tokenreduce.errors import TokenReduceError
from tokenreduce.methods import registry
from tokenreduce.methods.globalcom2 import ANYRES_INPUTS, anyres_side_inputs, not_anyres
from tokenreduce.methods.prefill import VISION_SCORES, SelectionMethod
from tokenreduce.methods.settings import Settings
from tokenreduce.targets import TargetOptions

CLIPPED_NOTE = ("the span covered the last prompt token (the query that ranks the span and whose logits are "
                "returned); it was taken out of the span and kept")


# Model inputs that carry images / videos: passed through to the model, never to `generate`'s decode steps.
MULTIMODAL_INPUTS = ("pixel_values", "image_sizes", "pixel_values_videos", "image_grid_thw", "video_grid_thw",
                     "mm_token_type_ids", "second_per_grid_ts")
# Inputs whose *values* decide how many vision tokens there are (Qwen2-VL's grids): torch.export cannot
# specialise a graph on them, so the model's own multimodal embedding runs eagerly before the graph.
GRID_INPUTS = ("image_grid_thw", "video_grid_thw")
EAGER_VISION_NOTE = ("the vision encoder and the multimodal position ids (mRoPE) ran eagerly in the model's own code "
                     "(its token count depends on image_grid_thw/video_grid_thw values); the captured prefill starts "
                     "at the language model's input embeddings")


class _Prefill(torch.nn.Module):
    """What is captured: one prefill call returning the last position's logits, without a cache. Every other
    model input (`pixel_values`, `image_sizes`, ...) is passed through by name."""

    def __init__(self, model: torch.nn.Module, constants: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.constants = dict(constants or {})  # inputs the graph is specialised on (LLaVA-NeXT's image_sizes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                **extra: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, logits_to_keep=1, **extra, **self.constants)
        return out.logits


class _EmbedsPrefill(torch.nn.Module):
    """The prefill from the language model's input embeddings (vision tokens already scattered in) and the
    model's own position ids (mRoPE: `[3, B, N]`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                vision_scores: torch.Tensor | None = None) -> torch.Tensor:
        # vision_scores: `[B, N]` keep scores a method computed in the eager vision tower (VisionZip on Qwen2-VL);
        # unused here, a graph input the pruning pass reads
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, logits_to_keep=1)
        return out.logits


class _Stop(Exception):
    """Raised by the language-model pre-hook once its inputs are known (the model's own run stops there)."""


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
        self._rope_deltas: torch.Tensor | None = None  # mRoPE offset of the last prompt (see _restore_rope_deltas)
        # LLaVA-NeXT: image_sizes as python ints the graph is specialised on, and the AnyRes layout side input
        self._constants: dict[str, Any] = {}
        self._side: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------- inputs
    def _config_token_id(self, *names: str) -> int | None:
        cfg = getattr(self.model, "config", None)
        for name in names:
            v = getattr(cfg, name, None)
            if isinstance(v, int):
                return v
        return None

    def _vision_token_ids(self) -> list[int]:
        """The config's image and video placeholder token ids (the span of a VLM)."""
        ids = [self._config_token_id("image_token_id", "image_token_index"),
               self._config_token_id("video_token_id", "video_token_index")]
        return [i for i in ids if i is not None]

    def _graph_inputs(self, input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                      extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The captured prefill's inputs by name. A model whose vision token count depends on grid values
        (`GRID_INPUTS`) first runs its own multimodal embedding and position code eagerly (the vision encoder
        is not pruned anyway; a method that reads it, VisionZip, hooks that run: `SelectionMethod.eager_vision`,
        whose `[B, N]` scores become the `vision_scores` input); the graph then starts at the language model's
        embeddings and positions."""
        unknown = sorted(set(extra) - set(MULTIMODAL_INPUTS))
        if unknown:
            raise TokenReduceError(f"unexpected model inputs {unknown}; reduce_decoder passes through "
                                   f"{list(MULTIMODAL_INPUTS)}")
        self._rope_deltas = None
        self._constants, self._side = {}, {}
        if "image_sizes" in extra and not any(k in extra for k in GRID_INPUTS):
            # LLaVA-NeXT (AnyRes): the image token count follows from image_sizes *values* (grid choice, unpadding);
            # the graph is specialised on them (python ints, part of the cache key), so the vision tower and the
            # AnyRes packing are captured with static shapes
            extra = dict(extra)
            sizes = extra.pop("image_sizes")
            self._constants["image_sizes"] = [[int(v) for v in hw] for hw in torch.as_tensor(sizes).tolist()]
            self._side = anyres_side_inputs(self.model, input_ids, self._constants["image_sizes"])
        if not any(k in extra for k in GRID_INPUTS):
            inner = getattr(self.model, "model", None)
            if hasattr(inner, "rope_deltas"):  # an mRoPE model on a text-only prompt: no vision offset
                self._rope_deltas = torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)
            return {"input_ids": input_ids, "attention_mask": mask, "position_ids": pos, **extra}
        embeds, positions, deltas, scores = self._embed_multimodal(input_ids, mask, extra)
        self._rope_deltas = deltas
        out = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
        if scores is not None:
            out[VISION_SCORES] = scores
        return out

    def _embed_multimodal(self, input_ids: torch.Tensor, mask: torch.Tensor, extra: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        inner = getattr(self.model, "model", None)
        lm = getattr(inner, "language_model", None)
        if not isinstance(lm, torch.nn.Module):
            raise TokenReduceError(f"{type(self.model).__name__} takes {list(GRID_INPUTS)} but has no "
                                   "model.language_model to start the prefill graph at")
        extra = dict(extra)
        if "mm_token_type_ids" not in extra:  # what the processor returns: text 0, image 1, video 2
            types = torch.zeros_like(input_ids, dtype=torch.int)
            for value, names in ((1, ("image_token_id",)), (2, ("video_token_id",))):
                tid = self._config_token_id(*names)
                if tid is not None:
                    types = types.masked_fill(input_ids == tid, value)
            extra["mm_token_type_ids"] = types
        seen: dict[str, Any] = {}

        def grab(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.update(kwargs)
            raise _Stop

        method = registry.decoder(self.settings.method)
        # a method that reads the vision tower hooks it for this run (VisionZip: scores and merges there)
        hooks = method.eager_vision(self.settings.opts, self.model, input_ids, extra) \
            if isinstance(method, SelectionMethod) else None
        handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
        scores_of = None
        try:
            with contextlib.ExitStack() as stack:
                if hooks is not None:
                    scores_of = stack.enter_context(hooks)
                self.model(input_ids=input_ids, attention_mask=mask, use_cache=False, **extra)
        except _Stop:
            pass
        finally:
            handle.remove()
        scores = scores_of() if scores_of is not None else None
        embeds, positions = seen.get("inputs_embeds"), seen.get("position_ids")
        if not isinstance(embeds, torch.Tensor) or not isinstance(positions, torch.Tensor):
            raise TokenReduceError(f"{type(self.model).__name__}: its language model was not called with input "
                                   "embeddings and position ids; cannot start the prefill graph there")
        deltas = getattr(inner, "rope_deltas", None)
        return embeds, positions, deltas if isinstance(deltas, torch.Tensor) else None, scores

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
            vision_ids = self._vision_token_ids()
            if not vision_ids:
                raise TokenReduceError(
                    "no span given: pass span=(start, end) or a [B, N] bool mask marking the context tokens the "
                    "method may drop (the system prompt and the final question should stay outside it); only "
                    "vision-language models find their span (image/video tokens) on their own")
            span_mask = torch.isin(input_ids, torch.tensor(vision_ids, device=input_ids.device))
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
    def _compile(self, inputs: dict[str, torch.Tensor], span: torch.Tensor, span_size: int) -> _Compiled:
        key = (tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items()), span_size, span.device.type,
               repr(self._constants))
        if key in self._cache:
            self.report = self._cache[key].report
            return self._cache[key]
        names_in = list(inputs)
        wrapper = _EmbedsPrefill(self.model) if names_in[0] == "inputs_embeds" else _Prefill(self.model, self._constants)
        args, kwargs = tuple(inputs[n] for n in names_in[:3]), {n: inputs[n] for n in names_in[3:]}
        captured = export_graph(wrapper, args, kwargs, dynamic_batch=False)
        red = reduce_prefill(captured.gm, self.settings, span_size)
        gm, report = red.gm, red.report
        if isinstance(wrapper, _EmbedsPrefill):
            report.notes.append(EAGER_VISION_NOTE)
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        flat = self._flat(names, inputs, span)
        runner = targets.get(self.settings.inner).lower(gm, tuple(flat), {}, TargetOptions(dynamic_batch=False)).runner
        compiled = _Compiled(gm, runner, report, names)
        if self.count_model_flops:
            count_report_flops(report, (wrapper, args, kwargs), (gm, tuple(flat), {}))
        self._cache[key] = compiled
        self.report = report
        return compiled

    def _flat(self, names: list[str], inputs: dict[str, torch.Tensor], span: torch.Tensor) -> list[torch.Tensor]:
        by_name = {**inputs, **self._side, "span": span}
        missing = [n for n in names if n not in by_name]
        if set(missing) & set(ANYRES_INPUTS):
            raise TokenReduceError(not_anyres(self.settings.method, type(self.model).__name__), setting="method")
        if missing:
            raise TokenReduceError(f"the captured prefill expects inputs {missing} that were not given")
        return [by_name[n] for n in names]

    def compiled_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     span: torch.Tensor | tuple[int, int] | None = None, **extra: torch.Tensor
                     ) -> tuple[_Compiled, list[torch.Tensor]]:
        """The rewritten prefill graph for these inputs and its flat positional inputs (ONNX export)."""
        mask, pos, span_mask, span_size = self.prepare(input_ids, attention_mask, span)
        inputs = self._graph_inputs(input_ids, mask, pos, extra)
        if VISION_SCORES in inputs:  # selected among the vision tower's tokens: the span must be exactly those
            vision = torch.isin(input_ids, torch.tensor(self._vision_token_ids(), device=input_ids.device))
            if not torch.equal(span_mask, vision & mask.bool()):
                raise TokenReduceError(f"{self.settings.method} selects among the image/video tokens the vision tower "
                                       "produced; a span other than them (a given span, or a vision token last in "
                                       "the prompt) is refused: pass span=None and end the prompt with text",
                                       setting="span")
        c = self._compile(inputs, span_mask, span_size)
        if self.clipped and CLIPPED_NOTE not in c.report.notes:
            c.report.notes.append(CLIPPED_NOTE)
        return c, self._flat(c.names, inputs, span_mask)

    def export_onnx(self, path: Any, input_ids: torch.Tensor, span: torch.Tensor | tuple[int, int] | None = None, *,
                    verify: bool = True, atol: float = 1e-4, **extra: torch.Tensor) -> Any:
        """Export the pruned prefill for these inputs (batch and lengths fixed; model inputs such as
        `pixel_values`/`image_sizes` as for `prefill`) to ONNX, verified in onnxruntime against the eager pruned
        graph; returns the `targets.onnx.OnnxExport` record (its `input_names` are the graph's inputs, e.g.
        `inputs_embeds` for a grid-input VLM whose vision part runs eagerly). The file is written only after the
        checks pass. A VLM's placeholder scatter and count check are exported in static form; a prompt whose
        image token count does not match its image gives NaN outputs (`passes/export_static.py`).

        Rows must be unpadded (no attention mask): a padded batch's cache holds values at the padding positions
        that no query reads and that runtimes compute differently (fully masked attention rows), so verification
        would reject it; export at batch 1 or with rows of equal length."""
        from tokenreduce.targets.onnx import export_graph as export_onnx_graph

        compiled, flat = self.compiled_for(input_ids, None, span, **extra)
        return export_onnx_graph(compiled.gm, tuple(flat), {}, path, verify=verify, atol=atol, dynamic_batch=False)

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

    def _restore_rope_deltas(self) -> None:
        """An mRoPE model (Qwen2-VL) continues decoding from `model.model.rope_deltas`, which its own prefill
        sets; the pruned prefill replaced that call, so set what the model's prefill computed for this prompt
        (kept tokens keep their original 3-axis positions; new tokens continue after the vision offset)."""
        inner = getattr(self.model, "model", None)
        if self._rope_deltas is not None and inner is not None:
            inner.rope_deltas = self._rope_deltas

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 span: torch.Tensor | tuple[int, int] | None = None, max_new_tokens: int = 20,
                 **generate_kwargs: Any) -> torch.Tensor:
        """Greedy generation after a pruned prefill; returns the prompt followed by the new tokens, like
        `model.generate`. Decoding runs in transformers' `generate()` with the pruned cache."""
        if generate_kwargs.get("do_sample") or generate_kwargs.get("num_beams", 1) != 1:
            raise TokenReduceError("reduce_decoder.generate decodes greedily (do_sample=False, num_beams=1)")
        extra = {k: generate_kwargs.pop(k) for k in list(generate_kwargs) if k in MULTIMODAL_INPUTS}
        pre = self.prefill(input_ids, attention_mask, span, **extra)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        first = pre.logits.argmax(-1, keepdim=True)
        ids = torch.cat([input_ids, first], dim=-1)
        if max_new_tokens <= 1:
            return ids
        mask = torch.cat([mask, torch.ones_like(first)], dim=-1)
        from tokenreduce.runtime.kv_cache import cache_kwargs

        self._restore_rope_deltas()
        generate = getattr(self.model, "generate")  # noqa: B009 - transformers' GenerationMixin
        with pre.cache.activate(self.model):
            out = generate(input_ids=ids, attention_mask=mask, **cache_kwargs(self.model, pre.cache),
                           max_new_tokens=max_new_tokens - 1, do_sample=False, **generate_kwargs)
        return out

    @torch.no_grad()
    def continuation_logits(self, input_ids: torch.Tensor, continuation: torch.Tensor,
                            attention_mask: torch.Tensor | None = None,
                            span: torch.Tensor | tuple[int, int] | None = None, **extra: torch.Tensor
                            ) -> torch.Tensor:
        """Logits predicting `continuation [B, T]` after a pruned prefill of `input_ids`: `[B, T, V]`, where
        position t predicts continuation token t (position 0 comes from the prefill)."""
        pre = self.prefill(input_ids, attention_mask, span, **extra)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        mask = torch.cat([mask, torch.ones_like(continuation)], dim=-1)
        n = input_ids.shape[1]
        pos = (mask.long().cumsum(-1) - 1)[:, n:]
        if self._rope_deltas is not None:  # mRoPE: text positions continue after the vision offset, on 3 axes
            pos = (pos + self._rope_deltas)[None].expand(3, *pos.shape)
        from tokenreduce.runtime.kv_cache import cache_kwargs

        with pre.cache.activate(self.model):
            out = self.model(input_ids=continuation[:, :-1], attention_mask=mask[:, :-1],
                             position_ids=pos[..., :-1], **cache_kwargs(self.model, pre.cache), use_cache=True)
        return torch.cat([pre.logits[:, None], out.logits], dim=1)


def reduce_decoder(model: torch.nn.Module, method: str = "fastv", *, inner: str = "eager",
                   count_model_flops: bool = False, **options: Any) -> ReducedDecoder:
    """Prune the prefill of a Hugging Face decoder LLM / VLM.

    Args:
        model: a `LlamaForCausalLM`-style model, or a VLM (LLaVA, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL), unmodified.
        method: a decoder method (`tokenreduce.methods.registry.names("decoder")`): "fastv", "pyramiddrop",
            "gemfilter" rank the span by the last query's attention; "divprune" (max-min diversity, before
            the LLM), "dart" (duplication around pivot tokens, at a chosen layer) and "visionzip" (dominant
            + merged contextual image tokens from the vision tower's CLS attention, LLaVA-style models, or
            from the attention each token receives, Qwen2-VL / Qwen2.5-VL, scored in their eager tower)
            select visual tokens; "hiprune" (anchors + grid neighbours from a middle vision layer, registers
            from the deep one) and "flowcut" (information flow through the vision CLS, accumulated over
            layers) select them from the vision tower of LLaVA-style models; "globalcom2" (AnyRes models such
            as LLaVA-NeXT: the thumbnail's CLS attention sets each crop's budget); "sparsevlm" (question tokens
            rate the visual ones inside the LLM, pruned ones recycled) and "visiondrop" (visual-only
            attention, dropped ones merged) prune them in stages (docs/decoders.md); "none" captures the same
            prefill graph without pruning (the baseline benchmarks compare against).
        inner: "eager" (default: runs the rewritten graph as is) or "inductor".
        count_model_flops: count prefill FLOPs before/after for the report (on fake tensors where the
            model allows; 'FLOPs unavailable: why' in the report when counting fails).
        **options: the method's options (None means the method's default):
            layers -- FastV: `[K]` (prune after block K-1's attention ranks, default 2); PyramidDrop: the
                stage blocks (default 8/16/24 of 32, scaled); GemFilter: `[L]`, the filter layer (default
                13/32 of the depth).
            keep_ratio -- FastV / PyramidDrop: fraction of the span kept at each stage (default 0.5);
                DivPrune / DART / VisionZip / HiPrune / FlowCut / GlobalCom2: fraction kept (defaults from
                their papers' scripts: 0.098, 0.222, 64/576, 192/576, 128/576, 0.25); SparseVLM / VisionDrop: fraction of the span left after the last stage
                (defaults 110/576, 19/48).
            pivot_image_tokens, pivot_text_tokens -- DART: pivots from the span and from the question.
            contextual_ratio -- VisionZip: share of the kept tokens that are merged contextual tokens;
                VisionDrop: share of each stage's kept tokens that absorb the dropped ones.
            recycle_ratio -- SparseVLM: share of each stage's pruned tokens recycled into cluster tokens.
            keep_tokens -- GemFilter: span tokens kept (default: the paper's 1024, or a quarter of the span
                when that is smaller).
            score_pool -- max-pool the last-query scores over this many neighbouring tokens before ranking
                (odd; 1, the default, is the papers' ranking; a SnapKV-style extension that keeps
                multi-token facts whole).
            score_window -- FastV / PyramidDrop / GemFilter: rank by the attention of the last W query tokens,
                summed (SnapKV's observation window; 1, the default, is the papers' last-query ranking).
            anchor_ratio, object_layer -- HiPrune; vision_layers, decay -- FlowCut; temperature --
                GlobalCom2 (docs/decoders.md lists each with its range).
    """
    impl = registry.decoder(method)
    given = {k: v for k, v in options.items() if v is not None}
    settings = Settings(method=method, options=impl.options(given, registry.METHODS), inner=inner)
    return ReducedDecoder(model, settings, count_model_flops=count_model_flops)
