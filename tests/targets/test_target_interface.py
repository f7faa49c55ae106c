"""One target interface: every registered target lowers the same reduced graph with the same arguments.

* Every target in `tokenreduce.targets.names()` lowers ToMe r=2 on the tiny timm ViT
  (`ReducedModule.graph_module`, its example inputs, a `TargetOptions`) and its runner matches the eager
  graph at the example batch and, where it says it serves other batches, on fresh inputs at another batch.
  TensorRT is skipped with `available()`'s reason where it is not installed; its static check runs anyway,
  on the onnx target's file, and its `lower` then refuses with that reason before writing anything.
* Artefact targets write the file at `TargetOptions.output` only (no scratch left beside it), with a
  verification record, and the file passes their own `check`.
* Options are validated, devices a target cannot serve are refused, a static-batch graph gives a runner that
  says so.
* `tokenreduce.bench` takes its target list and its runners from the registry: a target registered for the
  test appears in `bench_targets()` and prepares both sides of a benchmark.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import onnx
import pytest
import torch
from conftest import TOL, images

import tokenreduce
from tokenreduce import bench, targets
from tokenreduce.errors import TokenReduceError
from tokenreduce.targets import base
from tokenreduce.targets.eager import EagerTarget

EXAMPLE_BATCH = 2
OTHER_BATCH = 3


@pytest.fixture(scope="module")
def reduced(timm_vit):
    return tokenreduce.compile(timm_vit, (images(EXAMPLE_BATCH),), method="tome", r=2, inner="eager",
                               count_model_flops=False)


@pytest.fixture(scope="module")
def lowerings(reduced, tmp_path_factory):
    """Each target lowered once (on first use) with the same arguments; artefacts into their own folder."""
    cache: dict[str, Any] = {}

    def lower(name: str) -> tuple[Any, Path]:
        if name not in cache:
            target = targets.get(name)
            folder = tmp_path_factory.mktemp(f"target-{name}")
            output = folder / f"model{target.suffix}" if isinstance(target, targets.ArtefactTarget) else None
            options = targets.TargetOptions(output=output)
            cache[name] = target.lower(reduced.graph_module, reduced.example_args, reduced.example_kwargs, options), folder
        return cache[name]

    return lower


def _require(name: str) -> None:
    ok, why = targets.get(name).available()
    if not ok:
        print(f"{name}: {why}")
        pytest.skip(f"{name} target not available here: {why}")


# ------------------------------------------------------------------------------------------------ registry
def test_registry_names_and_capabilities():
    assert targets.names() == ("eager", "inductor", "onnx", "tensorrt")
    assert targets.names(capability="runtime") == targets.names()
    assert targets.names(capability="artefact") == ("onnx", "tensorrt")
    assert [t.runtime for t in targets.all_targets()] == ["eager", "inductor", "onnxruntime", "tensorrt"]
    assert targets.get("onnx") is targets.by_runtime("onnxruntime")
    for name in targets.names("artefact"):
        assert isinstance(targets.get(name), targets.ArtefactTarget)
    with pytest.raises(TokenReduceError, match="unknown target 'tflite'; choose one of eager, inductor, onnx, tensorrt"):
        targets.get("tflite")
    with pytest.raises(TokenReduceError, match="unknown target capability 'fast'; choose one of runtime, artefact"):
        targets.names(capability="fast")


def test_register_refuses_duplicates(monkeypatch):
    monkeypatch.setattr(base, "REGISTRY", dict(base.REGISTRY))

    class Again(EagerTarget):
        runtime: ClassVar[str] = "eager-again"

    class SameLabel(EagerTarget):
        name: ClassVar[str] = "eager2"

    with pytest.raises(TokenReduceError, match="a target named 'eager' is already registered"):
        targets.register(Again())
    with pytest.raises(TokenReduceError, match="runtime label 'eager' is already used by 'eager'"):
        targets.register(SameLabel())


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", targets.names())
def test_target_matches_eager(name, reduced, lowerings):
    _require(name)
    lowered, folder = lowerings(name)
    target = targets.get(name)
    assert (lowered.target, lowered.runtime, lowered.batch) == (name, target.runtime, EXAMPLE_BATCH)
    assert lowered.dynamic_batch  # the graph was captured with a symbolic batch
    for batch, seed in ((EXAMPLE_BATCH, 1), (OTHER_BATCH, 7)):
        x = images(batch, seed=seed)
        assert lowered.serves(batch)
        with torch.no_grad():
            expected = reduced.graph_module(x)
            got = lowered(x)
            lowered.bind((x,), {})()  # the timed form runs too
        assert isinstance(got, torch.Tensor) and got.shape == expected.shape == (batch, 5)
        torch.testing.assert_close(got.cpu(), expected, atol=TOL, rtol=0)
    if isinstance(target, targets.ArtefactTarget):
        assert lowered.path == folder / f"model{target.suffix}"
        assert sorted(p.name for p in folder.iterdir()) == [lowered.path.name]  # no scratch left beside it
        v = lowered.verification
        assert v.problems == [] and v.verified and v.max_abs_diff is not None and v.max_abs_diff <= v.atol == TOL
        if name == "onnx":  # the TensorRT check reads ONNX models, not engines: see the next test
            assert target.check(lowered.path) == []
    else:
        assert lowered.path is None and lowered.verification is None


def test_onnx_artefact_is_static_and_tensorrt_compatible(lowerings):
    """The TensorRT static check runs on any machine: on the onnx target's file it finds nothing."""
    _require("onnx")
    lowered, _ = lowerings("onnx")
    model = onnx.load(str(lowered.path))
    assert targets.get("onnx").check(model) == []
    assert targets.get("tensorrt").check(lowered.path) == []
    assert targets.get("tensorrt").check(model) == []
    assert {"TopK", "ScatterElements"} <= {n.op_type for n in model.graph.node}  # the reduction is in the file


