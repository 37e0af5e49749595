import json

import pytest

from conpet.config import DataConfig
from conpet.data import load_stream
from conpet.data.formats import build_stream, read_rows, read_task_file, split_labels
from conpet.data.stream import Row
from conpet.errors import DataError


def test_stream_from_files_indexes_rows_into_tasks(typing_data):
    data, tasks = typing_data
    stream = load_stream(DataConfig(file=str(data), tasks=str(tasks)))
    assert stream.kind == "typing"
    assert [t.labels for t in stream.tasks] == [("animal", "food"), ("tool", "place")]
    assert stream.labels == ["animal", "food", "tool", "place"]
    assert stream.class_range(1) == (2, 4)
    for t, task in enumerate(stream.tasks):
        for split in ("train", "dev", "test"):
            assert all(stream.task_of_label[stream.rows[i].label] == t for i in task.split(split))
            assert all(stream.rows[i].split == split for i in task.split(split))
    assert sum(len(t.train) + len(t.dev) + len(t.test) for t in stream.tasks) == len(stream.rows) == 48


def test_csv_and_char_offsets(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label,entity\n"I like the dog.",animal,\n"The cake is good.",food,\n')
    rows = read_rows(path)
    assert [r.label for r in rows] == ["animal", "food"]
    row = read_rows(_jsonl(tmp_path, [{"text": "I like the dog.", "label": "a", "entity": [11, 14]}]))[0]
    assert row.entity == "dog"


def _jsonl(tmp_path, records, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.mark.parametrize("records, message", [
    (['{"text": "a", "label": "x"}', '{"text": "b", "label": }'], r"d.jsonl:2: invalid JSON"),
    ([{"text": "a"}], r"d.jsonl:1: missing field 'label'"),
    ([{"text": 3, "label": "x"}], r"d.jsonl:1: field 'text' must be a string"),
    ([{"text": "a", "label": "x", "split": "holdout"}], r"d.jsonl:1: field 'split' must be one of"),
    ([{"text": "a", "label": "x", "entity": [5, 9]}], r"d.jsonl:1: field 'entity' span \[5, 9\] is outside"),
    (['[1, 2]'], r"d.jsonl:1: expected a JSON object"),
    ([{"text": "a", "label": "x", "split": "train"}, {"text": "b", "label": "x"}], r"d.jsonl:2: field 'split' is missing"),
])
def test_bad_rows_name_file_and_line(tmp_path, records, message):
    with pytest.raises(DataError, match=message):
        read_rows(_jsonl(tmp_path, records))


def test_empty_and_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match="no rows"):
        read_rows(_jsonl(tmp_path, []))
    with pytest.raises(DataError, match="data file not found"):
        read_rows(tmp_path / "nope.jsonl")
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9", "label": "x"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        read_rows(bad)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")  # a truncated Parquet file
    with pytest.raises(DataError, match="d.parquet: cannot read Parquet"):
        read_rows(tmp_path / "d.parquet")
    (tmp_path / "d.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match="unknown data format"):
        read_rows(tmp_path / "d.xlsx")


def _rows(labels_per_split):
    return [Row(text=f"t{i}", label=label, split=split, where=f"d.jsonl:{i + 1}")
            for i, (label, split) in enumerate(labels_per_split)]


def test_label_in_no_task_is_named_with_its_line():
    rows = _rows([("a", "train"), ("a", "test"), ("b", "train"), ("b", "test")])
    with pytest.raises(DataError, match=r"d.jsonl:3: label 'b' is in no task of tasks.json"):
        build_stream("s", rows, [("t1", ["a"])], "text", "tasks.json")


def test_label_in_two_tasks_and_empty_tasks():
    rows = _rows([("a", "train"), ("a", "test"), ("b", "train"), ("b", "test")])
    with pytest.raises(DataError, match=r"label 'a' is in tasks 't1' and 't2'"):
        build_stream("s", rows, [("t1", ["a"]), ("t2", ["a", "b"])], "text", "tasks.json")
    with pytest.raises(DataError, match=r"task 't2' label 'c' has no rows"):
        build_stream("s", rows, [("t1", ["a", "b"]), ("t2", ["c"])], "text", "tasks.json")
    with pytest.raises(DataError, match=r"task 't1' has no test rows"):
        build_stream("s", _rows([("a", "train")]), [("t1", ["a"])], "text", "tasks.json")


def test_task_file_forms(tmp_path):
    (tmp_path / "a.json").write_text('[["x", "y"], ["z"]]')
    (tmp_path / "b.yaml").write_text("first: [x, y]\nsecond: [z]\n")
    (tmp_path / "c.json").write_text('[["x"], []]')
    assert read_task_file(tmp_path / "a.json") == [("task-01", ["x", "y"]), ("task-02", ["z"])]
    assert read_task_file(tmp_path / "b.yaml") == [("first", ["x", "y"]), ("second", ["z"])]
    with pytest.raises(DataError, match="c.json: task 'task-02' is empty"):
        read_task_file(tmp_path / "c.json")
    # a flat list of names: one label (or one generative task) per task
    (tmp_path / "d.json").write_text('["acronyms", "jargon", ["x", "y"]]')
    assert read_task_file(tmp_path / "d.json") == [("task-01", ["acronyms"]), ("task-02", ["jargon"]),
                                                   ("task-03", ["x", "y"])]
    (tmp_path / "e.yaml").write_text("- [x, {y: 1}]\n")
    with pytest.raises(DataError, match="e.yaml: task 'task-01' must be a label or a list of labels"):
        read_task_file(tmp_path / "e.yaml")


def test_a_generative_stream_in_the_order_of_a_flat_task_name_list(tmp_path, capsys):
    """``[t1, t2]`` is documented for generative task files (data/load.py): it is read, in its order."""
    from conpet.config import DataConfig
    from conpet.data.load import load_stream

    rows = [{"prompt": f"{t} {i}?", "target": f"{t}{i}", "task": t} for t in ("acronyms", "jargon") for i in range(6)]
    data = tmp_path / "gen.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "tasks.json").write_text('["jargon", "acronyms"]')
    stream = load_stream(DataConfig(file=str(data), tasks=str(tmp_path / "tasks.json")))
    assert [t.name for t in stream.tasks] == ["jargon", "acronyms"] and stream.kind == "generate"


def test_automatic_split_is_seeded_and_balanced(tmp_path):
    labels = [f"l{i}" for i in range(10)]
    a, b = split_labels(labels, 3, seed=1), split_labels(labels, 3, seed=1)
    assert a == b and [len(g) for _, g in a] == [4, 3, 3]
    assert sorted(x for _, g in a for x in g) == sorted(labels)
    assert split_labels(labels, 3, seed=2) != a
    with pytest.raises(DataError, match="more tasks than labels"):
        split_labels(labels, 11, seed=0)


def test_rows_without_split_get_a_per_class_split(tmp_path):
    records = [{"text": f"{w} {i}", "label": w} for w in ("a", "b") for i in range(20)]
    stream = load_stream(DataConfig(file=str(_jsonl(tmp_path, records)), n_tasks=2))
    for task in stream.tasks:
        assert (len(task.train), len(task.dev), len(task.test)) == (14, 2, 4)


def test_max_train_per_class_caps_training_rows(typing_data):
    data, tasks = typing_data
    stream = load_stream(DataConfig(file=str(data), tasks=str(tasks), max_train_per_class=2))
    assert all(len(t.train) == 4 for t in stream.tasks)


def test_csv_with_an_unbalanced_quote_is_an_error_naming_its_line(tmp_path, capsys):
    from conpet.cli import main

    lines = ["text,label"] + [f"row {k} about a dog,animal" for k in range(20)]
    lines[5] = '"row 4 about a dog,animal'  # the quote never closes on its line
    lines[12] = 'row 11 about "a" cat",animal'
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.csv:6: .*unbalanced quote"):
        read_rows(path)
    out = tmp_path / "out"
    assert main(["run", "--data", str(path), "--n-tasks", "1", "--out", str(out), "--no-progress"]) == 2
    assert "bad.csv:6:" in capsys.readouterr().err and not out.exists()
    # quoted fields that stay on their line are fine
    path.write_text('text,label\n"a dog, a cat",animal\n"the ""big"" fox",animal\n')
    assert [r.text for r in read_rows(path)] == ["a dog, a cat", 'the "big" fox']


def test_a_label_with_training_rows_but_no_test_rows_is_named_in_a_warning():
    from conpet.errors import ConpetWarning

    rows = [Row(text=f"{w} here", label=label, split=split)
            for label, splits in [("a", ["train", "dev", "test"]), ("b", ["train", "train", "dev"]),
                                  ("c", ["train", "test"])]
            for w, split in zip("xyz", splits)]
    with pytest.warns(ConpetWarning, match="label 'b' of the tasks of task file has 2 training row"):
        build_stream("s", rows, [("t1", ["a", "b"]), ("t2", ["c"])], "text")


def test_the_cli_names_the_file_line_and_label_that_has_no_test_rows(tmp_path, capsys):
    """A label whose rows are all training rows (two rows: too few for the automatic split to
    give it a test row) is one warning line naming the data file, the row's line and the label."""
    from conpet.cli import main

    rows = [{"text": f"a {w} thing", "label": label} for label in ("cat", "dog") for w in "abcdefgh"]
    rows += [{"text": "a rare thing", "label": "rare"}, {"text": "another rare thing", "label": "rare"}]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "t.json").write_text('[["cat", "rare"], ["dog"]]')
    main(["run", "--data", str(data), "--tasks", str(tmp_path / "t.json"), "--model", "/nonexistent-model",
          "--out", str(tmp_path / "out"), "--no-progress"])
    warning = [line for line in capsys.readouterr().err.splitlines() if "no test rows" in line]
    assert len(warning) == 1 and warning[0].startswith(f"conpet: warning: {data}:17: label 'rare'"), warning


