"""`tokenreduce.compile`: reduce a model ahead of time and get back a callable module with a report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from tokenreduce import targets
from tokenreduce.compiler.capture import export_graph, release_fake_caches, trace_lock
from tokenreduce.compiler.pipeline import make_report, reduce_graph
from tokenreduce.compiler.report import Report, count_report_flops
from tokenreduce.errors import TokenReduceError
from tokenreduce.methods import registry
from tokenreduce.methods.settings import Settings
from tokenreduce.methods.tomesd import DrawStream, call_inputs, feed_call_inputs
from tokenreduce.targets import TargetOptions
from tokenreduce.util.batch import tensor_leaves

MASK_INPUTS = ("attention_mask",)  # keyword inputs normalised at the module boundary (1 = token, 0 = padding)


class ReducedModule(torch.nn.Module):
    """The token-reduced model: call it like the original. `.report` says what was reduced and why;
    `.graph_module` is the rewritten (uncompiled) graph, the input of every target (eager, inductor, ONNX).

    The captured graph is specialised to the example's attention mask: its dtype, and whether there was one.
    Calls are normalised to it: a bool, integer or float 0/1 mask is converted to the traced dtype, a missing
    mask is all ones, and a graph captured without a mask takes an all-ones mask (dropped). What cannot be
    converted (an additive float mask, padding for a graph without a mask input) is refused by name.

    Inputs the reduced graph takes beyond the model's own (`call_inputs`: tomesd's `rand_stream="call"` draws,
    `tomesd_draws`) are filled at every call by their stream unless the caller passes them; `example_kwargs`
    holds an example of each, so `graph_module(*example_args, **example_kwargs)` runs (targets, export).

    Gradients: with `inner="eager"` they reach the model's own parameters. A runner that compiled a copy of
    the weights (today inductor on CPU) refuses at `backward()` when a gradient reaches such a copy, instead
    of leaving the model's parameters without gradients."""

    def __init__(self, graph_module: fx.GraphModule, runner: Any, report: Report, settings: Settings,
                 example_args: tuple[Any, ...], example_kwargs: dict[str, Any], dynamic_batch: bool = False) -> None:
        super().__init__()
        self.dynamic_batch = dynamic_batch
        self.graph_module = graph_module
        self._runner = runner
        self.report = report
        self.settings = settings
        self.example_args = example_args
        self.example_kwargs = example_kwargs
        self.call_inputs: dict[str, DrawStream] = call_inputs(graph_module)
        _guard_copied_parameters(graph_module, runner, settings.inner)
        release_fake_caches(graph_module)  # compiling is over: what the fake tensors memoised is dead weight

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.call_inputs:
            feed_call_inputs(self.call_inputs, args, kwargs)
        for name in MASK_INPUTS:
            _normalise_mask(name, self.example_args, self.example_kwargs, args, kwargs)
        return self._runner(*args, **kwargs)


def _is_zero_one(t: torch.Tensor) -> bool:
    return t.dtype == torch.bool or bool(((t == 0) | (t == 1)).all())


def _mask_shape(traced: torch.Tensor, example_args: tuple[Any, ...], example_kwargs: dict[str, Any],
                args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Size, torch.device] | None:
    """Shape (and device) of an all-ones mask for this call: that of the input whose example had the traced
    mask's shape (`input_ids` for a text model)."""
    pairs = list(zip(example_args, args)) + [(v, kwargs.get(k)) for k, v in example_kwargs.items()
                                             if k not in MASK_INPUTS]
    for example, given in pairs:
        if (isinstance(example, torch.Tensor) and isinstance(given, torch.Tensor) and example.shape == traced.shape
                and given.dim() == traced.dim()):
            return given.shape, given.device
    return None