def test_tensorrt_without_tensorrt_names_what_is_missing(reduced, tmp_path):
    ok, why = targets.get("tensorrt").available()
    if ok:
        pytest.skip(f"TensorRT {why} and CUDA are available here: the refusal cannot happen")
    out = tmp_path / "model.engine"
    with pytest.raises(TokenReduceError) as err:
        targets.get("tensorrt").lower(reduced.graph_module, reduced.example_args, reduced.example_kwargs,
                                      targets.TargetOptions(output=out))
    assert str(err.value) == f"the tensorrt target cannot run here: {why}"
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("kwargs, message", [
    (dict(atol=-1.0), "atol must be a number >= 0"),
    (dict(threads=0), "threads must be a positive integer"),
    (dict(profile_batch=(8, 1, 32)), r"profile_batch must be \(min, opt, max\)"),
    (dict(device="gpu"), "device must be 'cpu', 'cuda' or 'cuda:N'"),
    (dict(workspace_gb=0), "workspace_gb must be > 0"),
])
def test_options_are_validated(kwargs, message):
    with pytest.raises(TokenReduceError, match=message):
        targets.TargetOptions(**kwargs)


def test_devices_a_target_cannot_serve_are_refused(reduced):
    gm, args, kwargs = reduced.graph_module, reduced.example_args, reduced.example_kwargs
    with pytest.raises(TokenReduceError, match="runs where the inputs are"):
        targets.get("eager").lower(gm, args, kwargs, targets.TargetOptions(device="cuda"))
    with pytest.raises(TokenReduceError, match="onnxruntime CPU session"):
        targets.get("onnx").lower(gm, args, kwargs, targets.TargetOptions(device="cuda"))
    with pytest.raises(TokenReduceError, match="CUDA device"):
        targets.get("tensorrt").lower(gm, args, kwargs, targets.TargetOptions(device="cpu"))


