"""One interface for every place a rewritten graph can run: the `Target` contract, its options, its result
and the registry that the compiler, `bench` and the command line read their target lists from.

Every target takes the same arguments: the rewritten `fx.GraphModule` (`ReducedModule.graph_module`), the
example inputs `(args, kwargs)` and a `TargetOptions`; it returns a `Lowered`: a runner called like the
model, a `bind` that fixes inputs for timing, whether the runner serves every batch size, and, for targets
that write a file, the path written and what was checked before it was written (`Verification`).

Capabilities (`targets.names(capability=...)`):
- `runtime`: lowering gives a runner in this process (every registered target).
- `artefact`: lowering writes a deployable file (ONNX model, TensorRT engine) with a static `check` of it.

A target that cannot lower here (a missing package, no CUDA device) says so in `available()` and raises a
`TokenReduceError` naming what is missing from `lower`; none of them falls back to another target.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils import _pytree as pytree

from tokenreduce.errors import TokenReduceError
from tokenreduce.util.batch import tensor_leaves

RUNTIME = "runtime"
PRECISIONS = ("fp32", "fp16", "int8")
ARTEFACT = "artefact"
CAPABILITIES = (RUNTIME, ARTEFACT)

Call = Callable[[], Any]
"""A zero-argument call with its inputs already bound and converted (conversion is never timed)."""


def default_threads() -> int:
    """CPU cores available to this process."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class TargetOptions:
    """How to lower. Fields a target does not use are ignored by it (documented per field).

    dynamic_batch: targets that compile or export keep the batch dimension symbolic where the graph has it
        symbolic (inductor: a symbolic batch for Dynamo; onnx/tensorrt: a dynamic batch axis / engine
        profile); False makes them specialise to the example batch. A graph captured with a static batch
        stays static whatever this says, and eager runs the graph as it is. `Lowered.dynamic_batch` tells
        what was lowered.
    threads: CPU threads of the runtime (onnxruntime intra-op threads); None: every core of this process.
    atol: largest absolute difference from the eager graph that verification accepts (onnx, tensorrt).
    output: where an artefact target writes its file; None writes to a scratch folder that is removed once
        the runner holds the model in memory (`Lowered.path` is then None). Runtime-only targets ignore it.
    device: "cpu", "cuda" or "cuda:N"; None: the device of the example inputs (cpu when there are none).
    verify: artefact targets compare their runtime with the eager graph before writing (skip only if False).
    opset: ONNX opset for the export (None: the exporter's default).
    precision: onnx: the file's precision, "fp32", "fp16" or "int8" (`targets/quantize.py`: the plan subgraph
        stays fp32 and unquantized; fp16/int8 files are verified with a per-precision tolerance). Targets
        that cannot honour a precision other than "fp32" refuse it (eager, inductor; tensorrt: use `fp16`).
    calibration: onnx int8: a folder of calibration inputs (images or .npy arrays) for static quantization;
        None: dynamic quantization, which a model with float inputs (vision) refuses.
    unreduced: onnx fp16/int8: the unreduced graph for the same inputs (e.g. `method="none"`); when given,
        the tolerance also allows what the precision does to the unreduced model (`quantize.tolerance`).
    fp16: tensorrt: build the engine with fp16 kernels allowed (loosen `atol` accordingly).
    profile_batch: tensorrt: the engine's (min, opt, max) batch profile when the batch is dynamic.
    workspace_gb: tensorrt: builder workspace limit.
    fused_attention: onnx: export each attention without mask or dropout as onnxruntime's fused
        `com.microsoft.MultiHeadAttention` (`passes/ort_attention.py`; no materialised `[B, H, N, N]` score
        tensor, which long-sequence models such as 1024-px diffusion UNets need to fit in memory). The file then
        runs only in onnxruntime; fp32 only; the tensorrt target refuses it; eager and inductor ignore it (they
        run fused SDPA already).
    inside_torch_compile: the caller is a `torch.compile` backend (already inside Dynamo): inductor compiles the
        graph as it is, specialised to the example shapes, instead of wrapping it in another `torch.compile`.
    """

    dynamic_batch: bool = True
    threads: int | None = None
    atol: float = 1e-4
    output: Path | None = None
    device: str | None = None
    verify: bool = True
    opset: int | None = None
    precision: str = "fp32"
    calibration: Path | None = None
    unreduced: Any = field(default=None, compare=False, repr=False)
    fp16: bool = False
    profile_batch: tuple[int, int, int] = (1, 8, 32)
    workspace_gb: float = 4.0
    fused_attention: bool = False
    inside_torch_compile: bool = False

    def __post_init__(self) -> None:
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise TokenReduceError(f"threads must be a positive integer or None, got {self.threads!r}")
        if not isinstance(self.atol, (int, float)) or not self.atol >= 0:
            raise TokenReduceError(f"atol must be a number >= 0, got {self.atol!r}")
        if self.output is not None:
            object.__setattr__(self, "output", Path(self.output))
        if self.precision not in PRECISIONS:
            raise TokenReduceError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
                                   setting="precision")
        if self.calibration is not None:
            if self.precision != "int8":
                raise TokenReduceError(f"calibration inputs are for precision='int8' (static quantization); "
                                       f"precision is {self.precision!r}", setting="calibration",
                                       hint="precision='int8'")
            object.__setattr__(self, "calibration", Path(self.calibration))
        if self.fused_attention and self.precision != "fp32":
            raise TokenReduceError(f"fused_attention exports fp32 attention (onnxruntime's MultiHeadAttention); "
                                   f"precision {self.precision!r} is not supported with it", setting="precision",
                                   hint="precision='fp32' or fused_attention=False")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise TokenReduceError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from exc
        lo, opt, hi = self.profile_batch
        if not 1 <= lo <= opt <= hi:
            raise TokenReduceError(f"profile_batch must be (min, opt, max) with 1 <= min <= opt <= max, "
                                   f"got {self.profile_batch}")
        if not self.workspace_gb > 0:
            raise TokenReduceError(f"workspace_gb must be > 0, got {self.workspace_gb!r}")

    def resolved_device(self, args: Any, kwargs: Any = None) -> torch.device:
        """`device`, or the device of the first example tensor, or cpu."""
        if self.device is not None:
            return torch.device(self.device)
        leaves = tensor_leaves((args, kwargs or {}))
        return leaves[0].device if leaves else torch.device("cpu")