# -- Parquet files and folders saved by Hugging Face datasets ------------------------------------------
def _records():
    return [{"prompt": f"Plural of {w}?", "target": w + "s", "task": "plural"} for w in ("dog", "cat", "cow")] + \
           [{"prompt": f"Capitals: {w}", "target": w.upper(), "task": "upper"} for w in ("dog", "cat", "cow")]


def _save_arrow(folder, records):
    """The layout ``Dataset.save_to_disk`` writes: Arrow stream shards named in state.json."""
    import pyarrow as pa

    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                   "_split": None}))
    (folder / "dataset_info.json").write_text("{}")


def test_parquet_and_datasets_folders_give_the_same_rows_as_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conpet.data.formats import read_rows

    records = _records()
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "rows.parquet")
    _save_arrow(tmp_path / "saved", records)
    strip = lambda rows: [(r.text, r.target, r.label, r.split) for r in rows]  # noqa: E731
    expected = strip(read_rows(jsonl))
    assert strip(read_rows(tmp_path / "rows.parquet")) == expected
    assert strip(read_rows(tmp_path / "saved")) == expected
    # a DatasetDict: the split folders give rows their split
    dd = tmp_path / "dd"
    _save_arrow(dd / "train", records[:2] + records[3:5])
    _save_arrow(dd / "validation", records[2:3] + records[5:6])
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    rows = read_rows(dd)
    assert [r.split for r in rows] == ["train"] * 4 + ["dev"] * 2
    # a bad row names its file and row; a plain folder and an unknown split are errors
    bad = records[:1] + [{"prompt": "x", "task": "plural"}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet:2: .*has a prompt but no target"):
        read_rows(tmp_path / "bad.parquet")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one saved by Hugging Face datasets"):
        read_rows(tmp_path / "plain")
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "extra"]}))
    _save_arrow(dd / "extra", records[:1])
    with pytest.raises(DataError, match="split 'extra' is not train, validation/dev or test"):
        read_rows(dd)


def test_a_real_datasets_save_to_disk_folder_is_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    from conpet.data.formats import read_rows

    records = _records()
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"))
    assert [(r.text, r.target) for r in read_rows(tmp_path / "hf")] == [(r["prompt"], r["target"]) for r in records]
