"""ONNX export of ToMe-reduced models from the families the model matrix once refused (issue 11).

Why this file exists: the matrix (tests/matrix) showed the reduced BEiT, T5-encoder and Data2Vec-vision failing to
export ("Failed to decompose the FX graph" / "Failed to export the model with torch.export") while the unmodified
models exported. Root cause: `torch.onnx.export` ran with grad enabled; torch.export then turned the models'
`transpose(1, 2).reshape(B, N, C)` after SDPA into a view that is valid only for the fused kernel's output strides,
and the exporter's SDPA decomposition broke it (the unmodified models fail the same way with grad enabled). The
export now runs under no_grad (targets/onnx.py). Each test exports with grad enabled, as a user would, and checks
the file in onnxruntime against the eager reduced model itself (independently of the target's own verification).

What stays refused, and is asserted here by its precise reason:
* ViT-MAE: the model's own random masking (`argsort` of the noise) exports as a TopK whose k is read from a
  Shape at run time; the export-safety rule (constant k) refuses it with or without reduction.
* ModernBERT with a padded row whose local window holds only padding: onnxruntime and eager SDPA disagree on that
  fully masked query (a padding position's output); the unmodified model's export differs there too. Without such
  a row, the reduced model exports and matches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from matrix.builders import ENCODERS, TRACE_BATCH  # noqa: E402

import tokenreduce  # noqa: E402
from tokenreduce import TokenReduceError  # noqa: E402
from tokenreduce.targets.onnx import export_onnx  # noqa: E402

pytestmark = pytest.mark.onnx

ATOL = 1e-4


def _ort(path: Path, args: tuple, kwargs: dict) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values = [a for a in args] + list(kwargs.values())
    feeds = {i.name: v.numpy() for i, v in zip(sess.get_inputs(), values)}
    return sess.run(None, feeds)[0]


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(iter(out.values()))
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


def _reduced(family: str, **inputs_override):
    case = ENCODERS[family]()
    args, kwargs = case.rows(TRACE_BATCH)
    kwargs.update(inputs_override)
    red = tokenreduce.compile(case.model, args, kwargs, method="tome", r=2, inner="eager", count_model_flops=False)
    assert red.report.reduced_blocks, f"{family}: no block reduced"
    return case, red, args, kwargs


@pytest.mark.parametrize("family", ["timm-beit", "hf-t5-encoder", "hf-data2vec-vision", "hf-deberta-v2", "hf-mpnet"])
def test_reduced_family_exports_and_matches_onnxruntime(family, tmp_path):
    case, red, args, kwargs = _reduced(family)
    out = tmp_path / "tome.onnx"
    assert torch.is_grad_enabled()  # the user's default: the export must not depend on grad mode
    result = export_onnx(red, out)
    assert result.verified and result.max_abs_diff is not None and result.max_abs_diff <= ATOL
    got = _ort(out, args, kwargs)
    with torch.no_grad():
        want = _first(red.graph_module(*args, **kwargs)).numpy()
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) <= ATOL
    if got.ndim == 3:  # token outputs: the exported model is reduced too
        assert got.shape[1] == red.report.blocks[-1].tokens_out < red.report.blocks[0].tokens_in


def test_modernbert_reduced_exports_without_fully_padded_windows(tmp_path):
    """Rows whose every local window holds a real token: the reduced ModernBERT exports and matches."""
    case = ENCODERS["hf-modernbert"]()
    args, kwargs = case.rows(TRACE_BATCH)
    kwargs["attention_mask"] = torch.ones_like(kwargs["attention_mask"])
    red = tokenreduce.compile(case.model, args, kwargs, method="tome", r=2, inner="eager", count_model_flops=False)
    assert red.report.reduced_blocks
    out = tmp_path / "tome.onnx"
    result = export_onnx(red, out)
    assert result.verified and result.max_abs_diff <= ATOL
    with torch.no_grad():
        want = _first(red.graph_module(*args, **kwargs)).numpy()
    assert float(np.abs(_ort(out, args, kwargs) - want).max()) <= ATOL


def test_modernbert_plain_export_differs_only_at_a_fully_padded_window(tmp_path):
    """The matrix's refusal for ModernBERT is not tokenreduce's: the unmodified model's ONNX differs from eager at
    the one padding query whose local window (|i - j| < 5) holds only padding, and nowhere else."""
    case = ENCODERS["hf-modernbert"]()
    args, kwargs = case.rows(TRACE_BATCH)
    mask = kwargs["attention_mask"]
    path = tmp_path / "plain.onnx"
    with torch.no_grad():
        torch.onnx.export(case.model, args, str(path), kwargs=kwargs, dynamo=True, verbose=False)
        want = _first(case.model(*args, **kwargs)).numpy()
    diff = np.abs(_ort(path, args, kwargs) - want).max(-1)
    window = case.model.config.local_attention // 2 + 1
    n = mask.shape[1]
    fully_padded = torch.zeros_like(mask, dtype=torch.bool)
    for i in range(n):
        lo, hi = max(0, i - window + 1), min(n, i + window)
        fully_padded[:, i] = mask[:, lo:hi].sum(-1) == 0
    assert fully_padded.any()
    assert float(diff[~fully_padded.numpy()].max()) <= ATOL
    assert float(diff[fully_padded.numpy()].max()) > ATOL


@pytest.mark.parametrize("method", ["tome", "none"])
def test_vit_mae_refused_for_its_own_masking(method, tmp_path):
    """ViT-MAE's random masking sorts the noise (TopK with k read from a Shape): refused with or without ToMe."""
    case = ENCODERS["hf-vit-mae"]()
    args, kwargs = case.rows(TRACE_BATCH)
    opts = dict(method="tome", r=2) if method == "tome" else dict(method="none")
    red = tokenreduce.compile(case.model, args, kwargs, inner="eager", count_model_flops=False, **opts)
    out = tmp_path / "mae.onnx"
    with pytest.raises(TokenReduceError, match=r"exported ONNX is not static/export-safe: node_sort\S*: TopK k is "
                                                r"not a constant"):
        export_onnx(red, out)
    assert not out.exists()
