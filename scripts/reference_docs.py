"""Write the generated reference pages: docs/config.md (every config key, from the dataclasses of
src/conpet/config.py and their field docstrings) and docs/cli.md (every command's --help).

    python scripts/reference_docs.py          # rewrite both
    python scripts/reference_docs.py --check  # exit 1 if either is out of date (the tests run this)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import os
import re
import sys
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DOC, CLI_DOC = ROOT / "docs" / "config.md", ROOT / "docs" / "cli.md"
SECTIONS = {"RunConfig": "", "DataConfig": "data", "PETConfig": "pet", "TrainConfig": "train",
            "BackboneConfig": "backbone"}


def field_docs(source: str) -> dict[str, dict[str, str]]:
    """class -> field -> the docstring written under the field."""
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            docs = out.setdefault(node.name, {})
            for a, b in zip(node.body, node.body[1:]):
                if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                        and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                    text = " ".join(b.value.value.split())
                    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)  # Sphinx roles -> code
                    docs[a.target.id] = text.replace("``", "`")
    return out


def config_page() -> str:
    from conpet import config

    docs = field_docs((ROOT / "src" / "conpet" / "config.py").read_text(encoding="utf-8"))
    lines = ["# Configuration reference", "",
             "Every key of a run's config (`conpet.config.RunConfig`), as YAML (`--config my.yaml`), "
             "`--set key=value` or the flag `conpet run --help` lists; a run saves the resolved config as "
             "`config.yaml`. Generated from `src/conpet/config.py` by `python scripts/reference_docs.py`.", ""]
    for cls_name, section in SECTIONS.items():
        cls = getattr(config, cls_name)
        lines += [f"## `{section or 'top level'}`", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
                continue  # a section of its own
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            key = f"{section}.{f.name}" if section else f.name
            text = docs.get(cls_name, {}).get(f.name, "").replace("|", "\\|")
            lines.append(f"| `{key}` | `{'null' if default is None else default}` | {text} |")
        lines.append("")
    return "\n".join(lines)


def cli_page() -> str:
    from conpet.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = ["# Command-line reference", "",
             "Every `conpet` command with its `--help`. Generated from `src/conpet/cli.py` by "
             "`python scripts/reference_docs.py`.", ""]
    for name, command in sub.choices.items():
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            command.print_help()
        lines += [f"## `conpet {name}`", "", "```", buffer.getvalue().rstrip(), "```", ""]
    return "\n".join(lines)


def main() -> int:
    os.environ["COLUMNS"] = "100"  # argparse wraps help text to the terminal: the same page everywhere
    check = "--check" in sys.argv[1:]
    stale = []
    for path, text in ((CONFIG_DOC, config_page()), (CLI_DOC, cli_page())):
        if check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path.relative_to(ROOT).as_posix())
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date: {', '.join(stale)} (run python scripts/reference_docs.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
