"""A long-lived process that compiles and frees models does not keep what each compile traced: the
compiled module and the model are freed, and the Python heap grows by a bounded amount per compile.

What remains per compile is torch's (torch 2.14: a dynamic-shape torch.export leaves its shape
environment reachable only through C++, and torch.fx keeps generated source in `linecache`), about 0.2 MB
for this model; the fake-tensor results cached on that environment and the `ShapeEnv` memo entries (0.2 to
0.8 MB more, growing with every compile) are released by tokenreduce (`capture.release_fake_caches`)."""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import torch
from conftest import images, make_timm_vit

import tokenreduce

BOUND_PER_COMPILE = 360_000  # bytes of Python heap: ~220-240 KB measured with the caches released, 450 KB-1 MB without


def _compile_and_free(x: torch.Tensor) -> list[weakref.ref]:
    model = make_timm_vit(depth=2)
    red = tokenreduce.compile(model, (x,), method="tome", r=2, inner="eager", count_model_flops=False)
    with torch.no_grad():
        red(x)
    return [weakref.ref(model), weakref.ref(red), weakref.ref(red.graph_module)]


def test_compile_and_free_does_not_accumulate():
    x = images(2)
    _compile_and_free(x)  # warm up torch's own one-off caches
    refs = []
    heap = []
    tracemalloc.start(1)
    try:
        for _ in range(4):
            refs += _compile_and_free(x)
            gc.collect()
            heap.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert not [r for r in refs if r() is not None], "a model or compiled module outlived its last reference"
    growth = (heap[-1] - heap[0]) / (len(heap) - 1)  # per compile, after the first traced one
    assert growth < BOUND_PER_COMPILE, f"{growth / 1e3:.0f} KB of Python heap kept per compile"
