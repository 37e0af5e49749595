"""Checks of the built-in WordNet benchmarks (committed data files).

These tests read the .jsonl.gz / .meta.json files directly (no conpet import)
and, when /usr/share/wordnet is available, rebuild them with
scripts/build_wordnet_benchmarks.py and compare bytes.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "src" / "conpet" / "data" / "benchmarks"
BUILDER = ROOT / "scripts" / "build_wordnet_benchmarks.py"
WORDNET = Path("/usr/share/wordnet")
WORDNET_LICENSE = Path("/usr/share/doc/wordnet-base/copyright")
SPLITS = ("train", "dev", "test")
CAPS = {"train": 64, "dev": 16, "test": 32}
MINIMA = {"train": 40, "dev": 8, "test": 16}
FINE_CAPS = {"train": 32, "dev": 8, "test": 16}
FINE_MINIMA = {"train": 20, "dev": 4, "test": 8}
FILES = (
    "wordnet_typing.jsonl.gz",
    "wordnet_typing.meta.json",
    "wordnet_relations.jsonl.gz",
    "wordnet_relations.meta.json",
    "wordnet_fine.jsonl.gz",
    "wordnet_fine.meta.json",
    "LICENSE-WordNet",
)


def load(name: str):
    with gzip.open(DATA / f"{name}.jsonl.gz", "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    meta = json.loads((DATA / f"{name}.meta.json").read_text(encoding="utf-8"))
    return rows, meta


@pytest.fixture(scope="module")
def typing_data():
    return load("wordnet_typing")


@pytest.fixture(scope="module")
def relation_data():
    return load("wordnet_relations")


@pytest.fixture(scope="module")
def fine_data():
    return load("wordnet_fine")


def _check_meta(rows, meta, kind, n_tasks_exact=None, min_tasks=1, min_classes=1,
                caps=CAPS, minima=MINIMA):
    assert meta["kind"] == kind
    assert meta["source"].startswith("WordNet 3.0")
    assert isinstance(meta["seed"], int)
    assert meta["description"]
    labels = {row["label"] for row in rows}
    assert len(labels) >= min_classes
    tasks = meta["tasks"]
    if n_tasks_exact is not None:
        assert len(tasks) == n_tasks_exact
    assert len(tasks) >= min_tasks
    flat = [label for task in tasks for label in task]
    assert len(flat) == len(set(flat)), "tasks must be class-disjoint"
    assert set(flat) == labels, "tasks must cover exactly the labels present"
    sizes = [len(task) for task in tasks]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    counts = defaultdict(Counter)
    for row in rows:
        counts[row["label"]][row["split"]] += 1
    assert set(meta["counts"]) == labels
    for label, per_split in meta["counts"].items():
        assert set(per_split) == set(SPLITS)
        for split in SPLITS:
            assert per_split[split] == counts[label][split], (label, split)
            assert minima[split] <= per_split[split] <= caps[split], (label, split)


def _check_common(rows, prefix):
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids))
    assert all(i.startswith(prefix) for i in ids)
    assert {row["split"] for row in rows} == set(SPLITS)
    for row in rows:
        assert isinstance(row["text"], str) and row["text"].strip() == row["text"]
        assert row["text"] and row["label"]


def test_typing_rows(typing_data):
    rows, _ = typing_data
    _check_common(rows, "typing-")
    for row in rows:
        assert set(row) >= {"id", "text", "entity", "label", "split", "synset"}
        assert row["entity"] and row["entity"] in row["text"], row
        assert row["label"].startswith(("noun.", "verb.")) and row["label"] != "noun.Tops"
        pos, offset = row["synset"].split(":")
        assert pos == row["label"].split(".")[0] and len(offset) == 8 and offset.isdigit()
        assert ";" not in row["text"] and '"' not in row["text"]


def _check_typing_splits_disjoint(rows):
    by_synset = defaultdict(set)
    by_lemma = defaultdict(set)
    by_entity = defaultdict(set)
    for row in rows:
        by_synset[row["synset"]].add(row["split"])
        by_lemma[row["lemma"]].add(row["split"])
        by_entity[row["entity"].lower()].add(row["split"])
    assert all(len(s) == 1 for s in by_synset.values()), "synset in several splits"
    assert all(len(s) == 1 for s in by_lemma.values()), "lemma in several splits"
    assert all(len(s) == 1 for s in by_entity.values()), "entity in several splits"
    # one row per synset and per lemma
    assert len(by_synset) == len(rows)
    assert len(by_lemma) == len(rows)


def test_typing_splits_disjoint(typing_data):
    rows, _ = typing_data
    _check_typing_splits_disjoint(rows)


def test_typing_meta(typing_data):
    rows, meta = typing_data
    assert meta["name"] == "wordnet-typing"
    _check_meta(rows, meta, "typing", n_tasks_exact=10, min_classes=30)


def test_relation_rows(relation_data):
    rows, _ = relation_data
    _check_common(rows, "rel-")
    for row in rows:
        assert set(row) >= {"id", "text", "head", "tail", "label", "split", "pair"}
        assert row["head"] and row["head"] in row["text"], row
        assert row["tail"] and row["tail"] in row["text"], row
        assert row["text"].startswith(row["head"] + ": ")
        assert row["head"].lower() != row["tail"].lower()
        head_key, tail_key = row["pair"].split("-")
        assert head_key.split(":")[0] in {"noun", "verb", "adj", "adv"}
        assert tail_key.split(":")[0] in {"noun", "verb", "adj", "adv"}


def test_relation_splits_disjoint(relation_data):
    rows, _ = relation_data
    by_pair = defaultdict(set)
    by_head = defaultdict(set)
    unordered = Counter()
    for row in rows:
        head_key, tail_key = row["pair"].split("-")
        by_pair[row["pair"]].add(row["split"])
        by_head[head_key].add(row["split"])
        unordered[tuple(sorted((head_key, tail_key)))] += 1
    assert all(len(s) == 1 for s in by_pair.values()), "pair in several splits"
    assert all(len(s) == 1 for s in by_head.values()), "head synset in several splits"
    # no (A, B) and (B, A), and no repeated pair, anywhere in the benchmark
    assert max(unordered.values()) == 1


def test_relation_meta(relation_data):
    rows, meta = relation_data
    assert meta["name"] == "wordnet-relations"
    _check_meta(rows, meta, "relation", n_tasks_exact=4, min_tasks=4, min_classes=12)
    assert "hypernym" in meta["counts"]


def test_fine_rows(fine_data):
    rows, meta = fine_data
    _check_common(rows, "fine-")
    for row in rows:
        assert set(row) >= {"id", "text", "entity", "label", "split", "synset", "lemma"}
        assert row["entity"] and row["entity"] in row["text"], row
        assert row["lemma"] == row["lemma"].lower()
        pos, offset = row["synset"].split(":")
        assert pos == "noun" and len(offset) == 8 and offset.isdigit()
        assert ";" not in row["text"] and '"' not in row["text"]
        # a sense is never labelled with its own category synset
        assert row["synset"] != meta["categories"][row["label"]]["synset"]


def test_fine_splits_disjoint(fine_data):
    rows, _ = fine_data
    _check_typing_splits_disjoint(rows)


def test_fine_meta(fine_data):
    rows, meta = fine_data
    assert meta["name"] == "wordnet-fine"
    _check_meta(rows, meta, "typing", min_tasks=20, min_classes=100,
                caps=FINE_CAPS, minima=FINE_MINIMA)
    assert len(meta["tasks"]) >= 20 and len(meta["counts"]) >= 100
    # every label has train, dev and test rows
    per_label = defaultdict(set)
    for row in rows:
        per_label[row["label"]].add(row["split"])
    assert all(splits == set(SPLITS) for splits in per_label.values())
    # labels are readable category names: first lemma (+ .n.N only on a clash)
    cats = meta["categories"]
    assert set(cats) == set(meta["counts"])
    synsets = [cat["synset"] for cat in cats.values()]
    assert len(synsets) == len(set(synsets))
    for label, cat in cats.items():
        base = cat["lemmas"][0].replace(" ", "_")
        assert label == base or label.startswith(base + ".n."), label
        assert cat["synset"].startswith("noun:") and cat["definition"]
    # no typing label (supersense) is reused here
    assert not any(label.startswith(("noun.", "verb.")) for label in cats)


def test_fine_categories_are_exclusive(fine_data):
    """Each synset has one label, and (when WordNet is installed) descends
    from exactly one category synset, which is not an ancestor of another."""
    rows, meta = fine_data
    labels_of = defaultdict(set)
    for row in rows:
        labels_of[row["synset"]].add(row["label"])
    assert all(len(v) == 1 for v in labels_of.values())
    if not (WORDNET / "data.noun").exists():
        pytest.skip("WordNet 3.0 (Debian package wordnet-base) is not installed")
    parents = defaultdict(set)
    with open(WORDNET / "data.noun", encoding="latin-1") as handle:
        for line in handle:
            if line.startswith("  "):
                continue
            fields = line.split(" | ")[0].split()
            i = 4 + 2 * int(fields[3], 16)
            for j in range(int(fields[i])):
                sym, off, pos = fields[i + 1 + 4 * j:i + 4 + 4 * j]
                if sym in ("@", "@i") and pos == "n":
                    parents[fields[0]].add(off)

    def ancestors(off):
        seen, todo = set(), [off]
        while todo:
            for parent in parents[todo.pop()]:
                if parent not in seen:
                    seen.add(parent)
                    todo.append(parent)
        return seen

    cat_of = {cat["synset"].split(":")[1]: label for label, cat in meta["categories"].items()}
    for off in cat_of:
        assert not ancestors(off) & set(cat_of), "a category lies below another"
    for row in rows:
        found = ancestors(row["synset"].split(":")[1]) & set(cat_of)
        assert [cat_of[c] for c in found] == [row["label"]], row


def test_license_present():
    text = (DATA / "LICENSE-WordNet").read_text(encoding="utf-8")
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in text


@pytest.mark.slow
def test_rebuild_is_byte_identical(tmp_path):
    if not (WORDNET / "data.noun").exists() or not WORDNET_LICENSE.exists():
        pytest.skip("WordNet 3.0 (Debian package wordnet-base) is not installed")
    subprocess.run(
        [sys.executable, str(BUILDER), "--wordnet-dir", str(WORDNET), "--out", str(tmp_path)],
        check=True, capture_output=True,
    )
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
