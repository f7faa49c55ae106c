"""Capture: turn a model, or a graph handed over by Dynamo, into one ATen graph for the analysis.

Both entry points end in `torch.export` (training IR: `aten.linear`, `aten.scaled_dot_product_attention`,
`aten.layer_norm`, ... with `nn_module_stack` metadata), unlifted to a `GraphModule` whose parameters are
`get_attr` nodes. A Dynamo graph is re-exported non-strictly under `preserve_node_meta`, so its module
stack survives. Dynamo passes symbolic sizes as extra SymInt inputs; we rebuild them from the tensor
dimensions they name, so the exported graph takes only tensors and keeps the batch dimension symbolic.

The batch dimension is exported as dynamic when asked (`dynamic_batch`). torch.export specialises size-1
dimensions, so a batch-1 example is traced with the batch repeated once; the report and parity checks
still use the user's example.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.export import Dim
from torch.fx.traceback import preserve_node_meta
from torch.utils import _pytree as pytree

from tokenreduce.errors import TokenReduceError


@dataclass
class Captured:
    gm: fx.GraphModule
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    dynamic_batch: bool = False


def _batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def _repeat_batch(tree: Any, batch: int) -> Any:
    def rep(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch:
            return torch.cat([t, t], dim=0)
        return t

    return pytree.tree_map(rep, tree)


def _dynamic_spec(args: tuple[Any, ...], kwargs: dict[str, Any], batch: int) -> tuple[Any, Any]:
    batch_dim = Dim("batch", min=1, max=1 << 16)

    def spec(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch:
            return {0: batch_dim}
        return None

    return pytree.tree_map(spec, args), pytree.tree_map(spec, kwargs)


def export_graph(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, dynamic_batch: bool = True
) -> Captured:
    """Export `model(*args, **kwargs)` to an unlifted ATen GraphModule."""
    kwargs = dict(kwargs or {})
    if not isinstance(model, torch.nn.Module):
        raise TokenReduceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves((args, kwargs))):
        raise TokenReduceError("example inputs contain no tensor; pass the inputs the model is called with")
    batch = _batch_of(args, kwargs)
    trace_args, trace_kwargs = args, kwargs
    dynamic = dynamic_batch and batch is not None
    if dynamic and batch == 1:
        trace_args, trace_kwargs = _repeat_batch(args, 1), _repeat_batch(kwargs, 1)
        batch = 2
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ep = None
            if dynamic:
                dargs, dkwargs = _dynamic_spec(trace_args, trace_kwargs, batch)  # type: ignore[arg-type]
                try:
                    ep = torch.export.export(model, trace_args, trace_kwargs,
                                             dynamic_shapes=_combine_spec(model, dargs, dkwargs))
                except Exception:  # noqa: BLE001 - a model that specialises its batch is exported static
                    ep, dynamic = None, False
            if ep is None:
                ep = torch.export.export(model, args, kwargs)
                trace_args, trace_kwargs = args, kwargs
    except Exception as exc:
        raise TokenReduceError(f"torch.export could not capture {type(model).__name__}: {exc}".split("\n")[0]) from exc
    finally:
        model.train(was_training)
    gm = ep.module()
    return Captured(gm=gm, args=tuple(args), kwargs=kwargs, dynamic_batch=dynamic)


def _combine_spec(model: torch.nn.Module, dargs: Any, dkwargs: Any) -> Any:
    """dynamic_shapes in the form torch.export wants: a tuple for positional args plus kwargs by name."""
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    spec: dict[str, Any] = {}
    for name, s in zip(params, dargs):
        spec[name] = s
    spec.update(dkwargs)
    return spec


class _SymIntFree(torch.nn.Module):
    """Calls a Dynamo graph with its SymInt inputs recomputed from the tensor sizes they name."""

    def __init__(self, gm: fx.GraphModule, sources: list[tuple[int, int] | None], n_in: int) -> None:
        super().__init__()
        self.gm = gm
        self.sources = sources
        self.n_in = n_in

    def forward(self, *tensors: torch.Tensor) -> Any:
        it = iter(tensors)
        full: list[Any] = []
        for src in self.sources:
            full.append(next(it) if src is None else None)
        for i, src in enumerate(self.sources):
            if src is not None:
                full[i] = full[src[0]].shape[src[1]]
        return self.gm(*full)


def from_dynamo(gm: fx.GraphModule, example_inputs: Sequence[Any], dynamic: bool = True
                ) -> tuple[Captured, list[tuple[int, int] | None]]:
    """Re-export a Dynamo graph; returns the capture and, per original input, where a SymInt comes from."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sources: list[tuple[int, int] | None] = []
    for ph in placeholders:
        ev = ph.meta.get("example_value")
        if isinstance(ev, torch.SymInt):
            hit = None
            for j, other in enumerate(placeholders):
                ov = other.meta.get("example_value")
                if isinstance(ov, torch.Tensor):
                    for d, sz in enumerate(ov.shape):
                        if isinstance(sz, torch.SymInt) and str(sz.node.expr) == str(ev.node.expr):
                            hit = (j, d)
                            break
                if hit:
                    break
            if hit is None:
                raise TokenReduceError(f"dynamic size {ev} of the captured graph is not a tensor dimension")
            sources.append(hit)
        else:
            sources.append(None)
    dyn_dims: dict[int, set[int]] = {}
    for s in sources:
        if s is not None:
            dyn_dims.setdefault(s[0], set()).add(s[1])
    tensors: list[torch.Tensor] = []
    specs: list[Any] = []
    batch_dim = Dim("batch", min=1, max=1 << 16)
    for i, (ph, src) in enumerate(zip(placeholders, sources)):
        if src is not None:
            continue
        ev = ph.meta.get("example_value")
        real = example_inputs[i]
        if not isinstance(real, torch.Tensor):
            # dynamo hands fake/real tensors; build a real one of the hinted shape for tracing
            raise TokenReduceError(f"unsupported graph input of type {type(real).__name__}")
        if isinstance(real, torch._subclasses.FakeTensor) or any(isinstance(s, torch.SymInt) for s in real.shape):
            hint = [s.node.hint if isinstance(s, torch.SymInt) else s for s in (ev.shape if ev is not None else real.shape)]
            real = torch.randn(hint, dtype=real.dtype) if real.is_floating_point() else torch.zeros(hint, dtype=real.dtype)
        dims = dyn_dims.get(i, set()) if dynamic else set()
        if dims and real.shape[0] == 1:
            real = torch.cat([real, real])
        tensors.append(real)
        specs.append({d: batch_dim if d == 0 else Dim.AUTO for d in dims} or None)
    wrapper = _SymIntFree(gm, sources, len(tensors))
    with torch.no_grad(), preserve_node_meta():
        try:
            ep = torch.export.export(wrapper, tuple(tensors), dynamic_shapes=(tuple(specs),) if any(specs) else None,
                                     strict=False)
        except Exception as exc:
            raise TokenReduceError(f"could not re-export the Dynamo graph: {exc}".split("\n")[0]) from exc
    return Captured(gm=ep.module(), args=tuple(tensors), dynamic_batch=any(specs)), sources
