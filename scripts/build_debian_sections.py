#!/usr/bin/env python3
"""Build ``debian-sections``: a text-classification stream of short real texts outside WordNet.

Each row is the one-line synopsis of a Debian package (``Description:`` of the bookworm main
``Packages`` index, e.g. "GNU Image Manipulation Program"), labelled with the package's archive
section (``graphics``). 24 sections, 6 tasks of 4; per section 60 train / 10 dev / 20 test rows.

- One row per *source* package (binary packages of one source share their wording), and no two
  rows with the same synopsis (case-insensitive): nothing in the test split is a rewording of a
  training row from the same source.
- Package names never appear as a field; a synopsis that contains its own package name is
  dropped (it would give the section away: ``python3-foo``, ``golang-bar``).
- Everything is sorted before a seeded ``random.Random`` shuffle and gzip uses ``mtime=0``, so a
  rebuild from the same ``Packages`` files gives the same bytes.

It is the stream held out from the choice of ``train.top_layers`` (docs/speed.md): none of
conpet's defaults was chosen on it.

Usage (needs the apt lists of Debian bookworm: ``apt-get update`` on a bookworm machine)::

    python scripts/build_debian_sections.py              # reads `apt-cache dumpavail`
    python scripts/build_debian_sections.py --packages FILE [FILE ...]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import subprocess
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "src" / "conpet" / "data" / "benchmarks"
SECTIONS = ["admin", "database", "devel", "editors", "electronics", "fonts", "games", "gnome", "graphics", "java",
            "interpreters", "kde", "mail", "math", "net", "perl", "python", "science", "sound", "text", "utils", "video",
            "web", "x11"]
COUNTS = {"train": 60, "dev": 10, "test": 20}
N_TASKS = 6


def parse_packages(text: str) -> list[dict[str, str]]:
    """Stanzas of a Debian ``Packages`` file as dicts (continuation lines dropped)."""
    out = []
    for stanza in text.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            out.append(fields)
    return out


def rows_by_section(stanzas: list[dict[str, str]]) -> dict[str, list[dict]]:
    """One candidate row per (section, source package), deduplicated by synopsis."""
    chosen: dict[tuple[str, str], dict] = {}
    for f in sorted(stanzas, key=lambda f: (f.get("Package", ""), f.get("Version", ""))):
        section, synopsis = f.get("Section", ""), f.get("Description", "")
        if section not in SECTIONS or not synopsis:
            continue
        package = f["Package"]
        source = f.get("Source", package).split()[0]
        if package.lower() in synopsis.lower() or source.lower() in synopsis.lower():
            continue
        key = (section, source)
        if key not in chosen or package == source:  # prefer the binary named after its source
            chosen[key] = {"text": synopsis, "label": section, "source": source, "id": package}
    seen: set[str] = set()
    out: dict[str, list[dict]] = defaultdict(list)
    for (section, source), row in sorted(chosen.items()):
        norm = re.sub(r"\s+", " ", row["text"].lower()).strip(" .")
        if norm in seen:
            continue
        seen.add(norm)
        out[section].append(row)
    return out


def build(stanzas: list[dict[str, str]], seed: int = 0) -> tuple[list[dict], dict]:
    rng = random.Random(seed)
    by_section = rows_by_section(stanzas)
    need = sum(COUNTS.values())
    rows, counts = [], {}
    for section in SECTIONS:
        pool = sorted(by_section[section], key=lambda r: r["source"])
        if len(pool) < need:
            raise SystemExit(f"section {section}: {len(pool)} usable packages, {need} needed")
        rng.shuffle(pool)
        start = 0
        for split, n in COUNTS.items():
            for row in pool[start:start + n]:
                rows.append({"id": row["id"], "text": row["text"], "label": section, "split": split})
            start += n
        counts[section] = dict(COUNTS)
    order = list(SECTIONS)
    rng.shuffle(order)
    tasks = [sorted(order[k::N_TASKS]) for k in range(N_TASKS)]
    meta = {"name": "debian-sections", "kind": "text",
            "description": "Short-text classification outside WordNet: the one-line synopsis of a Debian package "
                           "(bookworm main) labelled with its archive section (graphics, mail, science, ...). One "
                           "row per source package, synopses deduplicated, none naming its own package.",
            "source": "Debian 12 (bookworm) main Packages index, Description and Section fields",
            "seed": seed, "tasks": tasks, "counts": counts}
    return rows, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packages", nargs="*", type=Path, help="Packages files (default: `apt-cache dumpavail`)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.packages:
        text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in args.packages)
    else:
        text = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True, text=True).stdout
    rows, meta = build(parse_packages(text), args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()
    with open(args.out / "debian_sections.jsonl.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(data)
    (args.out / "debian_sections.meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"debian-sections: {len(rows)} rows, {len(SECTIONS)} sections, tasks {meta['tasks']}")


if __name__ == "__main__":
    main()
