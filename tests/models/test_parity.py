"""Numerical parity of reduced models against the independent reference (`tests/reference.py`).

Every compiled model is compared with the reference's hand-written forward pass under the same ToMe /
EViT settings (tolerance 1e-4, float32), over timm ViT (CLS), distilled DeiT, explicit-attention timm, HF
ViT and a padded BERT batch; settings that remove nothing must give the original model's outputs; one
graph serves several batch sizes; inductor matches eager; and the `tokenreduce` Dynamo backend works
from a fresh interpreter that never imports tokenreduce.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TOL, bert_batch, images, make_timm_vit, output_tensor
from reference import hf_bert_forward, hf_vit_forward, timm_vit_forward

import tokenreduce

REPO = Path(__file__).resolve().parents[2]


def _compile(model, args, kwargs=None, **settings):
    settings.setdefault("inner", "eager")
    return tokenreduce.compile(model, args, kwargs, count_model_flops=False, **settings)


def _close(got, exp, tol=TOL):
    got = output_tensor(got)
    assert got.shape == exp.shape
    torch.testing.assert_close(got, exp, atol=tol, rtol=tol)


def _ref_kwargs(method, settings, depth=4):
    """The reference's arguments for the same settings (schedules computed here, from docs/methods.md)."""
    if method == "tome":
        r = settings["r"]
        if isinstance(r, int):
            if settings.get("r_schedule") == "decreasing":
                lo = int(r * 1.5)
                hi = 2 * r - lo
                r = [int(lo + (hi - lo) * i / (depth - 1)) for i in range(depth)]
            else:
                r = [r] * depth
        layers = settings.get("layers")
        if layers is not None:
            r = [v if i in layers else 0 for i, v in enumerate(r)]
        return dict(tome_r=list(r), prop_attn=settings.get("prop_attn"))
    return dict(evit_layers=settings["layers"], keep_ratio=settings["keep_ratio"],
                fuse=settings.get("fuse", True), prop_attn=settings.get("prop_attn"))


TIMM_CASES = {
    "tome-r8": ("tome", dict(r=8)),
    "tome-list": ("tome", dict(r=[12, 0, 9, 5])),
    "tome-decreasing": ("tome", dict(r=8, r_schedule="decreasing")),
    "tome-noprop": ("tome", dict(r=6, prop_attn=False)),
    "tome-layers": ("tome", dict(r=10, layers=[1, 3])),
    "evit": ("evit", dict(keep_ratio=0.5, layers=[1, 2])),
    "evit-prop-nofuse": ("evit", dict(keep_ratio=0.6, layers=[0, 2], prop_attn=True, fuse=False)),
}


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_vit_cls(timm_vit64, case):
    method, settings = TIMM_CASES[case]
    x = images(4, 64)
    red = _compile(timm_vit64, (x,), method=method, **settings)
    with torch.no_grad():
        _close(red(x), timm_vit_forward(timm_vit64, x, **_ref_kwargs(method, settings)))


@pytest.mark.parametrize("method,settings", [("tome", dict(r=8)), ("evit", dict(keep_ratio=0.5, layers=[1, 2]))])
def test_timm_vit_batch1(timm_vit64, method, settings):
    x = images(1, 64)
    red = _compile(timm_vit64, (x,), method=method, **settings)
    with torch.no_grad():
        _close(red(x), timm_vit_forward(timm_vit64, x, **_ref_kwargs(method, settings)))


@pytest.mark.parametrize("method,settings", [("tome", dict(r=10)), ("evit", dict(keep_ratio=0.5, layers=[0, 2]))])
def test_distilled_deit(timm_deit_distilled, method, settings):
    x = images(4, 64)
    red = _compile(timm_deit_distilled, (x,), method=method, **settings)
    assert red.report.num_protected == 2
    with torch.no_grad():
        _close(red(x), timm_vit_forward(timm_deit_distilled, x, **_ref_kwargs(method, settings)))


