"""Markers of the model matrix: `-m matrix` selects it, `-m "matrix and not onnx"` leaves out its ONNX exports
(the slowest checks), `-m "not matrix"` skips it."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "matrix: the model matrix (tests/matrix): every family x check")
    config.addinivalue_line("markers", "onnx: an ONNX export verified in onnxruntime (slow: ~5 s each)")
