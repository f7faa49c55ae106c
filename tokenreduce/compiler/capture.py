"""Capture: turn a model, or a graph handed over by Dynamo, into one ATen graph for the analysis.

Both entry points end in `torch.export` (training IR: `aten.linear`, `aten.scaled_dot_product_attention`,
`aten.layer_norm`, ... with `nn_module_stack` metadata), unlifted to a `GraphModule` whose parameters are
`get_attr` nodes. A Dynamo graph is re-exported non-strictly under `preserve_node_meta`, so its module
stack survives. Dynamo passes symbolic sizes as extra SymInt inputs; we rebuild them from the tensor
dimensions they name, so the exported graph takes only tensors and keeps the batch dimension symbolic.

The batch dimension is exported as dynamic when asked (`dynamic_batch`). torch.export specialises size-1
dimensions, so a batch-1 example is traced with the batch repeated once; the report and parity checks
still use the user's example. Only a model that specialises its batch (torch.export's constraint violation)
falls back to a static batch, and `Captured.static_batch_reason` says so and why; any other export failure
is raised with its own cause.

Dynamo's SymInt inputs name a tensor size, stride or storage offset; each is recomputed from the tensor it
names (a sliced or permuted input has a stride symbol of its own).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.export import Dim
from torch.fx.traceback import preserve_node_meta
from torch.utils import _pytree as pytree

from tokenreduce.errors import TokenReduceError
from tokenreduce.util.batch import batch_of, repeat_batch


@dataclass
class Captured:
    gm: fx.GraphModule
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    dynamic_batch: bool = False
    static_batch_reason: str = ""  # "static batch: <why>" when a dynamic batch was asked for but not possible


def state_name(index: int) -> str:
    """Attribute (and `get_attr` target) under which `from_dynamo` holds Dynamo graph input `index`
    when that input is module state (a parameter or buffer)."""
    return f"state_{index}"


def trace_lock() -> Any:
    """The lock every trace in this process takes: Dynamo's own compile lock, so an export or a backend
    build never runs beside a Dynamo compile in another thread (the tracers share global mode state:
    "s77 is not tracked with proxy", "Trying to pop empty mode stack"). Reentrant."""
    from torch._dynamo import convert_frame

    return getattr(convert_frame, "compile_lock", _OWN_LOCK)


_OWN_LOCK = threading.RLock()


def release_shape_env_caches() -> None:
    """Drop the memo entries that pin finished traces in memory.

    torch memoises several `ShapeEnv` methods with class-level `lru_cache`s whose keys include the
    instance, so every export (and every Dynamo or inductor compile) leaves its shape environment, fake
    tensor cache and symbolic values reachable after the traced model and graph are freed: about 5 MB per
    `tokenreduce.compile` of a small ViT. The caches are pure memos; emptying them costs a few recomputed
    guards. Called before and after each capture, so a long-lived process holds at most the latest one."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    for name in dir(ShapeEnv):
        clear = getattr(getattr(ShapeEnv, name, None), "cache_clear", None)
        if callable(clear):
            clear()


def release_fake_caches(gm: fx.GraphModule) -> None:
    """Empty the fake-tensor dispatch cache of the shape environment behind `gm`'s metadata.

    A dynamic-shape torch.export leaves its shape environment alive after everything that used it is freed
    (a reference cycle through C++ that the garbage collector cannot see; torch 2.14), and with it every
    fake-tensor result cached there by the export and our passes, most of what a compile leaves behind.
    Call once the graph's fake values will not be propagated again (the cache is a pure memo)."""
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in gm.graph.nodes]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    cache = getattr(getattr(mode, "shape_env", None), "fake_tensor_cache", None)
    if isinstance(cache, dict):
        cache.clear()
    release_shape_env_caches()


def _is_batch_constraint(exc: BaseException) -> bool:
    """torch.export refused the dynamic batch because the model specialises it (and nothing else)."""
    from torch._dynamo.exc import UserError, UserErrorType
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

    if isinstance(exc, UserError):
        return exc.error_type == UserErrorType.CONSTRAINT_VIOLATION
    return isinstance(exc, ConstraintViolationError)


