"""The `tokenreduce` Dynamo backend: `torch.compile(model, backend="tokenreduce", options={...})`.

Registered through the `torch_dynamo_backends` entry point in pyproject.toml, so it works without
importing tokenreduce. Dynamo hands over its graph; we re-export it to ATen (`capture.from_dynamo`), run
the same pipeline as `tokenreduce.compile`, and compile the result with the inner compiler (inductor by
default, or eager).

Per call signature: the graph is specialised per input signature (shapes, dtypes, devices, grad mode) at
run time (a small cache), so a new batch size gets its own reduced, statically shaped graph instead of a
wrong result. Inputs are made contiguous at the boundary, so a channels-last, permuted or sliced input
reuses the graph of its shape instead of needing one per layout. Builds take Dynamo's compile lock
(`capture.trace_lock`: torch.export and Dynamo share global tracer state), so concurrent first calls from
several threads each get their result.

Inputs the reduced graph takes beyond Dynamo's (tomesd's `rand_stream="call"` draws) are filled at every call by
their stream (`methods/tomesd.py`, `DrawStream`); the specialisations of one Dynamo graph share one stream, as
the patched model of the official package has one generator.

Module state (parameters, buffers) is analysed as constants but read from the call's own inputs once the
graph is built: the weights Dynamo passes at every call are used, and under grad mode the gradients reach
them (the tokenreduce ops have autograd formulas; docs/design.md, "Autograd").

Dynamo's recompile limit: once a function needed more graphs than `torch._dynamo.config.recompile_limit`,
Dynamo runs it without compiling, i.e. the original, unreduced model. That cannot be seen from inside a
compiled graph, so the backend listens for Dynamo's own notice, warns once per function, and records it in
`stats().recompile_limit_hits`. `stats().last_report` holds the report of the latest specialisation.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx

from tokenreduce import targets
from tokenreduce.compiler.capture import from_dynamo, release_fake_caches, state_name, trace_lock
from tokenreduce.compiler.pipeline import make_report, reduce_graph
from tokenreduce.compiler.report import Report
from tokenreduce.methods.settings import Settings
from tokenreduce.methods.tomesd import DrawStream, call_inputs
from tokenreduce.targets import TargetOptions


@dataclass
class BackendStats:
    """What the backend did in this process (`stats()` returns a copy)."""

    graphs: int = 0  # graphs Dynamo handed over (one per compile or recompile of a function)
    builds: int = 0  # reduced graphs built (one per input signature of a graph)
    recompile_limit_hits: list[str] = field(default_factory=list)  # one line per function that hit the limit
    last_report: Report | None = None


_STATS = BackendStats()
_STATS_LOCK = threading.Lock()
_FRAMES: dict[int, str] = {}  # Dynamo frame id compiled with this backend -> "name file:line" ("" if unknown)
_FRAME_COMPILES: dict[int, int] = {}  # frame id -> its latest compile number (a smaller one: Dynamo was reset)
_FRAME_REPORTS: dict[int, list[Report]] = {}  # the reports built for each frame (noted when it hits the limit)
_WARNED_FRAMES: set[int] = set()


def stats() -> BackendStats:
    """A snapshot of the backend's counters, recompile-limit hits and latest report."""
    with _STATS_LOCK:
        return replace(_STATS, recompile_limit_hits=list(_STATS.recompile_limit_hits))


def _boundary(a: Any) -> Any:
    """Inputs enter the built graph contiguous: one graph per shape, whatever the caller's layout."""
    return a.contiguous() if isinstance(a, torch.Tensor) else a


def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
    sig: list[Any] = [torch.is_grad_enabled()]
    for a in args:
        sig.append((tuple(a.shape), a.dtype, a.device, a.requires_grad) if isinstance(a, torch.Tensor) else a)
    return tuple(sig)


