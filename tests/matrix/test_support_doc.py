"""docs/support.md is what `scripts/support_table.py` generates from the expectations table, and the table
names only families and checks that exist, each with a well-formed outcome (fast: no model is built)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from matrix.builders import DESCRIPTIONS, FAMILIES
from matrix.expectations import EXPECTED, KNOWN
from matrix.harness import Outcome, checks_of, matches, parse_expectation

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("support_table", ROOT / "scripts" / "support_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_support_doc_is_generated_from_the_expectations():
    assert _script().main(["--check"]) == 0, "run `python scripts/support_table.py`"


def test_the_doc_shows_every_family_and_every_refusal():
    text = (ROOT / "docs" / "support.md").read_text()
    for family in FAMILIES:
        assert f"| {family} |" in text
    for family, checks in EXPECTED.items():
        for spec in checks.values():
            kind, why = parse_expectation(spec)
            assert why.replace("|", "/") in text, (family, spec)


def test_expectations_name_real_families_and_checks():
    assert list(EXPECTED) == FAMILIES and set(DESCRIPTIONS) == set(FAMILIES)
    assert set(KNOWN) <= set(FAMILIES), set(KNOWN) - set(FAMILIES)  # a misspelt family would be dropped silently
    for family, checks in EXPECTED.items():
        for check, spec in checks.items():
            assert check in checks_of(family), (family, check)
            kind, why = parse_expectation(spec)
            assert kind != "works", f"{family}/{check}: 'works' is the default; leave it out"
            assert why, f"{family}/{check}: say why ({spec!r})"


def test_a_malformed_expectation_is_refused():
    with pytest.raises(ValueError, match="must start with one of"):
        parse_expectation("broken: because")


@pytest.mark.parametrize("outcome, spec, ok", [
    (Outcome("works"), "works", True),
    (Outcome("works"), "refused: soft-capping", False),  # a family that starts working fails the table
    (Outcome("refused", "block 3: attention scores pass through tanh soft-capping"), "refused: tanh soft-capping", True),
    (Outcome("refused", "no attention found"), "refused: tanh soft-capping", False),  # another reason
    (Outcome("refused", "no attention found"), "works", False),
    (Outcome("unreduced", "block0: skipped: causal attention"), "refused: causal attention", False),  # kind counts
    (Outcome("crash", "AssertionError: "), "crash: AssertionError", True),
])
def test_matching_rules(outcome, spec, ok):
    assert matches(outcome, spec) is ok
