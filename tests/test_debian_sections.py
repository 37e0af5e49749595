"""The `debian-sections` benchmark (short real texts outside WordNet) and its builder's rules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conpet.data.benchmarks import BENCHMARKS, load_benchmark

BUILDER = Path(__file__).resolve().parents[1] / "scripts" / "build_debian_sections.py"


def _builder():
    spec = importlib.util.spec_from_file_location("build_debian_sections", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_stream_has_6_tasks_of_4_sections_and_clean_splits():
    assert "debian-sections" in BENCHMARKS
    stream = load_benchmark("debian-sections")
    assert stream.kind == "text" and len(stream.tasks) == 6 and all(len(t.labels) == 4 for t in stream.tasks)
    for task in stream.tasks:
        for label in task.labels:
            rows = [stream.rows[i] for split in (task.train, task.dev, task.test) for i in split
                    if stream.rows[i].label == label]
            assert [sum(r.split == s for r in rows) for s in ("train", "dev", "test")] == [60, 10, 20]
    texts = [r.text.lower().strip(" .") for r in stream.rows]
    assert len(set(texts)) == len(texts), "no synopsis twice"
    assert len({r.id for r in stream.rows}) == len(stream.rows)
    assert not any(r.id.lower() in r.text.lower() for r in stream.rows), "no text names its own package"


def test_builder_keeps_one_row_per_source_and_drops_self_naming_and_duplicate_synopses():
    b = _builder()
    packages = """Package: libfoo1
Source: foo (1.0-1)
Section: graphics
Description: image filters for painting programs

Package: foo
Section: graphics
Description: image filters for painting programs, the tool

Package: barview
Section: graphics
Description: barview shows bars

Package: baz
Section: graphics
Description: Image filters for painting programs, the tool.

Package: qux
Section: graphics
Description: vector drawing editor
"""
    chosen = {}
    for row in b.rows_by_section(b.parse_packages(packages[:packages.index("Package: barview")]))["graphics"]:
        chosen[row["source"]] = row["id"]
    assert chosen == {"foo": "foo"}, "one row per source, the binary named after it"
    rows = b.rows_by_section(b.parse_packages(packages))["graphics"]
    # barview names itself; foo's synopsis is baz's up to case and the final dot: one of them stays
    assert [r["id"] for r in rows] == ["baz", "qux"]
