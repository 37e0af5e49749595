"""The documentation a user reads: the generated reference pages are current, every page is
reachable from the index, every relative link resolves, the README stays short."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_the_generated_reference_pages_are_current():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "reference_docs.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_config_key_says_what_it_does():
    undocumented = [line.split("|")[1].strip() for line in (DOCS / "config.md").read_text().splitlines()
                    if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not undocumented, f"give these a field docstring in src/conpet/config.py: {undocumented}"


def test_every_page_is_in_the_index_and_every_link_resolves():
    index = (DOCS / "README.md").read_text()
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    linked = set(re.findall(r"\]\(([\w-]+\.md)", index))
    assert pages <= linked, f"not in docs/README.md: {sorted(pages - linked)}"
    broken = []
    for doc in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:\s]+\.md)(?:#[\w-]+)?\)", doc.read_text()):
            if not (doc.parent / target).is_file():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines < 200, f"README.md has {lines} lines: move detail into docs/"