@dataclass
class Verification:
    """What an artefact target checked before it wrote its file."""

    problems: list[str]  # the target's static check (empty: passed; a file is only written when empty)
    verified: bool  # the target's runtime was compared with the eager graph on the example inputs
    max_abs_diff: float | None  # largest difference seen (None: not verified)
    atol: float  # the tolerance it was held to
    precision: str = "fp32"  # onnx: the file's precision
    tolerance: str = ""  # fp16/int8: how the tolerance was set (`quantize.Tolerance.describe`)


@dataclass
class Lowered:
    """A graph lowered onto a target. Call it like the model (`lowered(*args, **kwargs)`), or `bind` inputs
    once for repeated timed calls (the bound call returns the target's native outputs, e.g. numpy arrays
    for onnxruntime; `__call__` returns the eager graph's output structure)."""

    target: str  # registry name ("onnx")
    runtime: str  # what the runner runs in ("onnxruntime"); the label `bench` reports
    runner: Callable[..., Any] = field(repr=False)
    binder: Callable[[tuple[Any, ...], dict[str, Any]], Call] = field(repr=False)
    batch: int | None  # example batch it was lowered with
    dynamic_batch: bool  # the runner serves other batch sizes (within `batch_range` when set)
    batch_range: tuple[int, int] | None = None  # (min, max) batch a dynamic runner accepts; None: any
    path: Path | None = None  # artefact targets: the file written (None: only held in memory)
    verification: Verification | None = None
    export: Any = None  # onnx/tensorrt: the `OnnxExport` record of the ONNX model behind the runner
    threads: int | None = None  # CPU threads the runner's runtime uses (onnxruntime intra-op); None: not set by it

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.runner(*args, **kwargs)

    def serves(self, batch: int) -> bool:
        """Whether this runner can be called at `batch` without lowering again."""
        if not self.dynamic_batch:
            return batch == self.batch
        return self.batch_range is None or self.batch_range[0] <= batch <= self.batch_range[1]

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Call:
        return self.binder(tuple(args), dict(kwargs))


def require_fp32(options: TargetOptions, target: str, alternative: str) -> None:
    """Refuse a precision other than fp32 on a target that only runs the graph as it is."""
    if options.precision != "fp32":
        raise TokenReduceError(f"the {target} target runs the graph in its own dtype and cannot honour "
                               f"precision={options.precision!r}; {alternative}", setting="precision",
                               hint="precision='fp32'")


def same_device(options: TargetOptions, args: tuple[Any, ...], kwargs: dict[str, Any], target: str) -> torch.device:
    """The device to lower for; refuses a requested device that differs from the example inputs' device
    (eager and inductor run where the inputs are, and move no tensors)."""
    device = options.resolved_device(args, kwargs)
    inputs = TargetOptions().resolved_device(args, kwargs)
    if options.device is not None and (device.type, device.index or 0) != (inputs.type, inputs.index or 0):
        raise TokenReduceError(f"the {target} target runs where the inputs are ({inputs}); device={options.device!r} "
                               f"differs: move the model and the example inputs to {options.device} first")
    return device


