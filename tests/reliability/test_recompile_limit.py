"""When Dynamo's recompile limit is hit, calls of a function compiled with the tokenreduce backend run the
original, unreduced model: the backend says so once (a RuntimeWarning naming the limit and the way out) and
records it in `backend.stats()`."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from conftest import images, make_timm_vit
from reference import timm_vit_forward

from tokenreduce.compiler import backend


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Other tests compiled the same `forward`: start below Dynamo's recompile limit for it."""
    torch._dynamo.reset()


def test_recompile_limit_is_reported_once():
    model = make_timm_vit(depth=1)
    before = backend.stats()
    fast = torch.compile(model, backend="tokenreduce", dynamic=False,  # one graph per batch size
                         options={"method": "tome", "r": 2, "inner": "eager"})
    with warnings.catch_warnings(record=True) as caught, torch._dynamo.config.patch(recompile_limit=2):
        warnings.simplefilter("always")
        with torch.no_grad():
            for b in (1, 2):  # within the limit: reduced
                torch.testing.assert_close(fast(images(b)), timm_vit_forward(model, images(b), tome_r=[2]))
            assert not [w for w in caught if "recompile_limit" in str(w.message)]
            for b in (3, 4):  # past it: Dynamo runs the plain model
                torch.testing.assert_close(fast(images(b)), model(images(b)))
    notices = [w for w in caught if "recompile_limit" in str(w.message) and "tokenreduce" in str(w.message)]
    assert len(notices) == 1, [str(w.message) for w in caught]
    msg = str(notices[0].message)
    assert "(2)" in msg and "unreduced" in msg and "tokenreduce.compile" in msg
    after = backend.stats()
    assert len(after.recompile_limit_hits) == len(before.recompile_limit_hits) + 1
    assert "recompile_limit (2)" in after.recompile_limit_hits[-1]
    assert after.graphs - before.graphs == 2 and after.builds - before.builds == 2
    assert after.last_report is not None and after.last_report.blocks[0].tokens_out == 15
    assert any("recompile_limit (2)" in note and "unreduced" in note for note in after.last_report.notes)
