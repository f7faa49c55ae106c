"""How the command line turns structured library errors into one line, and the shape of the `cli` package.

A `TokenReduceError` that names a setting (`setting=`, `hint=`) gets the command's own flag spelling from
its argparse parser, not from rewriting the library's words. Flags given for a method that does not take
them are refused, not ignored. The package keeps its imports one way (commands import the shared modules;
only `cli/__init__` imports commands), no module imports another's leading-underscore name, and no file
grows past ~500 lines. All in-process and fast (no model is loaded).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tokenreduce import TokenReduceError
from tokenreduce.cli import build_parser, main
from tokenreduce.cli.ui import error_line, flag_spelling, hint_spelling

CLI_PACKAGE = Path(__file__).resolve().parents[2] / "tokenreduce" / "cli"
COMMAND_MODULES = {"convert", "inspect", "bench", "eval"}


@pytest.fixture(scope="module")
def parsers():
    return build_parser()[1]


@pytest.mark.parametrize(("setting", "flag"), [
    ("keep_ratio", "--keep-ratio"), ("fuse", "--fuse / --no-fuse"), ("dynamic_batch", "--static-batch"),
    ("prop_attn", "--prop-attn / --no-prop-attn"), ("trust_pickle", "--trust-pickle"), ("r", "--r"),
])
def test_flag_is_found_by_dest(parsers, setting: str, flag: str) -> None:
    assert flag_spelling(parsers["convert"], setting) == flag


def test_setting_without_a_flag_adds_nothing(parsers) -> None:
    exc = TokenReduceError("inner must be inductor or eager", setting="inner")
    assert error_line(exc, parsers["convert"], debug=False) == "inner must be inductor or eager"
    assert error_line(TokenReduceError("plain\n  message"), parsers["convert"], debug=False) == "plain message"


def test_setting_and_hint_in_command_line_spelling(parsers) -> None:
    exc = TokenReduceError("ToMe r=9 at block 0 is too large (or pass clamp_r=True)", setting="r", hint="clamp_r=True")
    line = error_line(exc, parsers["convert"], debug=False)
    assert line == "ToMe r=9 at block 0 is too large (or pass clamp_r=True) (command-line flag: --r; to fix: --clamp-r)"
    assert str(exc) == "ToMe r=9 at block 0 is too large (or pass clamp_r=True)"  # the library's text is untouched


@pytest.mark.parametrize(("hint", "spelled"), [
    ("protected_tokens=1 or method='tome'", "--protected-tokens 1 or --method tome"),
    ("fuse=True or unmerge=False", "--fuse or drop --unmerge"),
    ("prop_attn=False", "--no-prop-attn"),
    ("layers=[3, 6]", "--layers 3,6"),
    ("r_schedule='decreasing'", "--r-schedule decreasing"),
])
def test_hint_spellings(parsers, hint: str, spelled: str) -> None:
    assert hint_spelling(parsers["convert"], hint) == spelled


@pytest.mark.parametrize("hint", ["use a smaller model", "inner='eager'", "clamp_r=True or shrink it", "x=__import__('os')"])
def test_hint_that_is_not_a_flag_assignment_is_not_shown(parsers, hint: str) -> None:
    assert hint_spelling(parsers["convert"], hint) is None


def test_eval_parser_is_used_for_eval_errors(parsers) -> None:
    assert flag_spelling(parsers["eval"], "clamp_r") == "--clamp-r"
    assert flag_spelling(parsers["eval"], "trust_pickle") is None  # eval loads no MODEL


def test_flag_for_another_method_is_refused_with_its_spelling(tmp_path: Path, capfd: pytest.CaptureFixture[str]
                                                               ) -> None:
    # refused before the model is loaded (the module:function does not exist: loading it would be another error)
    out = tmp_path / "never.onnx"
    assert main(["convert", "tiny_models:not_there", "--method", "tome", "--r", "2", "--keep-ratio", "0.5",
                 "-o", str(out)]) == 1
    err = capfd.readouterr().err.strip()
    assert err.startswith("tokenreduce: error: setting keep_ratio does not apply to method 'tome'")
    assert err.endswith("(command-line flag: --keep-ratio)")
    assert sorted(tmp_path.iterdir()) == []


def test_inspect_without_method_gives_each_method_its_flags() -> None:
    from types import SimpleNamespace

    from tokenreduce.cli.methods import inspect_setting

    args = build_parser()[0].parse_args(["inspect", "m:f", "--r", "4", "--keep-ratio", "0.5", "--no-fuse"])
    blocks = [SimpleNamespace(index=i, num_tokens=17, reducible=True) for i in range(12)]
    analysis = SimpleNamespace(blocks=blocks, num_protected=1)  # what inspect_setting reads of an analysis
    tome, _, _ = inspect_setting("tome", args, analysis)
    evit, _, _ = inspect_setting("evit", args, analysis)
    assert tome == {"method": "tome", "r": 4}
    assert evit == {"method": "evit", "keep_ratio": 0.5, "layers": [3, 6, 9], "fuse": False}


# ============================================================================================ package shape
def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


@pytest.mark.parametrize("path", sorted(CLI_PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_cli_module_shape(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 500, f"{path.name} is over 500 lines"
    for module, names in _imports(path):
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        assert not private, f"{path.name} imports private names {private} from {module}"
        if path.name == "__init__.py":
            continue
        commands = {f"tokenreduce.cli.{c}" for c in COMMAND_MODULES}
        assert module not in commands, f"{path.name} imports the command module {module}"
        if module == "tokenreduce.cli":
            assert not set(names) & COMMAND_MODULES, f"{path.name} imports command modules {names}"


def test_old_modules_are_gone() -> None:
    root = CLI_PACKAGE.parent
    assert not (root / "cli.py").exists() and not (root / "cli_decoder.py").exists()