def _flat(gm: fx.GraphModule) -> tuple[fx.GraphModule, Any]:
    """Plain positional-in, flat-list-out copy of an unlifted export module (for compile_fx), without
    export's input-spec hooks (the backend's cache key already fixes the shapes)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and not node.users:
            gm.graph.erase_node(node)  # export's input-guard submodule
    gm.graph._codegen = fx.graph.CodeGen()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves, spec = torch.utils._pytree.tree_flatten(out.args[0])
    out.args = (tuple(leaves),)
    return fx.GraphModule(gm, gm.graph), spec


def _lift_state(gm: fx.GraphModule, kinds: list[Any]) -> list[int]:
    """Turn the constants that hold Dynamo's module-state inputs into trailing placeholders.

    The analysis needs parameters as constants (it tells the CLS token from the patches by what depends on
    user inputs); the built graph must not: it reads the state Dynamo passes at every call, so reloaded
    weights are used and gradients flow to the model's parameters. Returns the Dynamo input index of each
    new placeholder, in order."""
    names = {state_name(i): i for i, kind in enumerate(kinds) if kind == "state"}
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    lifted: dict[int, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or node.target not in names:
            continue
        i = names[str(node.target)]
        if i not in lifted:
            with gm.graph.inserting_after(last):
                last = lifted[i] = gm.graph.placeholder(str(node.target))
            lifted[i].meta.update(node.meta)
        node.replace_all_uses_with(lifted[i])
        gm.graph.erase_node(node)
    for i in lifted:
        delattr(gm, state_name(i))  # the constant copy is no longer read
    gm.recompile()
    return list(lifted)


class _Specialised:
    """What Dynamo calls for one of its graphs: builds (once per input signature) and runs reduced graphs."""

    def __init__(self, gm: fx.GraphModule, settings: Settings, frame: int | None = None) -> None:
        self.gm = gm
        self.settings = settings
        self.frame = frame
        self.cache: dict[tuple[Any, ...], Any] = {}
        self.reports: dict[tuple[Any, ...], Report] = {}
        self.last_report: Report | None = None
        self.streams: dict[str, DrawStream] = {}  # per extra graph input: the stream every specialisation continues

    def _build(self, args: tuple[Any, ...]) -> Any:
        args = tuple(_boundary(a) for a in args)
        captured, kinds = from_dynamo(self.gm, args, dynamic=False)
        red = reduce_graph(captured.gm, self.settings)
        report = make_report(red, self.settings)
        streams = list(call_inputs(red.gm).items())  # their placeholders follow the user inputs
        for name, stream in streams:
            stream.continue_from(self.streams.setdefault(name, stream))
        flat, spec = _flat(red.gm)
        state = _lift_state(flat, kinds)
        users = [i for i, k in enumerate(kinds) if k is None]
        # the draws are sized by the first user tensor with a batch dimension (the latent)
        lead = next((j for j, i in enumerate(users) if isinstance(args[i], torch.Tensor) and args[i].dim() > 0), 0)
        example = [args[i] for i in users]
        example += [stream.example(example[lead].device) for _, stream in streams] + [args[i] for i in state]
        compiled = targets.get(self.settings.inner).lower(
            flat, tuple(example), {}, TargetOptions(dynamic_batch=False, inside_torch_compile=True)).runner
        release_fake_caches(flat)

        def run(*call_args: Any) -> Any:
            inputs = [_boundary(call_args[i]) for i in users]
            draws = [stream(inputs[lead].shape[0], inputs[lead].device) for _, stream in streams]
            out = compiled(*inputs, *draws, *[_boundary(call_args[i]) for i in state])
            return torch.utils._pytree.tree_unflatten(list(out), spec)

        return run, report

    def __call__(self, *args: Any) -> Any:
        key = _signature(args)
        run = self.cache.get(key)
        if run is None:
            with trace_lock():  # one trace at a time, process-wide, Dynamo's compiles included
                run = self.cache.get(key)
                if run is None:
                    run, self.reports[key] = self._build(args)
                    self.cache[key] = run
                    with _STATS_LOCK:
                        _STATS.builds += 1
                        if self.frame is not None:
                            _FRAME_REPORTS.setdefault(self.frame, []).append(self.reports[key])
        report = self.reports[key]
        self.last_report = report
        with _STATS_LOCK:
            _STATS.last_report = report
        return run(*args)


# ------------------------------------------------------------------------------- Dynamo's recompile limit
_LIMIT_NOTICE = re.compile(r"torch\._dynamo hit config\.")


class _RecompileLimitListener(logging.Filter):
    """Sees Dynamo's "hit config.recompile_limit" notice; for a function this backend compiled, warns once
    and records it (the notice itself is a log line a user rarely sees, and the calls fall back silently)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and _LIMIT_NOTICE.match(record.msg):
            frame = _current_compile()[0]
            if frame is not None and frame in _FRAMES and _same_function(_FRAMES[frame], record):
                _limit_hit(frame, record)
        return True


