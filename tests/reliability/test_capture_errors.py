"""`capture.export_graph`: only a model that specialises its batch is exported with a static batch, and the
capture says so and why (`Captured.static_batch_reason`); any other export failure surfaces its own cause."""

from __future__ import annotations

import pytest
import torch

from tokenreduce import TokenReduceError
from tokenreduce.compiler.capture import export_graph


class BatchOfTwo(torch.nn.Module):
    """Adds a [2, 4] buffer: the batch must be 2."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.ones(2, 4))

    def forward(self, x):
        return x + self.offset


class DataDependent(torch.nn.Module):
    def forward(self, x):
        return x + 1 if x.sum() > 0 else x - 1


class AnyBatch(torch.nn.Module):
    def forward(self, x):
        return x * 2


def test_specialised_batch_is_static_with_a_reason():
    cap = export_graph(BatchOfTwo(), (torch.randn(2, 4),), {}, dynamic_batch=True)
    assert not cap.dynamic_batch
    assert cap.static_batch_reason.startswith("static batch: ")
    assert "constant (2)" in cap.static_batch_reason


def test_dynamic_batch_has_no_reason():
    cap = export_graph(AnyBatch(), (torch.randn(2, 4),), {}, dynamic_batch=True)
    assert cap.dynamic_batch and cap.static_batch_reason == ""
    assert export_graph(AnyBatch(), (torch.randn(2, 4),), {}, dynamic_batch=False).static_batch_reason == ""


def test_other_export_failures_surface_their_cause():
    with pytest.raises(TokenReduceError, match="DataDependent.*data-dependent"):
        export_graph(DataDependent(), (torch.randn(2, 4),), {}, dynamic_batch=True)
