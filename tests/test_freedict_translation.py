"""The built-in generative stream ``freedict-translation``: its shape, its splits (no test
headword trained on in any language), its targets and answers, and a byte-identical rebuild."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conpet.config import DataConfig
from conpet.data import load_stream

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "conpet" / "data" / "benchmarks"
BUILDER = ROOT / "scripts" / "build_freedict_translation.py"
DICTD = Path("/usr/share/dictd")
FILES = ("freedict_translation.jsonl.gz", "freedict_translation.meta.json")
LANGUAGES = ["french", "german", "spanish", "italian", "portuguese", "dutch"]


def test_stream_shape_and_splits():
    stream = load_stream(DataConfig(benchmark="freedict-translation"))
    assert stream.generative and [t.name for t in stream.tasks] == LANGUAGES and stream.metric == "chrf"
    for task in stream.tasks:
        assert len(task.train) >= 500 and task.dev and task.test
    word = lambda i: stream.rows[i].text.split('"')[1]  # noqa: E731
    train_words = {word(i) for t in stream.tasks for i in t.train}
    test_words = {word(i) for t in stream.tasks for i in t.test}
    assert not train_words & test_words  # disjoint by headword across every language
    for row in stream.rows:
        assert row.target == row.references[0] and len(set(row.references)) == len(row.references)
        assert all(1 <= len(a.split()) <= 3 for a in row.references)


def test_main_translation_is_the_one_listed_in_most_senses():
    sys.path.insert(0, str(BUILDER.parent))
    try:
        from build_freedict_translation import main_translation, senses
    finally:
        sys.path.pop(0)
    entry = "ham /hæm/\nFunkamateur <masc>, Funkamateurin <fem>\n   Synonyms: {radio amateur}\n"
    assert senses(entry, "ham") == [["Funkamateur", "Funkamateurin"]]
    assert senses("‐able /ˈeɪbəl/\n‐able\n", "able") == []  # headed by another word
    assert senses('group /g/\n1. Gruppe <fem>\n      "a group of people"  - eine Gruppe\n2. Herde\n', "group") == \
        [["Gruppe"], ["Herde"]]
    assert main_translation([["Funkamateur"], ["Outrant"], ["Schinken"], ["Prosciutto", "Schinken"]]) == "Schinken"
    assert main_translation([["apte à", "capable"], ["compétent"]]) == "apte à"
    rows = {r["id"]: r for r in map(json.loads, gzip.open(DATA / FILES[0]))}
    assert rows["deu:ham"]["target"] == "Schinken" and "Funkamateur" in rows["deu:ham"]["answers"]


def test_rebuild_is_byte_identical(tmp_path):
    codes = ("fra", "deu", "spa", "ita", "por", "nld")
    if not all((DICTD / f"freedict-eng-{c}.index").exists() for c in codes):
        pytest.skip("the FreeDict dictionaries (Debian dict-freedict-eng-*) are not installed")
    subprocess.run([sys.executable, str(BUILDER), "--dictd", str(DICTD), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