def test_timm_register_tokens_tome():
    """4 protected tokens (CLS + 3 registers): protected tokens fall on both A (even) and B (odd) sides."""
    model = make_timm_vit(reg_tokens=3, no_embed_class=True)
    x = images(2)
    red = _compile(model, (x,), method="tome", r=[4, 4, 2])
    assert red.report.num_protected == 4
    with torch.no_grad():
        _close(red(x), timm_vit_forward(model, x, tome_r=[4, 4, 2]))


def test_user_protected_tokens(timm_vit):
    x = images(2)
    red = _compile(timm_vit, (x,), method="tome", r=[5, 3, 2], protected_tokens=3)
    assert red.report.num_protected == 3
    with torch.no_grad():
        _close(red(x), timm_vit_forward(timm_vit, x, tome_r=[5, 3, 2], num_protected=3))


@pytest.mark.parametrize("method,settings", [("tome", dict(r=8)), ("evit", dict(keep_ratio=0.5, layers=[1, 2],
                                                                                   prop_attn=True))])
def test_timm_explicit_attention(timm_vit_explicit, method, settings):
    x = images(4, 64)
    red = _compile(timm_vit_explicit, (x,), method=method, **settings)
    with torch.no_grad():
        _close(red(x), timm_vit_forward(timm_vit_explicit, x, **_ref_kwargs(method, settings)))


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("method,settings", [("tome", dict(r=3)), ("evit", dict(keep_ratio=0.5, layers=[1, 2]))])
def test_hf_vit(hf_vit, method, settings, batch):
    x = images(batch)
    red = _compile(hf_vit, (x,), method=method, **settings)
    with torch.no_grad():
        _close(red(x), hf_vit_forward(hf_vit, x, **_ref_kwargs(method, settings)))


@pytest.mark.parametrize("method,settings", [("tome", dict(r=3)), ("evit", dict(keep_ratio=0.5, layers=[1, 2]))])
def test_hf_vit_eager_attention(hf_vit_eager, method, settings):
    """HF eager attention: matmul -> softmax(float32) -> cast -> dropout -> matmul, with the mask added."""
    x = images(2)
    red = _compile(hf_vit_eager, (x,), method=method, **settings)
    with torch.no_grad():
        _close(red(x), hf_vit_forward(hf_vit_eager, x, **_ref_kwargs(method, settings)))


@pytest.mark.parametrize("method,settings", [("tome", dict(r=2)), ("tome", dict(r=[3, 0, 2])),
                                             ("evit", dict(keep_ratio=0.6, layers=[0, 1]))])
def test_bert_padded_unmerge(bert, bert_inputs, method, settings):
    ids, am = bert_inputs
    red = _compile(bert, (ids,), {"attention_mask": am}, method=method, unmerge=True, **settings)
    with torch.no_grad():
        got = output_tensor(red(ids, attention_mask=am))
        exp = hf_bert_forward(bert, ids, am, unmerge=True, **_ref_kwargs(method, settings))
    assert got.shape == exp.shape == (4, 16, 64)
    valid = am.bool()
    torch.testing.assert_close(got[valid], exp[valid], atol=TOL, rtol=TOL)


# ------------------------------------------------------------------------------------------ nothing removed
@pytest.mark.parametrize("settings", [dict(method="tome", r=0), dict(method="evit", keep_ratio=1.0),
                                      dict(method="none")])
def test_settings_removing_nothing_equal_original(timm_vit, settings):
    x = images(3)
    red = _compile(timm_vit, (x,), **settings)
    with torch.no_grad():
        diff = (output_tensor(red(x)) - timm_vit(x)).abs().max()
    assert float(diff) <= 1e-5


def test_bert_removing_nothing_equals_original(bert, bert_inputs):
    ids, am = bert_inputs
    red = _compile(bert, (ids,), {"attention_mask": am}, method="tome", r=0, unmerge=True)
    with torch.no_grad():
        diff = (output_tensor(red(ids, attention_mask=am)) - bert(ids, attention_mask=am).last_hidden_state).abs()
    assert float(diff[am.bool()].max()) <= 1e-5


