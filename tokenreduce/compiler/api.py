"""`tokenreduce.compile`: reduce a model ahead of time and get back a callable module with a report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from tokenreduce.compiler.capture import export_graph
from tokenreduce.compiler.pipeline import make_report, reduce_graph
from tokenreduce.compiler.report import Report, count_flops
from tokenreduce.errors import TokenReduceError
from tokenreduce.methods import registry
from tokenreduce.methods.settings import Settings
from tokenreduce.targets import lower_eager, lower_inductor


class ReducedModule(torch.nn.Module):
    """The token-reduced model: call it like the original. `.report` says what was reduced and why;
    `.graph_module` is the rewritten (uncompiled) graph, the input of every target (eager, inductor, ONNX)."""

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

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._runner(*args, **kwargs)


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
        count_model_flops: count FLOPs before/after for the report (runs the model twice).
        **settings: fields of `tokenreduce.Settings` (method, r, keep_ratio, layers, ...).

    Returns:
        A `ReducedModule`; `.report` holds per-block tokens in/out, actions or skip reasons, and FLOPs.
    """
    cfg = Settings.from_options(settings)
    registry.encoder(cfg.method)  # a decoder method is refused before the (slow) capture
    args, kwargs = split_inputs(example_inputs, example_kwargs)
    captured = export_graph(model, args, kwargs, dynamic_batch=cfg.dynamic_batch)
    red = reduce_graph(captured.gm, cfg)
    report = make_report(red, cfg)
    gm = red.gm
    if count_model_flops:
        report.flops_before = count_flops(model, args, kwargs)
        report.flops_after = count_flops(gm, args, kwargs)
    runner = lower_inductor(gm, captured.dynamic_batch, list(args) + list(kwargs.values())) if cfg.inner == "inductor" else lower_eager(gm)
    return ReducedModule(gm, runner, report, cfg, args, kwargs, captured.dynamic_batch)
