"""Package hygiene the import-linter contract does not cover: no module imports a leading-underscore name
from another module (a private name shared between files is a public one that lies about itself), and no
file grows past the size where it stops having one responsibility."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tokenreduce"
MAX_LINES = 700


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_private_name_is_imported_across_modules():
    offenders = []
    for path in _modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tokenreduce"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports "
                                         f"{alias.name} from {node.module}")
    assert not offenders, "\n".join(offenders)


def test_no_file_is_over_the_size_limit():
    big = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p in _modules()
           if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not big, "\n".join(big)
