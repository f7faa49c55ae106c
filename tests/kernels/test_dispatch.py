"""The escape hatch that forces the pure-torch references on CUDA (`tokenreduce/kernels/dispatch.py`).

- The decision: default "triton"; `$TOKENREDUCE_KERNELS` read at every decision; the Python option wins
  over it and `None` hands back to it; the context managers restore the previous choice, also when the
  block raises; any other value is an error naming the valid ones (variable and option alike).
- The ops' CUDA registrations: with "reference" chosen they run the reference (and say so once per op);
  with "triton" they call the kernel's launcher, which refuses these CPU tensors (proof the kernel path
  was taken: no GPU here).
- The fusion pass on a graph whose fake values sit on CUDA: fires with "triton" (control), not with
  "reference" from either the option or the variable (a note says why), still with `force=True`, and an
  invalid variable is an error there too.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._guards import detect_fake_mode
from torch.utils import _pytree as pytree

import tokenreduce
from tokenreduce.kernels import dispatch, kernel_backend, set_kernel_backend, use_kernel_backend, use_reference_kernels
from tokenreduce.passes.fuse_attention_scores import fuse_attention_scores

FUSED = torch.ops.tokenreduce.attention_with_scores.default


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    set_kernel_backend(None)
    yield
    set_kernel_backend(None)


# ------------------------------------------------------------------------------------------------ decision
def test_default_is_triton():
    assert kernel_backend() == "triton" and dispatch.reference_reason() is None


@pytest.mark.parametrize("value,expected", [("reference", "reference"), ("triton", "triton"),
                                            (" reference ", "reference"), ("", "triton")])
def test_environment_variable(monkeypatch, value, expected):
    monkeypatch.setenv("TOKENREDUCE_KERNELS", value)
    assert kernel_backend() == expected


def test_environment_variable_is_read_at_every_decision(monkeypatch):
    monkeypatch.setenv("TOKENREDUCE_KERNELS", "reference")
    assert "TOKENREDUCE_KERNELS=reference" in dispatch.reference_reason()
    monkeypatch.setenv("TOKENREDUCE_KERNELS", "triton")
    assert dispatch.reference_reason() is None


@pytest.mark.parametrize("value", ["cuda", "Reference", "torch", "none"])
def test_invalid_environment_value_names_the_valid_ones(monkeypatch, value):
    monkeypatch.setenv("TOKENREDUCE_KERNELS", value)
    with pytest.raises(tokenreduce.TokenReduceError, match=r"\$TOKENREDUCE_KERNELS is .*'triton', 'reference'"):
        kernel_backend()


def test_option_wins_over_the_variable_and_none_hands_back(monkeypatch):
    monkeypatch.setenv("TOKENREDUCE_KERNELS", "reference")
    set_kernel_backend("triton")
    assert kernel_backend() == "triton"
    set_kernel_backend(None)
    assert kernel_backend() == "reference"
    monkeypatch.delenv("TOKENREDUCE_KERNELS")
    set_kernel_backend("reference")
    assert kernel_backend() == "reference" and "set_kernel_backend" in dispatch.reference_reason()


@pytest.mark.parametrize("bad", ["cuda", "", "Triton"])
def test_invalid_option_names_the_valid_ones(bad):
    for call in (lambda: set_kernel_backend(bad), lambda: use_kernel_backend(bad).__enter__()):
        with pytest.raises(tokenreduce.TokenReduceError, match="valid values: 'triton', 'reference'"):
            call()
    assert kernel_backend() == "triton"


def test_context_managers_restore_the_previous_choice_even_on_error():
    set_kernel_backend("reference")
    with use_kernel_backend("triton"):
        assert kernel_backend() == "triton"
        with use_reference_kernels():
            assert kernel_backend() == "reference"
        assert kernel_backend() == "triton"
    assert kernel_backend() == "reference"
    set_kernel_backend(None)
    with pytest.raises(RuntimeError, match="inside"):
        with use_reference_kernels():
            raise RuntimeError("inside")
    assert kernel_backend() == "triton" and dispatch.reference_reason() is None


# ------------------------------------------------------------------------------------------------ ops
def test_cuda_registration_runs_the_reference_when_chosen(monkeypatch):
    pytest.importorskip("triton")
    from tokenreduce.kernels import ops, reference

    monkeypatch.setattr(ops, "_WARNED", set())
    x = torch.randn(2, 5, 8)
    slot = torch.tensor([[0, 0, 1, 2, 2], [0, 1, 1, 1, 2]])
    with use_reference_kernels(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ops._apply_plan_cuda(x, slot, None, None, 3)
    exp = reference.apply_plan(x, slot, None, None, 3)
    assert all(torch.equal(a, b) for a, b in zip(out, exp))
    assert any("apply_plan" in str(w.message) and "chose the reference" in str(w.message) for w in caught)
    # the Triton path: its launcher is reached and refuses CPU tensors (no interpreter in this process)
    with pytest.raises(tokenreduce.TokenReduceError, match="needs CUDA tensors"):
        ops._apply_plan_cuda(x, slot, None, None, 3)


# ------------------------------------------------------------------------------------------------ fusion pass
class _Pair(torch.nn.Module):
    """An SDPA and `query_row_scores` of its CLS row (EViT's pair)."""

    def forward(self, q, k, v):  # type: ignore[no-untyped-def]
        out = F.scaled_dot_product_attention(q, k, v)
        return out, torch.ops.tokenreduce.query_row_scores(q, k, None, q.shape[-1] ** -0.5, 0)


def _cuda_pair_graph() -> torch.fx.GraphModule:
    """The pair exported on the CPU, its fake values then moved to a (fake) CUDA device."""
    q, k, v = (torch.randn(2, 3, 9, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    gm = torch.export.export(_Pair(), (q, k, v)).module()
    vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    mode = detect_fake_mode(vals)
    assert mode is not None
    with mode:
        for n in gm.graph.nodes:
            if "val" in n.meta:
                n.meta["val"] = pytree.tree_map(lambda t: t.to("cuda") if isinstance(t, torch.Tensor) else t,
                                                n.meta["val"])
    return gm


def test_fusion_fires_on_cuda_graphs_with_triton():
    res = fuse_attention_scores(_cuda_pair_graph(), None)
    assert res.rewrites == 1, res.notes


@pytest.mark.parametrize("how", ["option", "environment"])
def test_fusion_does_not_fire_with_the_reference_chosen(monkeypatch, how):
    gm = _cuda_pair_graph()
    if how == "environment":
        monkeypatch.setenv("TOKENREDUCE_KERNELS", "reference")
        res = fuse_attention_scores(gm, None)
    else:
        with use_reference_kernels():
            res = fuse_attention_scores(gm, None)
    assert res.rewrites == 0 and not res.changed
    assert not [n for n in gm.graph.nodes if n.target is FUSED]
    assert len(res.notes) == 1 and "chose the reference implementation" in res.notes[0]


def test_force_still_fuses_with_the_reference_chosen():
    with use_reference_kernels():
        res = fuse_attention_scores(_cuda_pair_graph(), None, force=True)
    assert res.rewrites == 1


def test_fusion_refuses_an_invalid_variable(monkeypatch):
    monkeypatch.setenv("TOKENREDUCE_KERNELS", "fast")
    with pytest.raises(tokenreduce.TokenReduceError, match="TOKENREDUCE_KERNELS"):
        fuse_attention_scores(_cuda_pair_graph(), None)
