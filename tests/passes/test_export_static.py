"""`passes/export_static.py`: the static placeholder scatter equals `masked_scatter` (also where the source has
more elements than the mask takes, and with a mask broadcast over the hidden axis), and the placeholder-count
assertion becomes NaN outputs for a failing check while a passing one leaves every output unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from tokenreduce.passes.export_static import checks_as_nan, masked_scatter_static, static_masked_scatter


@pytest.mark.parametrize("shape,extra", [((2, 7, 5), 0), ((1, 9, 3), 4), ((3, 4, 6), 2)])
def test_static_scatter_is_masked_scatter(shape, extra):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g)
    mask = torch.rand(shape[:2], generator=g) > 0.5
    mask[0, 0] = True
    source = torch.randn(int(mask.sum()) * shape[2] + extra, generator=g)  # `extra` elements never read
    m = mask.unsqueeze(-1)  # broadcast over the hidden axis, as transformers' placeholder mask before expand
    assert torch.equal(masked_scatter_static(x, m, source), x.masked_scatter(m, source))
    full = m.expand_as(x)
    assert torch.equal(masked_scatter_static(x, full, source), x.masked_scatter(full, source))


class _Placeholder(torch.nn.Module):
    """transformers' `get_placeholder_mask` + scatter, in miniature: the image token count times the width must
    equal the feature count (a `torch_compilable_check`), then the features are scattered in."""

    def forward(self, ids: torch.Tensor, embeds: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mask = ids == 7
        torch._check_tensor_all(mask.sum() * embeds.shape[-1] == feats.numel())  # transformers' form when tracing
        out = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), feats)
        return out.sum(-1), out, ids * 2


def _captured() -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    ids = torch.tensor([[1, 7, 7, 2, 7, 3]])
    args = (ids, torch.randn(1, 6, 4), torch.randn(3, 4))
    gm = torch.export.export(_Placeholder(), args).module()
    return gm, args


def test_captured_check_and_scatter_are_rewritten():
    gm, args = _captured()
    targets = [n.target for n in gm.graph.nodes]
    if torch.ops.aten._is_all_true.default not in targets:
        pytest.skip("this torch captures the check without aten._is_all_true")
    expected = gm(*args)
    assert static_masked_scatter(gm).rewrites == 1
    assert checks_as_nan(gm).rewrites == 1
    targets = [n.target for n in gm.graph.nodes]
    assert torch.ops.aten.masked_scatter.default not in targets
    assert torch.ops.aten._is_all_true.default not in targets
    assert torch.ops.aten._assert_scalar.default not in targets
    got = gm(*args)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    # one image token too few: the float outputs are NaN, the integer one is untouched
    bad = args[0].clone()
    bad[0, 4] = 3
    out = gm(bad, *args[1:])
    assert out[0].isnan().all() and out[1].isnan().all()
    assert torch.equal(out[2], bad * 2)


def test_a_checked_value_used_as_data_is_left_alone():
    """An `_is_all_true` whose value also feeds a tensor computation is not only an assertion: not rewritten."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    ok = graph.call_function(torch.ops.aten._is_all_true.default, (x,))
    graph.output((graph.call_function(torch.ops.aten.mul.Tensor, (x, ok)),))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert checks_as_nan(gm).rewrites == 0
    assert any(n.target is torch.ops.aten._is_all_true.default for n in gm.graph.nodes)
