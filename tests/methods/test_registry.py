"""The method registry and Settings: every method is reachable by name, options are checked (never
coerced), names that do not apply to the chosen method are refused, and the README's settings table is the
one generated from the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenreduce import Settings, TokenReduceError
from tokenreduce.methods import docs, registry
from tokenreduce.methods.base import DecoderMethod, EncoderMethod

ROOT = Path(__file__).resolve().parents[2]


def test_every_method_is_registered_with_its_placement():
    assert {"none", "tome", "evit", "fastv", "pyramiddrop", "gemfilter"} <= set(registry.names())
    for name in registry.names("encoder"):
        assert isinstance(registry.get(name), EncoderMethod)
    for name in registry.names("decoder"):
        assert isinstance(registry.get(name), DecoderMethod)
    assert "fastv" not in registry.names("encoder") and "tome" not in registry.names("decoder")


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(TokenReduceError, match="unknown method 'tomee'; choose one of none, tome") as e:
        Settings.from_options(method="tomee")
    assert e.value.setting == "method"


@pytest.mark.parametrize("opts, setting, match", [
    (dict(method="tome", layers="12"), "layers", "layers must be an int or a list of ints"),
    (dict(method="tome", r=[1.7, 2.9]), "r", r"r\[0\] must be an int, got 1.7"),
    (dict(method="tome", r=2.5), "r", "r must be an int"),
    (dict(method="tome", r=True), "r", "r must be an int"),
    (dict(method="tome", prop_attn="false"), "prop_attn", "prop_attn must be True or False"),
    (dict(method="tome", unmerge="no"), "unmerge", "unmerge must be True or False"),
    (dict(method="tome", protected_tokens=2.7), "protected_tokens", "protected_tokens must be an int"),
    (dict(method="evit", keep_ratio=0.0), "keep_ratio", r"keep_ratio must be in \(0, 1\]"),
    (dict(method="evit", keep_ratio="0.5"), "keep_ratio", "keep_ratio must be a number"),
    (dict(method="fastv", score_pool=4), "score_pool", "score_pool must be an odd int"),
    (dict(method="tome", inner="tvm"), "inner", "unknown inner 'tvm'"),
])
def test_settings_are_checked_not_coerced(opts, setting, match):
    with pytest.raises(TokenReduceError, match=match) as e:
        Settings.from_options(opts)
    assert e.value.setting == setting


def test_an_option_of_another_method_is_refused_naming_its_method():
    owners = "evit / zero_tprune / fastv / pyramiddrop / divprune / dart / visionzip / sparsevlm / visiondrop"
    # later methods that take keep_ratio append to the list (globalcom2, hiprune, flowcut, ...)
    with pytest.raises(TokenReduceError, match=f"keep_ratio is a {owners}( / [a-z0-9_]+)* setting, not a tome one"):
        Settings.from_options(method="tome", r=2, keep_ratio=0.5)
    with pytest.raises(TokenReduceError, match="ratio is a tomesd setting, not a tome one"):
        Settings.from_options(method="tome", ratio=0.5)
    with pytest.raises(TokenReduceError, match="unknown setting"):
        Settings.from_options(method="tome", merge_ratio=0.5)


def test_settings_split_common_fields_and_method_options():
    s = Settings.from_options({"method": "tome", "r": 4}, unmerge=True, layers=[0, 2])
    assert s.unmerge is True and s.opts.r == 4 and s.opts.layers == (0, 2)
    assert s.as_flat()["r"] == 4 and s.as_flat()["method"] == "tome"
    assert Settings(method="evit").opts.keep_ratio == 0.7  # the paper's default


def test_readme_settings_table_is_generated_from_the_registry():
    assert docs.main(["--check", str(ROOT / "README.md")]) == 0, "run `python -m tokenreduce.methods.docs`"