def fill_tensor_leaves(template: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """`template`'s structure with its tensor leaves replaced, in order, by `tensors` (an exported runtime's
    flat outputs put back into the eager graph's output structure; non-tensor leaves are kept)."""
    leaves, spec = pytree.tree_flatten(template)
    n_tensors = sum(isinstance(leaf, torch.Tensor) for leaf in leaves)
    if n_tensors != len(tensors):
        raise TokenReduceError(f"the runtime returned {len(tensors)} outputs, the eager graph {n_tensors}")
    it = iter(tensors)
    return pytree.tree_unflatten([next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], spec)


def call_binder(fn: Callable[..., Any]) -> Callable[[tuple[Any, ...], dict[str, Any]], Call]:
    """`bind` for runners that take the model's inputs as they are (eager, inductor)."""
    def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        return lambda: fn(*args, **kwargs)

    return bind


def graph_batch_is_dynamic(gm: Any) -> bool | None:
    """Whether a captured graph has a symbolic batch: True/False from its placeholders' `meta["val"]`
    (torch.export / Dynamo graphs), True for a plain module (it runs at any batch), None when a graph
    carries no shape metadata (then only the caller knows)."""
    if not isinstance(gm, torch.fx.GraphModule):
        return True
    seen = False
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > 0:
            seen = True
            if isinstance(val.shape[0], torch.SymInt):
                return True
    return False if seen else None


class Target(ABC):
    """A place a rewritten graph runs. Subclasses set the class attributes and implement `lower`."""

    name: ClassVar[str]  # registry key: what `--to` / `Settings.inner` / `targets.get` use
    runtime: ClassVar[str]  # label of what the runner runs in (bench rows, `bench --target`)
    capabilities: ClassVar[frozenset[str]] = frozenset({RUNTIME})
    accepts_modules: ClassVar[bool] = False  # lowers any nn.Module as is (no capture needed for a baseline)
    summary: ClassVar[str]  # one line for help texts

    def available(self) -> tuple[bool, str]:
        """(True, detail) when this target can lower on this machine, else (False, what is missing)."""
        return True, ""

    @abstractmethod
    def lower(self, gm: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
              options: TargetOptions) -> Lowered:
        """Lower `gm` (the rewritten graph, or for `accepts_modules` targets any module) for these inputs."""

    def require_available(self) -> None:
        ok, why = self.available()
        if not ok:
            raise TokenReduceError(f"the {self.name} target cannot run here: {why}")


class ArtefactTarget(Target):
    """A target that writes a deployable file, checks it statically and verifies its runtime numerically."""

    capabilities: ClassVar[frozenset[str]] = frozenset({RUNTIME, ARTEFACT})
    suffix: ClassVar[str]  # the file suffix it writes (".onnx", ".engine")

    @abstractmethod
    def check(self, model: Any) -> list[str]:
        """Static problems of an ONNX model (a ModelProto or a path) for this target; [] when fit. Runs on
        any machine, without the target's runtime."""


# --------------------------------------------------------------------------------------------- registry
REGISTRY: dict[str, Target] = {}


def register(target: Target) -> Target:
    """Add a target under its `name` (refuses a second target with the same name or runtime label)."""
    if target.name in REGISTRY:
        raise TokenReduceError(f"a target named {target.name!r} is already registered")
    clash = [t.name for t in REGISTRY.values() if t.runtime == target.runtime]
    if clash:
        raise TokenReduceError(f"target {target.name!r}: runtime label {target.runtime!r} is already used by "
                               f"{clash[0]!r}")
    bad = target.capabilities - set(CAPABILITIES)
    if bad:
        raise TokenReduceError(f"target {target.name!r}: unknown capabilities {sorted(bad)}; "
                               f"choose from {', '.join(CAPABILITIES)}")
    REGISTRY[target.name] = target
    return target


def _check_capability(capability: str | None) -> None:
    if capability is not None and capability not in CAPABILITIES:
        raise TokenReduceError(f"unknown target capability {capability!r}; choose one of {', '.join(CAPABILITIES)}")


def all_targets(capability: str | None = None) -> list[Target]:
    """Registered targets in registration order, optionally only those with `capability`."""
    _check_capability(capability)
    return [t for t in REGISTRY.values() if capability is None or capability in t.capabilities]


def names(capability: str | None = None) -> tuple[str, ...]:
    """Registered target names, optionally only those with `capability` ("runtime" or "artefact")."""
    return tuple(t.name for t in all_targets(capability))


def get(name: str) -> Target:
    """The registered target called `name`."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise TokenReduceError(f"unknown target {name!r}; choose one of {', '.join(REGISTRY)}") from None


def by_runtime(label: str) -> Target:
    """The registered target whose runner runs in `label` ("onnxruntime" -> the onnx target)."""
    for t in REGISTRY.values():
        if t.runtime == label:
            return t
    raise TokenReduceError(f"unknown target {label!r}; choose one of {', '.join(t.runtime for t in REGISTRY.values())}")