def _current_compile() -> tuple[int | None, int | None]:
    """(frame id, compile number of that frame) of the Dynamo compile running in this thread."""
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    return (None, None) if compile_id is None else (compile_id.frame_id, compile_id.frame_compile_id)


def _frame_location() -> str:
    """"name file:line" of the code Dynamo is compiling in this thread ("" if this torch does not say)."""
    from torch._dynamo import convert_frame

    infos = getattr(getattr(convert_frame, "dynamo_tls", None), "traced_frame_infos", None)
    return str(infos[-1]) if infos else ""


def _same_function(location: str, record: logging.LogRecord) -> bool:
    """Whether Dynamo's notice (function "'name' (file:line)") is about the code at `location`: frame ids
    restart after torch._dynamo.reset()."""
    args = record.args if isinstance(record.args, tuple) else ()
    match = re.fullmatch(r"'(.*)' \((.*)\)", str(args[2])) if len(args) > 2 else None
    return not location or match is None or f"{match.group(1)} {match.group(2)}" == location


def _limit_hit(frame: int, record: logging.LogRecord) -> None:
    args = record.args if isinstance(record.args, tuple) else ()
    limit, value, function = (list(args) + ["recompile_limit", "?", "a function"])[:3]
    line = f"torch._dynamo.config.{limit} ({value}) hit by {function}"
    with _STATS_LOCK:
        if frame in _WARNED_FRAMES:
            return
        _WARNED_FRAMES.add(frame)
        _STATS.recompile_limit_hits.append(line)
        for report in _FRAME_REPORTS.get(frame, []):  # last_report says so too
            report.notes.append(f"{line}: calls needing another graph run the unreduced model")
    warnings.warn(
        f"tokenreduce backend: {line}. Dynamo now runs calls that need another graph (a new input dtype, "
        f"device, rank or other guarded property) as the original, unreduced model, without tokenreduce. "
        f"Raise torch._dynamo.config.{limit}, keep the inputs' dtypes stable, or reduce the model ahead of time "
        f"with tokenreduce.compile(...).", RuntimeWarning, stacklevel=2)


_LISTENER = _RecompileLimitListener()


def _listen_for_recompile_limit() -> None:
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if _LISTENER not in logger.filters:
        logger.addFilter(_LISTENER)


def tokenreduce_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None,
                        **_: Any) -> Any:
    """Dynamo backend entry point."""
    settings = Settings.from_options(options or {})
    _listen_for_recompile_limit()
    frame, number = _current_compile()
    with _STATS_LOCK:
        _STATS.graphs += 1
        if frame is not None:
            if number is not None and number <= _FRAME_COMPILES.get(frame, -1):  # after torch._dynamo.reset()
                _WARNED_FRAMES.discard(frame)
                _FRAME_REPORTS.pop(frame, None)
            _FRAME_COMPILES[frame] = number if number is not None else -1
            _FRAMES[frame] = _frame_location()
    return _Specialised(gm, settings, frame)


def register() -> None:
    """Register under the name "tokenreduce" (the entry point does this lazily without an import)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "tokenreduce" not in _BACKENDS:
        register_backend(name="tokenreduce")(tokenreduce_backend)
