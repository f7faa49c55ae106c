"""The `tokenreduce` Dynamo backend: `torch.compile(model, backend="tokenreduce", options={...})`.

Registered through the `torch_dynamo_backends` entry point in pyproject.toml, so it works without
importing tokenreduce. Dynamo hands over its graph; we re-export it to ATen (`capture.from_dynamo`), run
the same pipeline as `tokenreduce.compile`, and compile the result with the inner compiler (inductor by
default, or eager).

Dynamic batch: the graph is specialised per input-shape signature at run time (a small cache), so a new
batch size gets its own reduced, statically shaped graph instead of a wrong result. `last_report` of the
returned callable holds the report of the latest specialisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from tokenreduce.compiler.capture import from_dynamo
from tokenreduce.compiler.pipeline import make_report, reduce_graph
from tokenreduce.methods.settings import Settings
from tokenreduce.targets import lower_eager, lower_inductor_static


def _flat(gm: fx.GraphModule) -> tuple[fx.GraphModule, Any]:
    """Plain positional-in, flat-list-out copy of an unlifted export module (for compile_fx)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and not node.users:
            gm.graph.erase_node(node)  # export's input-guard submodule
    gm.graph._codegen = fx.graph.CodeGen()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves, spec = torch.utils._pytree.tree_flatten(out.args[0])
    out.args = (tuple(leaves),)
    gm.recompile()
    return gm, spec


class _Specialised:
    def __init__(self, gm: fx.GraphModule, settings: Settings) -> None:
        self.gm = gm
        self.settings = settings
        self.cache: dict[tuple[Any, ...], Any] = {}
        self.reports: dict[tuple[Any, ...], Any] = {}
        self.last_report = None

    def _build(self, args: tuple[Any, ...]) -> Any:
        captured, kinds = from_dynamo(self.gm, args, dynamic=False)
        red = reduce_graph(captured.gm, self.settings)
        report = make_report(red, self.settings)
        flat, spec = _flat(red.gm)
        tensors = [a for a, k in zip(args, kinds) if k is None]
        compiled = lower_inductor_static(flat, tensors) if self.settings.inner == "inductor" else lower_eager(flat)

        def run(*call_args: Any) -> Any:
            ts = [a for a, k in zip(call_args, kinds) if k is None]
            out = compiled(*ts)
            return torch.utils._pytree.tree_unflatten(list(out), spec)

        return run, report

    def __call__(self, *args: Any) -> Any:
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        # parameters are held as constants of the specialised graph: the cache key includes their identity
        # through the module-state inputs' data pointers, so reloaded weights rebuild.
        key = key + tuple(a.data_ptr() for a in args if isinstance(a, torch.nn.Parameter))
        if key not in self.cache:
            self.cache[key], self.reports[key] = self._build(args)
        self.last_report = self.reports[key]
        return self.cache[key](*args)


def tokenreduce_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None,
                        **_: Any) -> Any:
    """Dynamo backend entry point."""
    settings = Settings.from_options(options or {})
    return _Specialised(gm, settings)


def register() -> None:
    """Register under the name "tokenreduce" (the entry point does this lazily without an import)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "tokenreduce" not in _BACKENDS:
        register_backend(name="tokenreduce")(tokenreduce_backend)
