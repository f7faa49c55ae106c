"""`fused_attention`: attention exported as onnxruntime's `com.microsoft.MultiHeadAttention`.

References are independent of the pass: `F.scaled_dot_product_attention` / the model in eager, and the plain
(unfused) export of the same graph run in onnxruntime. Which nodes the pass leaves alone is checked per reason,
and each refusal by its message.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tokenreduce
from tokenreduce.errors import TokenReduceError
from tokenreduce.passes.ort_attention import ort_attention, ort_fused_attention
from tokenreduce.targets import get as get_target
from tokenreduce.targets.base import TargetOptions
from tokenreduce.targets.onnx import check_static, export_graph

ort = pytest.importorskip("onnxruntime")


class TwoAttentions(torch.nn.Module):
    """Self-attention over x (fusable, or `variant` makes it not) and cross-attention over c (fusable)."""

    def __init__(self, variant: str = "plain") -> None:
        super().__init__()
        self.qkv, self.kv, self.variant = torch.nn.Linear(32, 96), torch.nn.Linear(12, 64), variant

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        if self.variant == "mask":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(n, n, dtype=torch.bool).tril())
        elif self.variant == "causal":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.variant == "gqa":
            y = F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        q = y.transpose(1, 2).reshape(b, n, d).view(b, n, 4, 8).transpose(1, 2)
        k, v = self.kv(c).view(b, -1, 2, 4, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, scale=0.3).transpose(1, 2).reshape(b, n, d)


def _captured(variant: str = "plain"):
    g = torch.Generator().manual_seed(0)
    model = TwoAttentions(variant).eval()
    args = (torch.randn(2, 10, 32, generator=g), torch.randn(2, 7, 12, generator=g))
    red = tokenreduce.compile(model, args, {}, method="none", inner="eager", count_model_flops=False)
    return red, args


def _run(path, args):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})[0]


def test_eager_form_is_sdpa():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5 + i, 4, generator=g) for i in (0, 2, 2))
    q = q[:, :, :5]
    assert torch.equal(ort_attention(q, k, v, 0.7), F.scaled_dot_product_attention(q, k, v, scale=0.7))


def test_fused_export_matches_eager_and_the_unfused_export(tmp_path):
    red, args = _captured()
    fused = export_graph(red.graph_module, red.example_args, red.example_kwargs, tmp_path / "fused.onnx",
                         fused_attention=True)
    plain = export_graph(red.graph_module, red.example_args, red.example_kwargs, tmp_path / "plain.onnx")
    assert fused.verified and fused.max_abs_diff < 1e-5 and not fused.problems
    assert fused.fused_attention == 2 and fused.unfused_attention == []
    assert fused.op_counts.get("MultiHeadAttention") == 2 and "Softmax" not in fused.op_counts
    assert plain.fused_attention == 0 and plain.op_counts.get("Softmax") == 2 and "MultiHeadAttention" not in plain.op_counts
    assert check_static(tmp_path / "fused.onnx") == []  # the contrib op's output shape is known to the check
    # another batch than the example's: the batch stays dynamic through the contrib op
    g = torch.Generator().manual_seed(5)
    other = (torch.randn(3, 10, 32, generator=g), torch.randn(3, 7, 12, generator=g))
    with torch.no_grad():
        want = red(*other).numpy()
    assert np.abs(_run(tmp_path / "fused.onnx", other) - want).max() < 1e-5
    assert np.abs(_run(tmp_path / "fused.onnx", other) - _run(tmp_path / "plain.onnx", other)).max() < 1e-5


@pytest.mark.parametrize("variant, reason", [("mask", "it has an attention mask"), ("causal", "it is causal"),
                                             ("gqa", "it uses enable_gqa")])
def test_what_the_contrib_op_cannot_compute_stays_unfused(tmp_path, variant, reason):
    red, args = _captured(variant)
    ex = export_graph(red.graph_module, red.example_args, red.example_kwargs, tmp_path / "m.onnx", fused_attention=True)
    assert ex.verified and ex.max_abs_diff < 1e-5
    assert ex.fused_attention == 1 and len(ex.unfused_attention) == 1 and reason in ex.unfused_attention[0]
    assert ex.op_counts.get("MultiHeadAttention") == 1


def test_pass_reasons_for_dtype_and_head_size():
    class Odd(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 16)  # v's head size differs
    gm = torch.export.export(Odd(), (q, k, v)).module()
    result = ort_fused_attention(gm)
    assert result.rewrites == 0 and "(heads, head size) differ" in result.notes[0]
    gm = torch.export.export(Odd(), (q.half(), k.half(), k.half())).module()
    result = ort_fused_attention(gm)
    assert result.rewrites == 0 and "not fp32" in result.notes[0]


def test_refusals(tmp_path):
    red, _ = _captured()
    with pytest.raises(TokenReduceError, match="precision 'fp16' is not supported with it") as e:
        export_graph(red.graph_module, red.example_args, red.example_kwargs, tmp_path / "x.onnx",
                     fused_attention=True, precision="fp16")
    assert e.value.setting == "precision"
    with pytest.raises(TokenReduceError, match="precision 'int8' is not supported with it"):
        TargetOptions(fused_attention=True, precision="int8")
    with pytest.raises(TokenReduceError, match="TensorRT does not read") as e:
        get_target("tensorrt").lower(red.graph_module, red.example_args, red.example_kwargs,
                                     TargetOptions(fused_attention=True))
    assert e.value.setting == "fused_attention"
    x = torch.randn(2, 3, 4)
    no_attention = torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 4)), (x,)).module()
    with pytest.raises(TokenReduceError, match="the graph has no scaled_dot_product_attention") as e:
        export_graph(no_attention, (x,), {}, tmp_path / "y.onnx", fused_attention=True, dynamic_batch=False)
    assert e.value.setting == "fused_attention"
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()


def test_onnx_target_option(tmp_path):
    red, args = _captured()
    lowered = get_target("onnx").lower(red.graph_module, red.example_args, red.example_kwargs,
                                       TargetOptions(fused_attention=True, output=tmp_path / "t.onnx", threads=1))
    assert lowered.export.fused_attention == 2
    with torch.no_grad():
        assert (lowered.runner(*args) - red(*args)).abs().max().item() < 1e-5