# ------------------------------------------------------------------------------------------ dynamic batch
def test_dynamic_batch_timm(timm_vit64):
    red = _compile(timm_vit64, (images(2, 64),), method="tome", r=8)
    for b in (1, 3, 4):
        x = images(b, 64, seed=10 + b)
        with torch.no_grad():
            _close(red(x), timm_vit_forward(timm_vit64, x, tome_r=[8] * 4))


def test_dynamic_batch_bert_evit(bert):
    ids2, am2 = bert_batch(lengths=(16, 9))
    red = _compile(bert, (ids2,), {"attention_mask": am2}, method="evit", keep_ratio=0.5, layers=[1], unmerge=True)
    for lengths in ((12,), (16, 5, 10), (3, 16, 8, 14)):
        ids, am = bert_batch(lengths=lengths, seed=len(lengths))
        with torch.no_grad():
            got = output_tensor(red(ids, attention_mask=am))
            exp = hf_bert_forward(bert, ids, am, evit_layers=[1], keep_ratio=0.5, unmerge=True)
        valid = am.bool()
        torch.testing.assert_close(got[valid], exp[valid], atol=TOL, rtol=TOL)


# ------------------------------------------------------------------------------------------ compiled targets
def test_inductor_matches_eager(timm_vit):
    x = images(2)
    red = tokenreduce.compile(timm_vit, (x,), method="tome", r=3, count_model_flops=False)  # inductor default
    assert red.settings.inner == "inductor"
    with torch.no_grad():
        got = red(x)
        eager = red.graph_module(x)
        torch.testing.assert_close(got, eager, atol=TOL, rtol=TOL)
        torch.testing.assert_close(got, timm_vit_forward(timm_vit, x, tome_r=[3] * 4), atol=TOL, rtol=TOL)
        x3 = images(3, seed=7)
        torch.testing.assert_close(red(x3), timm_vit_forward(timm_vit, x3, tome_r=[3] * 4), atol=TOL, rtol=TOL)


BACKEND_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import images, make_timm_vit
    from reference import timm_vit_forward
    model = make_timm_vit()
    f = torch.compile(model, backend="tokenreduce", options={{"method": "tome", "r": 3, "inner": "eager"}})
    with torch.no_grad():
        for b in (2, 3):
            x = images(b, seed=b)
            got, exp = f(x), timm_vit_forward(model, x, tome_r=[3, 3, 3, 3])
            assert got.shape == exp.shape, (got.shape, exp.shape)
            err = float((got - exp).abs().max())
            assert err < 1e-4, err
            plain = float((model(x) - exp).abs().max())
            assert plain > 1e-3, "the reference with r=3 should differ from the unreduced model"
    print("IMPORTED_BY_ENTRY_POINT", "tokenreduce" in sys.modules)
    print("OK")
""")


def test_dynamo_backend_entry_point_in_subprocess():
    script = BACKEND_SCRIPT.format(tests=str(REPO / "tests"))
    assert "import tokenreduce" not in script
    env = dict(os.environ, PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/tmp", env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
    # the backend was found through the torch_dynamo_backends entry point, which imported the package
    assert "IMPORTED_BY_ENTRY_POINT True" in proc.stdout


@pytest.mark.parametrize("name", ["dinov2", "dinov2_registers", "clip_vision"])
def test_hf_vision_models_compile_and_keep_outputs(request, name):
    """DINOv2 (with/without registers) and CLIP vision: nothing removed gives the original outputs; ToMe
    with unmerge keeps every output's shape."""
    model = request.getfixturevalue(name)
    x = images(2)
    with torch.no_grad():
        ref = model(x)
        same = _compile(model, (x,), method="tome", r=0, dynamic_batch=False)(x)
        for key in ("last_hidden_state", "pooler_output"):
            assert float((same[key] - ref[key]).abs().max()) <= 1e-5
        red = _compile(model, (x,), method="tome", r=2, unmerge=True, dynamic_batch=False)
        out = red(x)
    assert red.report.num_protected == 1 + getattr(model.config, "num_register_tokens", 0)
    assert [b.tokens_out for b in red.report.blocks][-1] == red.report.blocks[0].tokens_in - 8
    for key in ("last_hidden_state", "pooler_output"):
        assert out[key].shape == ref[key].shape
