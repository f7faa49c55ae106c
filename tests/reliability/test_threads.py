"""Concurrent first calls of one torch.compile'd model at new batch sizes: every thread gets the eager
reference's result, and the process can still compile afterwards (unguarded builds raced in torch.export:
"Trying to pop empty mode stack", 0 of 8 results)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch._dynamo
from conftest import images, make_timm_vit
from reference import timm_vit_forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Other tests compiled the same `forward`: start below Dynamo's recompile limit for it."""
    torch._dynamo.reset()


def test_concurrent_first_calls_at_new_batch_sizes():
    model = make_timm_vit(depth=2)
    fast = torch.compile(model, backend="tokenreduce", options={"method": "tome", "r": 3, "inner": "eager"})
    with torch.no_grad():
        fast(images(2))  # compiled once; every batch size below is new
    batches = [3, 4, 5, 6]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(batches))

    def worker(b: int) -> None:
        try:
            start.wait(timeout=60)
            with torch.no_grad():
                for call in range(2):
                    results[(b, call)] = fast(images(b, seed=b))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(b,), daemon=True) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not errors, repr(errors[0])
    assert len(results) == 2 * len(batches)
    with torch.no_grad():
        for (b, _), got in results.items():
            torch.testing.assert_close(got, timm_vit_forward(model, images(b, seed=b), tome_r=[3, 3]),
                                       atol=1e-4, rtol=1e-4)
        other = torch.compile(make_timm_vit(depth=1), backend="tokenreduce",
                              options={"method": "tome", "r": 2, "inner": "eager"})
        assert other(images(2)).shape == (2, 5)  # the process still compiles