def _constraint_why(exc: BaseException) -> str:
    """The first line of export's constraint message and its first specific item, e.g. "Constraints
    violated (batch)! ...: your code specialized it to be a constant (2)"."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    head = lines[0] if lines else type(exc).__name__
    item = next((ln.lstrip("- ").split(". ")[0] for ln in lines[1:] if ln.startswith("-")), "")
    return f"{head} {item}".strip()


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
    release_shape_env_caches()
    batch = batch_of(args, kwargs)
    trace_args, trace_kwargs = args, kwargs
    dynamic = dynamic_batch and batch is not None
    if dynamic and batch == 1:
        trace_args, trace_kwargs = repeat_batch(args, 1), repeat_batch(kwargs, 1)
        batch = 2
    static_reason = "" if dynamic or not dynamic_batch else "static batch: the example inputs have no batch dimension"
    # Each module's own mode, restored as it was: `model.train(model.training)` would put an eval-mode model
    # wrapped in a fresh (training-mode) module, as reduce_decoder's prefill wrapper, into training mode.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with trace_lock(), torch.no_grad():
            ep = None
            if dynamic:
                dargs, dkwargs = _dynamic_spec(trace_args, trace_kwargs, batch)  # type: ignore[arg-type]
                try:
                    ep = torch.export.export(model, trace_args, trace_kwargs,
                                             dynamic_shapes=_combine_spec(model, dargs, dkwargs))
                except Exception as exc:
                    if not _is_batch_constraint(exc):
                        raise  # the real cause, below; a static export would hide it or fail the same way
                    ep, dynamic = None, False
                    static_reason = f"static batch: the model specialises its batch dimension ({_constraint_why(exc)})"
            if ep is None:
                ep = torch.export.export(model, args, kwargs)
                trace_args, trace_kwargs = args, kwargs
    except Exception as exc:
        raise TokenReduceError(f"torch.export could not capture {type(model).__name__}: {exc}".split("\n")[0]) from exc
    finally:
        for module, mode in modes:
            module.training = mode
        release_shape_env_caches()
    gm = ep.module()
    return Captured(gm=gm, args=tuple(args), kwargs=kwargs, dynamic_batch=dynamic, static_batch_reason=static_reason)


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
    source = getattr(ph.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None) if source is not None else None
    if callable(name):  # a method in older torch, a property in newer
        name = name()
    if not isinstance(name, str):
        name = ph.name
    return "_parameters" in name or "_buffers" in name


class _DynamoCall(torch.nn.Module):
    """Calls a Dynamo graph with module state held as constants and SymInt inputs recomputed from the
    tensor sizes, strides or offsets they name, so the re-export sees only user tensors as inputs (as
    torch.export would)."""

    def __init__(self, gm: fx.GraphModule, kinds: list[Any], consts: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.gm = gm
        self.kinds = kinds
        for i, t in consts.items():
            self.register_buffer(state_name(i), t, persistent=False)

    def forward(self, *tensors: torch.Tensor) -> Any:
        it = iter(tensors)
        full: list[Any] = []
        for i, kind in enumerate(self.kinds):
            full.append(next(it) if kind is None else getattr(self, state_name(i)) if kind == "state" else None)
        for i, kind in enumerate(self.kinds):
            if isinstance(kind, tuple):
                full[i] = symint_value(kind, full)
        return self.gm(*full)


def symint_value(kind: tuple[Any, ...], inputs: Sequence[Any]) -> Any:
    """The value of a SymInt input of kind `("size" | "stride", input, dim)` or `("offset", input)`."""
    t = inputs[kind[1]]
    if kind[0] == "size":
        return t.shape[kind[2]]
    if kind[0] == "stride":
        return t.stride(kind[2])
    return t.storage_offset()


def _symint_kind(ev: torch.SymInt, placeholders: list[fx.Node]) -> tuple[Any, ...] | None:
    """Which tensor input property a Dynamo SymInt input stands for: its size, stride or storage offset
    (sizes first: a contiguous tensor's stride repeats its sizes)."""
    expr = str(ev.node.expr)
    tensors: list[tuple[int, torch.Tensor]] = []
    for j, p in enumerate(placeholders):
        t = p.meta.get("example_value")
        if isinstance(t, torch.Tensor):
            tensors.append((j, t))
    for prop in ("size", "stride"):
        for j, t in tensors:
            values = t.shape if prop == "size" else t.stride()
            for d, v in enumerate(values):
                if isinstance(v, torch.SymInt) and str(v.node.expr) == expr:
                    return (prop, j, d)
    for j, t in tensors:
        off = t.storage_offset()
        if isinstance(off, torch.SymInt) and str(off.node.expr) == expr:
            return ("offset", j)
    return None


def from_dynamo(gm: fx.GraphModule, example_inputs: Sequence[Any], dynamic: bool = True
                ) -> tuple[Captured, list[Any]]:
    """Re-export a Dynamo graph. Returns the capture and, per graph input, its kind: None for a user
    tensor, "state" for a parameter/buffer (held as the constant `state_name(i)`), or a tuple for a SymInt
    read from a tensor input (see `symint_value`)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kinds: list[Any] = []
    consts: dict[int, torch.Tensor] = {}
    for i, ph in enumerate(placeholders):
        ev = ph.meta.get("example_value")
        if isinstance(ev, torch.SymInt):
            hit = _symint_kind(ev, placeholders)
            if hit is None:
                raise TokenReduceError(f"dynamic value {ev} of the captured graph is not a size, stride or offset of "
                                       f"a tensor input; please report the model")
            kinds.append(hit)
        elif isinstance(example_inputs[i], torch.Tensor) and _is_module_state(ph, example_inputs[i]):
            kinds.append("state")
            consts[i] = example_inputs[i].detach()
        else:
            kinds.append(None)
    dyn_dims: dict[int, set[int]] = {}
    for k in kinds:
        if isinstance(k, tuple) and k[0] == "size":
            dyn_dims.setdefault(k[1], set()).add(k[2])
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
    release_shape_env_caches()
    with torch.no_grad(), preserve_node_meta():
        try:
            ep = torch.export.export(wrapper, tuple(tensors), dynamic_shapes=(tuple(specs),) if any(specs) else None,
                                     strict=False)
        except Exception as exc:
            raise TokenReduceError(f"could not re-export the Dynamo graph: {exc}".split("\n")[0]) from exc
        finally:
            release_shape_env_caches()
    return Captured(gm=ep.module(), args=tuple(tensors), dynamic_batch=any(specs)), kinds