def _normalise_mask(name: str, example_args: tuple[Any, ...], example_kwargs: dict[str, Any],
                    args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Bring `kwargs[name]` to what the graph was traced with (in place; see ReducedModule)."""
    traced = example_kwargs.get(name)
    given = kwargs.get(name)
    if given is not None and not isinstance(given, torch.Tensor):
        raise TokenReduceError(f"{name} must be a tensor (1 = token, 0 = padding), got {type(given).__name__}")
    if not isinstance(traced, torch.Tensor):
        if given is not None and not bool((given != 0).all()):
            raise TokenReduceError(
                f"{name} has padding, but the example inputs given to tokenreduce.compile had no {name}, so the "
                f"reduced graph has no padding input; compile with example_kwargs={{'{name}': <a mask>}}")
        kwargs.pop(name, None)  # absent or all ones: what the graph computes
        return
    if given is None:
        shape = _mask_shape(traced, example_args, example_kwargs, args, kwargs)
        if shape is None:
            raise TokenReduceError(f"{name} was part of the example inputs; pass it (1 = token, 0 = padding)")
        kwargs[name] = torch.ones(shape[0], dtype=traced.dtype, device=shape[1])
        return
    if given.dtype == traced.dtype:
        return
    if not _is_zero_one(given):
        raise TokenReduceError(f"{name} must hold 1 (token) and 0 (padding), as bool, integer or float; this "
                               f"{given.dtype} mask has other values (an additive mask?); pass the 0/1 mask")
    kwargs[name] = given.to(traced.dtype)


def _guard_copied_parameters(graph_module: fx.GraphModule, runner: Any, inner: str) -> None:
    """Refuse, at the first backward, gradients that reach a runner's copy of the weights instead of the
    model's parameters (a silent detach otherwise: the model would get no gradients)."""
    if not isinstance(runner, torch.nn.Module):
        return
    own = {id(p) for p in graph_module.parameters()}

    def refuse(grad: torch.Tensor) -> torch.Tensor:
        raise TokenReduceError(
            f"gradients reached a copy of the weights that inner={inner!r} compiled, not the model's parameters; "
            f"fine-tune with tokenreduce.compile(..., inner='eager'), or run inference under torch.no_grad()")

    for p in runner.parameters():
        if id(p) not in own and p.requires_grad:
            p.register_hook(refuse)


def split_inputs(example_inputs: Any, example_kwargs: Mapping[str, Any] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    kwargs = dict(example_kwargs or {})
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), kwargs
    if isinstance(example_inputs, Mapping):
        kwargs.update(example_inputs)
        return (), kwargs
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), kwargs
    raise TokenReduceError(
        f"example_inputs must be a tensor, a tuple/list of positional inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}"
    )


def compile(  # noqa: A001 - mirrors torch.compile
    model: torch.nn.Module,
    example_inputs: Any,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    count_model_flops: bool = True,
    **settings: Any,
) -> ReducedModule:
    """Capture `model`, reduce its tokens as the settings say, and compile it.

    Args:
        model: an unmodified PyTorch model (timm / Hugging Face ViT, DeiT, DINOv2, CLIP vision, BERT ...).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        example_kwargs: keyword inputs in addition to positional ones (e.g. `attention_mask`).
        count_model_flops: count FLOPs before/after for the report (the model and the reduced graph each
            traced once on fake tensors: shapes only, no arithmetic).
        **settings: fields of `tokenreduce.Settings` (method, r, keep_ratio, layers, ...).

    Returns:
        A `ReducedModule`; `.report` holds per-block tokens in/out, actions or skip reasons, and FLOPs.
    """
    cfg = Settings.from_options(settings)
    registry.encoder(cfg.method)  # a decoder method is refused before the (slow) capture
    args, kwargs = split_inputs(example_inputs, example_kwargs)
    with trace_lock():  # concurrent compiles in threads share tracing state (compiler/capture.py)
        captured = export_graph(model, args, kwargs, dynamic_batch=cfg.dynamic_batch)
        red = reduce_graph(captured.gm, cfg)
        report = make_report(red, cfg)
        gm = red.gm
        gm_kwargs = with_call_inputs(gm, args, kwargs, report)
        if count_model_flops:
            count_report_flops(report, (model, args, kwargs), (gm, args, gm_kwargs))
        if captured.static_batch_reason:
            report.notes.append(captured.static_batch_reason)
        runner = targets.get(cfg.inner).lower(gm, args, gm_kwargs,
                                              TargetOptions(dynamic_batch=captured.dynamic_batch)).runner
    return ReducedModule(gm, runner, report, cfg, args, gm_kwargs, captured.dynamic_batch)


def with_call_inputs(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any],
                     report: Report) -> dict[str, Any]:
    """`kwargs` plus an example of each input the reduced graph takes beyond the model's (the report says what
    to feed there)."""
    streams = call_inputs(gm)
    if not streams:
        return kwargs
    device = tensor_leaves((args, kwargs))[0].device
    for name, stream in streams.items():
        report.notes.append(
            f"input {name}: int64 [{stream.size}], tomesd's random destinations of this call (per merging block, in "
            f"block order: randint(sy * sx, (h // sy, w // sx)) from one generator; zeros for an odd batch); "
            f"filled at every call unless passed")
    return {**kwargs, **{name: stream.example(device) for name, stream in streams.items()}}
