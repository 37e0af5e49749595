"""Built-in real benchmarks: three generated from WordNet 3.0 by
``scripts/build_wordnet_benchmarks.py``, and ``debian-sections`` (short texts outside WordNet:
Debian package synopses -> archive section) by ``scripts/build_debian_sections.py``.

See ``docs/benchmarks.md`` for how they were built, their sizes and class lists. WordNet's
licence is in ``LICENSE-WordNet`` beside the data files, the Debian data's notice in
``NOTICE-debian-sections``; ``freedict-translation`` (a generative stream: English word ->
its translation, one task per language) by ``scripts/build_freedict_translation.py`` from the
FreeDict dictionaries (GPL-2.0-or-later, ``NOTICE-freedict-translation``).
"""

from __future__ import annotations

import json
from pathlib import Path

from conpet.data.formats import build_stream, read_rows
from conpet.data.stream import Stream
from conpet.errors import DataError

HERE = Path(__file__).parent

BENCHMARKS: dict[str, str] = {
    "wordnet-typing": "wordnet_typing",
    "wordnet-relations": "wordnet_relations",
    "wordnet-fine": "wordnet_fine",
    "debian-sections": "debian_sections",
    "freedict-translation": "freedict_translation",
}


def benchmark_meta(name: str) -> dict:
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark '{name}' (built in: {', '.join(BENCHMARKS)})")
    path = HERE / f"{BENCHMARKS[name]}.meta.json"
    if not path.is_file():
        raise DataError(f"{path}: benchmark file missing; rebuild with scripts/build_wordnet_benchmarks.py")
    return json.loads(path.read_text(encoding="utf-8"))


def load_benchmark(name: str, max_train_per_class: int | None = None) -> Stream:
    """Load a built-in benchmark as a Stream (tasks as listed in its meta file)."""
    meta = benchmark_meta(name)
    rows = read_rows(HERE / f"{BENCHMARKS[name]}.jsonl.gz")
    groups = [(f"task-{i + 1:02d}", list(labels)) for i, labels in enumerate(meta["tasks"])]
    kind = {"typing": "typing", "relation": "relation", "text": "text", "generate": "generate"}[meta["kind"]]
    if kind == "generate":
        groups = [(labels[0], list(labels)) for labels in meta["tasks"]]
    stream = build_stream(name, rows, groups, kind, f"{name} meta", max_train_per_class)
    stream.metric = meta.get("metric")
    return stream
