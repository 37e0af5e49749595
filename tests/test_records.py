"""Every benchmark record says how it was made (bench/record.py): the exact command, the commit,
the date, the machine (CPU model, cores, threads) and the torch/transformers/peft versions. A
record filled over several sessions (rows with their own date) carries that for every row.
Records made before this rule live in bench/results/archive/; the user docs never quote them
(dated notes in bench/notes/ may)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))

from record import missing_fields, provenance, write_record  # noqa: E402

RECORDS = sorted(RESULTS.glob("*.json"))


def row_lists(record: dict) -> list[list]:
    return [v for k, v in record.items() if k in ("runs", "rows") and isinstance(v, list)]


@pytest.mark.parametrize("path", RECORDS, ids=[p.name for p in RECORDS])
def test_every_record_says_how_it_was_made(path):
    record = json.loads(path.read_text())
    assert not missing_fields(record), f"{path.name}: no {', '.join(missing_fields(record))}"
    for rows in row_lists(record):
        for k, row in enumerate(rows):
            if isinstance(row, dict) and "date" in row:  # appended by a later session
                assert not missing_fields(row), f"{path.name}: row {k} has no {', '.join(missing_fields(row))}"


USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_user_docs_quote_no_archived_record():
    quoting = [doc.name for doc in USER_DOCS if re.search(r"results/archive|\barchived\b", doc.read_text())]
    assert not quoting, f"these quote an archived record (move the figure to bench/notes/ or re-measure it): {quoting}"


def test_the_docs_name_only_records_that_exist():
    import re

    named = set()
    for doc in USER_DOCS + sorted((ROOT / "bench" / "notes").glob("*.md")):
        named |= {(doc.name, m) for m in re.findall(r"bench/results/[\w./-]+\.json", doc.read_text())}
    missing = sorted(f"{doc}: {m}" for doc, m in named if not (ROOT / m).is_file())
    assert not missing, missing


def test_provenance_names_the_command_commit_machine_and_versions(tmp_path):
    out = write_record(tmp_path / "r.json", {"results": [1]}, argv=[str(ROOT / "bench" / "speed.py"), "--seeds", "3"])
    assert out["provenance"]["command"] == "python bench/speed.py --seeds 3"
    assert len(out["provenance"]["commit"]) == 40 and out["provenance"]["machine"]["cores"] >= 1
    assert json.loads((tmp_path / "r.json").read_text())["results"] == [1]
    assert not missing_fields(out)
    assert missing_fields({"provenance": {**provenance(), "versions": {"torch": "2.13"}}}) == [
        "versions.python", "versions.transformers", "versions.peft"]
