"""Autograd through reduced models: the tokenreduce ops' backward formulas against numerical gradients and
the pure-torch references, ToMe/EViT fine-tuning gradients against the independent reference, and no
silent detach anywhere (the torch.compile backend, a runner that compiled a copy of the weights)."""

from __future__ import annotations

import copy

import pytest
import reference
import torch
import torch._dynamo
from conftest import images, make_timm_vit
from torch.autograd import gradcheck

import tokenreduce
from tokenreduce import TokenReduceError
from tokenreduce.compiler.api import ReducedModule
from tokenreduce.kernels import reference as kref

ops = torch.ops.tokenreduce
F64 = torch.float64
# query_row_scores computes in float32 by design, so its numerical Jacobian needs a larger step
ROW_TOL = dict(eps=1e-3, atol=1e-4, rtol=1e-3, fast_mode=True)


def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).requires_grad_()


SLOT = torch.tensor([[0, 1, 1, 2, 4, 3], [0, 0, 2, 3, 1, 4]])  # n_out = 4; slot 4 = dropped


@pytest.mark.parametrize("with_weight, with_size", [(True, True), (False, True), (False, False), (True, False)])
def test_apply_plan_gradcheck(with_weight, with_size):
    x = _x(2, 6, 3)
    w = (torch.rand(2, 6, dtype=F64) + 0.5).requires_grad_()
    s = (torch.rand(2, 6, dtype=F64) + 1.0).requires_grad_()

    def f(x, w, s):
        return ops.apply_plan(x, SLOT, w if with_weight else None, s if with_size else None, 4)

    assert gradcheck(f, (x, w, s), fast_mode=True)


def test_apply_plan_backward_equals_reference_autograd():
    x, w, s = _x(2, 6, 3), (torch.rand(2, 6, dtype=F64) + 0.5).requires_grad_(), (torch.rand(2, 6, dtype=F64) + 1)
    s.requires_grad_()
    got = torch.autograd.grad([t.sum() * (i + 1) for i, t in enumerate(ops.apply_plan(x, SLOT, w, s, 4))], (x, w, s))
    exp = torch.autograd.grad([t.sum() * (i + 1) for i, t in enumerate(kref.apply_plan(x, SLOT, w, s, 4))], (x, w, s))
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("row", [0, -1, 2])
def test_query_row_scores_gradcheck(row):
    q, k = _x(2, 2, 4, 3, seed=1), _x(2, 2, 4, 3, seed=2)
    bias = _x(2, 1, 4, 4, seed=3)
    assert gradcheck(lambda q, k, b: ops.query_row_scores(q, k, b, 0.5, row), (q, k, bias), **ROW_TOL)
    keep = torch.rand(2, 1, 1, 4) > 0.3
    keep[..., 0] = True
    assert gradcheck(lambda q, k: ops.query_row_scores(q, k, keep, 0.5, row), (q, k), **ROW_TOL)
    got = torch.autograd.grad(ops.query_row_scores(q, k, bias, 0.5, row).square().sum(), (q, k, bias))
    exp = torch.autograd.grad(kref.query_row_scores(q, k, bias, 0.5, row).square().sum(), (q, k, bias))
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fuse", [True, False])
def test_topk_plan_weight_is_differentiable_where_it_is_a_score(fuse):
    scores = torch.rand(2, 7, dtype=F64).requires_grad_()
    slot, weight, rep = ops.topk_plan(scores, 3, 1, fuse, None)
    assert not slot.requires_grad and not rep.requires_grad and weight.requires_grad
    assert gradcheck(lambda s: ops.topk_plan(s, 3, 1, fuse, None)[1], (scores,), fast_mode=True)


def test_tome_plan_outputs_are_non_differentiable():
    k = _x(2, 2, 7, 4)
    assert not any(t.requires_grad for t in ops.tome_plan(k, 2, 1, None))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_scores_gradcheck(causal):
    q, k, v = _x(1, 2, 4, 3, seed=1), _x(1, 2, 4, 3, seed=2), _x(1, 2, 4, 3, seed=4)
    bias = _x(1, 1, 4, 4, seed=3)
    assert gradcheck(lambda q, k, v, b: ops.attention_with_scores(q, k, v, None if causal else b, 0.5, causal, 0),
                     (q, k, v, bias), **ROW_TOL)


# ------------------------------------------------------------------------------------------ fine-tuning
@pytest.fixture
def differentiable_reference(monkeypatch):
    """The test reference runs under no_grad; its merge steps are written in differentiable torch, so
    lifting the decorators gives the gradients ToMe/EViT fine-tuning sees (the matching stays no_grad)."""
    for name in ("tome_merge", "evit_select"):
        monkeypatch.setattr(reference, name, getattr(reference, name).__wrapped__)
    return reference.timm_vit_forward.__wrapped__


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("settings, ref_kwargs", [
    (dict(method="tome", r=3), dict(tome_r=[3, 3, 3, 3])),
    (dict(method="evit", keep_ratio=0.5, layers=[1]), dict(evit_layers=[1], keep_ratio=0.5)),
])
def test_fine_tuning_gradients_equal_the_reference(differentiable_reference, settings, ref_kwargs):
    model = make_timm_vit()
    x = images(2)
    red = tokenreduce.compile(model, (x,), inner="eager", count_model_flops=False, **settings)
    got = _grads(model, red(x).square().sum())
    exp = _grads(model, differentiable_reference(model, x, **ref_kwargs).square().sum())
    assert set(got) == set(exp) and len(got) == len(list(model.parameters()))
    for name in exp:
        torch.testing.assert_close(got[name], exp[name], atol=1e-5, rtol=1e-3, msg=name)


def test_backend_under_grad_mode_gives_the_models_parameters_gradients():
    torch._dynamo.reset()  # other tests compiled the same forward: start below Dynamo's recompile limit
    model = make_timm_vit()
    x = images(2)
    fast = torch.compile(model, backend="tokenreduce", options={"method": "tome", "r": 3, "inner": "eager"})
    out = fast(x)
    assert out.requires_grad
    got = _grads(model, out.square().sum())
    red = tokenreduce.compile(model, (x,), method="tome", r=3, inner="eager", count_model_flops=False)
    exp = _grads(model, red(x).square().sum())
    assert len(got) == len(list(model.parameters()))
    for name in exp:
        torch.testing.assert_close(got[name], exp[name], atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():  # weights changed in place are read at the next call (not frozen at the first)
        model.head.bias.add_(1.0)
        torch.testing.assert_close(fast(x), red(x))


def test_a_runner_on_copied_weights_refuses_at_backward():
    model = make_timm_vit()
    x = images(2)
    red = tokenreduce.compile(model, (x,), method="tome", r=3, inner="eager", count_model_flops=False)
    # what inductor's CPU lowering hands back today: a compiled module over a deep copy of the graph
    copied = ReducedModule(red.graph_module, torch.compile(copy.deepcopy(red.graph_module), backend="eager"),
                           red.report, red.settings, red.example_args, red.example_kwargs)
    with torch.no_grad():
        torch.testing.assert_close(copied(x), red(x))  # inference is unaffected
    with pytest.raises(TokenReduceError, match="inner='eager'"):
        copied(x).sum().backward()