@pytest.mark.parametrize("name", ["eager", "inductor", "tensorrt"])
def test_targets_that_run_the_graph_as_is_refuse_a_precision(reduced, name):
    """Only the onnx target converts precision; the others must refuse it, not ignore it."""
    gm, args, kwargs = reduced.graph_module, reduced.example_args, reduced.example_kwargs
    with pytest.raises(TokenReduceError, match="cannot honour precision='fp16'") as info:
        targets.get(name).lower(gm, args, kwargs, targets.TargetOptions(precision="fp16"))
    assert info.value.setting == "precision"


def test_static_batch_graph_gives_a_static_runner(timm_vit):
    red = tokenreduce.compile(timm_vit, (images(EXAMPLE_BATCH),), method="tome", r=2, inner="eager",
                              count_model_flops=False, dynamic_batch=False)
    assert base.graph_batch_is_dynamic(red.graph_module) is False
    for options in (targets.TargetOptions(), targets.TargetOptions(dynamic_batch=False)):
        lowered = targets.get("eager").lower(red.graph_module, red.example_args, red.example_kwargs, options)
        assert not lowered.dynamic_batch and lowered.serves(EXAMPLE_BATCH) and not lowered.serves(OTHER_BATCH)
    plain = targets.get("eager").lower(timm_vit, red.example_args, {}, targets.TargetOptions())
    assert plain.runner is timm_vit and plain.dynamic_batch  # a plain module runs at any batch


# ------------------------------------------------------------------------------------------------ bench
def test_bench_targets_come_from_the_registry():
    assert bench.TARGETS == tuple(t.runtime for t in targets.all_targets(targets.RUNTIME))
    assert bench.TARGETS == ("eager", "inductor", "onnxruntime", "tensorrt")
    assert {label: t.name for label, t in bench.bench_targets().items()} == {
        "eager": "eager", "inductor": "inductor", "onnxruntime": "onnx", "tensorrt": "tensorrt"}
    with pytest.raises(TokenReduceError, match="unknown target 'tvm'; choose one of eager, inductor, onnxruntime"):
        bench.prepare_baseline(torch.nn.Identity(), (torch.zeros(1, 2),), {}, "tvm")


class Probe(EagerTarget):
    """Eager under another name that records what it was asked to lower."""

    name: ClassVar[str] = "probe"
    runtime: ClassVar[str] = "probe-runtime"

    def __init__(self) -> None:
        self.calls: list[tuple[type, int, bool]] = []

    def lower(self, gm: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
              options: targets.TargetOptions) -> targets.Lowered:
        self.calls.append((type(gm), args[0].shape[0], options.dynamic_batch))
        return super().lower(gm, args, kwargs, options)


def test_bench_prepares_both_sides_through_a_registered_target(monkeypatch, timm_vit):
    probe = Probe()
    monkeypatch.setattr(base, "REGISTRY", dict(base.REGISTRY))
    targets.register(probe)
    assert "probe-runtime" in bench.bench_targets()
    x = images(EXAMPLE_BATCH)
    unreduced = bench.prepare_baseline(timm_vit, (x,), {}, "probe-runtime")
    red, report = bench.prepare_reduced(timm_vit, (x,), {}, "probe-runtime", dict(method="tome", r=2))
    # the plain module as it is (the probe accepts modules), then the rewritten graph
    assert probe.calls[0] == (type(timm_vit), EXAMPLE_BATCH, True)
    assert issubclass(probe.calls[1][0], torch.fx.GraphModule) and probe.calls[1][1:] == (EXAMPLE_BATCH, True)
    assert (unreduced.runtime, red.runtime) == ("probe-runtime", "probe-runtime")
    timing = bench.interleaved(unreduced.bind((x,), {}), red.bind((x,), {}), repeats=2, warmup=0)
    row = bench.make_row("tome r=2", EXAMPLE_BATCH, "probe-runtime", timing, report)
    assert row.target == "probe-runtime" and row.repeats == 2 and report.flops_ratio == row.flops_ratio
