"""FLOP counting never breaks a compile, and a compile does not depend on the caller's grad mode.

- A view of a parameter made under `no_grad` (`requires_grad` but no `grad_fn`: CaiT's `cls_token.expand`,
  SigLIP's attention-pool latent) used to make torch's per-module FLOP tracker assert; the count is now
  exact on such a module (checked against the hand-counted matmul FLOPs) and on tiny timm SigLIP / CaiT.
- Attention on a CPU is counted: torch's counter has formulas for the CUDA SDPA kernels only and counted the
  CPU kernel as 0 FLOPs (every CPU report left out q k^T and p v); checked against the hand count, GQA included.
- Whatever else fails while counting is reported as "FLOPs unavailable: <why>", never raised.
- Data2Vec-vision (relative position bias as SDPA mask) compiled under `torch.no_grad()` but not with grad
  enabled: the compiled graphs must be equal in both modes and give the same outputs run in both modes.
"""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from tokenreduce.compiler import report as report_mod


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_cpu_attention_is_counted(kv_heads):
    b, h, n, m, d, dv = 2, 4, 5, 7, 3, 6
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, kv_heads, m, d), torch.randn(b, kv_heads, m, dv)

    def attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads != h)

    # q k^T: [b*h, n, d] x [b*h, d, m]; p v: [b*h, n, m] x [b*h, m, dv]; multiply-add = 2 FLOPs
    assert report_mod.count_flops(attend, (q, k, v)) == 2 * b * h * n * m * d + 2 * b * h * n * m * dv


class _ExpandedParam(torch.nn.Module):
    """`latent.expand(B, -1, -1)` fed to a submodule: the CaiT / SigLIP-pool pattern in four lines."""

    def __init__(self) -> None:
        super().__init__()
        self.latent = torch.nn.Parameter(torch.randn(1, 3, 8))
        self.proj = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.latent.expand(x.shape[0], -1, -1)
        return self.proj(q) + x.mean()


def test_count_flops_on_an_expanded_parameter_is_exact():
    x = torch.randn(4, 2)
    # one linear on [4, 3, 8] -> [4, 3, 5]: 2 * (4 * 3) * 8 * 5 multiply-adds counted as 2 FLOPs each
    assert report_mod.count_flops(_ExpandedParam(), (x,)) == 2 * 4 * 3 * 8 * 5


def _tiny_siglip() -> torch.nn.Module:
    import timm

    return timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2, num_classes=0).eval()


def _tiny_cait() -> torch.nn.Module:
    import timm

    return timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, depth_token_only=1).eval()


@pytest.mark.parametrize("build", [_tiny_siglip, _tiny_cait], ids=["siglip-attention-pool", "cait"])
def test_default_compile_counts_flops_of_timm_models_that_used_to_assert(build):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(2, 3, 32, 32)
    red = tokenreduce.compile(model, (x,), method="tome", r=2, inner="eager")
    rep = red.report
    assert rep.flops_unavailable == ""
    assert rep.flops_before is not None and rep.flops_before > 0
    # the unreduced model counted by torch's own counter with grad enabled (where it does not assert)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    assert rep.flops_before == counter.get_total_flops()
    assert rep.flops_after is not None and rep.flops_after <= rep.flops_before


def test_a_failing_count_is_reported_not_raised(monkeypatch, timm_vit):
    def boom(fn, args, kwargs=None):
        raise AssertionError("Expected gradient function to be set")

    monkeypatch.setattr(report_mod, "count_flops", boom)
    x = torch.randn(2, 3, 32, 32)
    red = tokenreduce.compile(timm_vit, (x,), method="tome", r=2, inner="eager")
    rep = red.report
    assert rep.flops_before is None and rep.flops_after is None and rep.flops_ratio is None
    assert "AssertionError: Expected gradient function to be set" in rep.flops_unavailable
    assert "FLOPs unavailable: the model: " in str(rep)
    assert rep.to_dict()["flops_unavailable"] == rep.flops_unavailable
    torch.testing.assert_close(red(x), red(x))  # the compile itself went through


def _tiny_data2vec() -> torch.nn.Module:
    from transformers import Data2VecVisionConfig, Data2VecVisionModel

    torch.manual_seed(0)
    cfg = Data2VecVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64)
    return Data2VecVisionModel(cfg).eval()


def test_data2vec_compiles_the_same_graph_with_and_without_grad():
    model = _tiny_data2vec()
    x = torch.randn(2, 3, 32, 32)
    built = {}
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            built[grad] = tokenreduce.compile(model, (x,), method="tome", r=2, inner="eager",
                                              count_model_flops=False)
    assert built[True].graph_module.code == built[False].graph_module.code
    assert built[True].report.tokens_per_block == [17, 15]
    outs = []
    for red in built.values():
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                outs.append(red(x).last_hidden_state.detach())
    assert outs[0].shape == (2, 13, 32)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=1e-6)


def test_data2vec_identity_at_zero_reduction_with_grad():
    model = _tiny_data2vec()
    x = torch.randn(2, 3, 32, 32)
    red = tokenreduce.compile(model, (x,), method="tome", r=0, inner="eager", count_model_flops=False)
    torch.testing.assert_close(red(x).last_hidden_state, model(x).last_hidden_state, atol=1e-5, rtol=1e-5)
