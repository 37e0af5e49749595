"""Property-based fuzzing of the data and config loaders: whatever bytes a user hands over, the
answer is rows or one clear ConpetError (never a traceback), and a failed ``conpet run`` leaves
no run directory behind."""

from __future__ import annotations

import gzip
import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conpet.cli import main
from conpet.config import load_config
from conpet.data.formats import read_rows, read_task_file
from conpet.errors import ConpetError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                         st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=6)
field_names = st.sampled_from(["text", "label", "split", "entity", "head", "tail", "id", "lable", "Text", "x", ""])
records = st.dictionaries(field_names, json_values, max_size=6)


def _read(path, **kwargs):
    try:
        return read_rows(path, **kwargs)
    except ConpetError as e:
        assert str(e) and "\n" not in str(e)
        return None


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".csv", ".tsv", ".jsonl.gz", ".txt"]))
def test_arbitrary_bytes(tmp_path, data, suffix):
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") and data[:1] != b"x" else data)
    _read(path)


@FUZZ
@given(rows=st.lists(st.one_of(records, json_values), min_size=0, max_size=6), require_label=st.booleans())
def test_jsonl_of_arbitrary_json(tmp_path, rows, require_label):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    out = _read(path, require_label=require_label)
    if out is not None:
        assert all(isinstance(r.text, str) and isinstance(r.label, str) for r in out)


@FUZZ
@given(header=st.lists(field_names, min_size=1, max_size=4),
       cells=st.lists(st.lists(st.text(alphabet=string.printable, max_size=8), max_size=5), max_size=5))
def test_csv_of_arbitrary_cells(tmp_path, header, cells):
    path = tmp_path / "rows.csv"
    path.write_text("\n".join([",".join(header)] + [",".join(c) for c in cells]), encoding="utf-8")
    _read(path)


@FUZZ
@given(text=st.text(max_size=200))
def test_task_files(tmp_path, text):
    path = tmp_path / "tasks.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        read_task_file(path)
    except ConpetError as e:
        assert str(e)


yaml_text = st.one_of(
    st.text(max_size=200),
    st.dictionaries(st.sampled_from(["model", "learner", "seeds", "train", "data", "pet", "epoch", "x"]),
                    json_values, max_size=4).map(json.dumps),
    st.builds(lambda k, v: f"train:\n  {k}: {json.dumps(v)}\n",
              st.sampled_from(["epochs", "lr", "batch_size", "top_layers", "precision", "epoch"]), json_scalars),
)


@FUZZ
@given(text=yaml_text)
def test_config_files(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(str(path))
    except ConpetError as e:
        assert str(e)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(records, min_size=1, max_size=5), tasks=st.text(max_size=60))
def test_failed_run_leaves_no_run_directory(tmp_path, capsys, rows, tasks):
    data, task_file, out = tmp_path / "d.jsonl", tmp_path / "t.yaml", tmp_path / "out"
    data.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    task_file.write_text(tasks, encoding="utf-8")
    code = main(["run", "--data", str(data), "--tasks", str(task_file), "--model", str(tmp_path / "no-model"),
                 "--out", str(out), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("conpet: error: ") and "Traceback" not in err
    assert not out.exists()
