"""Where the real evaluation data is, for the tests that need it (skip with a clear message otherwise)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenreduce.evaluate.data import default_data_dir


def require_data_dir(what: str = "real-data checks") -> Path:
    """The evaluation data folder, or skip saying where to put it."""
    found = default_data_dir()
    if found is None or not found.is_dir():
        pytest.skip(f"evaluation data folder not found (set TOKENREDUCE_DATA or put it at <repo>/../shared/data); "
                    f"skipping {what}")
    return found
