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


def batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def repeat_batch(tree: Any, batch: int) -> Any:
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
    batch = batch_of(args, kwargs)
    trace_args, trace_kwargs = args, kwargs
    dynamic = dynamic_batch and batch is not None
    if dynamic and batch == 1:
        trace_args, trace_kwargs = repeat_batch(args, 1), repeat_batch(kwargs, 1)
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


def _is_module_state(ph: fx.Node, example: Any) -> bool:
    """A Dynamo graph input that is a parameter or buffer of the traced module (not a user input)."""
    if isinstance(example, torch.nn.Parameter):
        return True
    grapharg = ph.meta.get("grapharg")
    name = grapharg.source.name() if grapharg is not None and hasattr(grapharg, "source") else ph.name
    return "_parameters" in name or "_buffers" in name


class _DynamoCall(torch.nn.Module):
    """Calls a Dynamo graph with module state held as constants and SymInt inputs recomputed from the
    tensor sizes they name, so the re-export sees only user tensors as inputs (as torch.export would)."""

    def __init__(self, gm: fx.GraphModule, kinds: list[Any], consts: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.gm = gm
        self.kinds = kinds
        for i, t in consts.items():
            self.register_buffer(f"state_{i}", t, persistent=False)

    def forward(self, *tensors: torch.Tensor) -> Any:
        it = iter(tensors)
        full: list[Any] = []
        for i, kind in enumerate(self.kinds):
            full.append(next(it) if kind is None else getattr(self, f"state_{i}") if kind == "state" else None)
        for i, kind in enumerate(self.kinds):
            if isinstance(kind, tuple):
                full[i] = full[kind[0]].shape[kind[1]]
        return self.gm(*full)


def from_dynamo(gm: fx.GraphModule, example_inputs: Sequence[Any], dynamic: bool = True
                ) -> tuple[Captured, list[Any]]:
    """Re-export a Dynamo graph. Returns the capture and, per graph input, its kind: None for a user
    tensor, "state" for a parameter/buffer, or (input, dim) for a SymInt read from a tensor size."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kinds: list[Any] = []
    consts: dict[int, torch.Tensor] = {}
    for i, ph in enumerate(placeholders):
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
            kinds.append(hit)
        elif isinstance(example_inputs[i], torch.Tensor) and _is_module_state(ph, example_inputs[i]):
            kinds.append("state")
            consts[i] = example_inputs[i].detach()
        else:
            kinds.append(None)
    dyn_dims: dict[int, set[int]] = {}
    for k in kinds:
        if isinstance(k, tuple):
            dyn_dims.setdefault(k[0], set()).add(k[1])
    tensors: list[torch.Tensor] = []
    specs: list[Any] = []
    batch_dim = Dim("batch", min=1, max=1 << 16)
    for i, kind in enumerate(kinds):
        if kind is not None:
            continue
        real = example_inputs[i]
        if not isinstance(real, torch.Tensor):
            raise TokenReduceError(f"unsupported graph input of type {type(real).__name__}")
        dims = dyn_dims.get(i, set()) if dynamic else set()
        if dims and real.shape[0] == 1:
            real = torch.cat([real, real])
        tensors.append(real)
        specs.append({d: batch_dim if d == 0 else Dim.AUTO for d in dims} or None)
    wrapper = _DynamoCall(gm, kinds, consts)
    with torch.no_grad(), preserve_node_meta():
        try:
            ep = torch.export.export(wrapper, tuple(tensors), dynamic_shapes=(tuple(specs),) if any(specs) else None,
                                     strict=False)
        except Exception as exc:
            raise TokenReduceError(f"could not re-export the Dynamo graph: {exc}".split("\n")[0]) from exc
    return Captured(gm=ep.module(), args=tuple(tensors), dynamic_batch=any(specs)), kinds
