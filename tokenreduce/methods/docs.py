"""The settings table of README.md, generated from the registry so the docs cannot drift from the code.

    python -m tokenreduce.methods.docs          # prints the markdown table
    python -m tokenreduce.methods.docs --check README.md   # exit 1 when the README's table is stale

The README holds the table between `<!-- settings:begin -->` and `<!-- settings:end -->`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from tokenreduce.methods import registry
from tokenreduce.methods.settings import Settings

BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"

COMMON_HELP = {  # name -> (applies to, meaning)
    "method": ("all", "one of " + ", ".join(f"`{n}`" for n in registry.METHODS)),
    "protected_tokens": ("encoder methods", "leading tokens never reduced; default: detected (CLS, distillation, "
                                            "registers; first token of text models)"),
    "unmerge": ("encoder methods", "restore the original token count at the outputs"),
    "inner": ("all", "inner compiler: `\"inductor\"` or `\"eager\"` (`reduce_decoder`: `\"eager\"` by default)"),
    "dynamic_batch": ("encoder methods", "one graph for every batch size (`tokenreduce.compile`)"),
}


def table() -> str:
    lines = ["| setting | applies to | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        if f.name == "options":
            continue
        applies, meaning = COMMON_HELP[f.name]
        lines.append(f"| `{f.name}` | {applies} | `{f.default!r}` | {meaning} |")
    rows: dict[str, tuple[list[str], object, str]] = {}
    for m in registry.METHODS.values():
        for f in dataclasses.fields(m.options_type):
            key = f"{f.name}|{f.default!r}|{f.metadata['help']}"
            rows.setdefault(key, ([], f.default, f.name))[0].append(m.name)
    for key, (users, default, name) in rows.items():
        help_text = key.split("|", 2)[2]
        lines.append(f"| `{name}` | {', '.join(users)} | `{default!r}` | {help_text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", type=Path, help="a markdown file whose settings table must equal the generated one")
    args = p.parse_args(argv)
    if args.check is None:
        print(table())
        return 0
    text = args.check.read_text()
    if BEGIN not in text or END not in text:
        print(f"{args.check}: no {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    current = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    if current != table():
        print(f"{args.check}: the settings table is stale; regenerate it with `python -m tokenreduce.methods.docs`",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
