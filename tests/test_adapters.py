"""The adapter lifecycle: the `merge` learner, `conpet merge` / `compress` / `export` /
`evaluate` on real run directories (tiny encoder)."""

from __future__ import annotations

import shutil

import pytest
import torch

from conpet.adapters import export_peft, lora_deltas, merge_lora, read_lora
from conpet.compress import COMPRESSED_FILE, decompress_lora_folder
from conpet.cli import main
from conpet.predict import predict
from conpet.data.stream import Row
from conpet.runs import write_manifest


def _run(tiny_encoder, typing_data, out, learner, *extra):
    args = ["run", "--model", str(tiny_encoder), "--data", str(typing_data[0]), "--tasks", str(typing_data[1]),
            "--learner", learner, "--epochs", "2", "--batch-size", "4", "--no-progress", "--out", str(out), *extra]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def dynamic_run(tmp_path_factory, tiny_encoder):
    from conftest import write_typing_data

    root = tmp_path_factory.mktemp("lifecycle")
    data = write_typing_data(root / "data")
    return _run(tiny_encoder, data, root / "dynamic", "dynamic"), data


ROWS = [Row(text=f"Yesterday we talked about the {w} for a while.", label="?", entity=w)
        for w in ["dog", "bread", "hammer", "city", "lion", "cake"]]


def test_merge_learner_ends_with_one_module(tmp_path, tiny_encoder, typing_data):
    import json

    run = _run(tiny_encoder, typing_data, tmp_path / "m", "merge[rank=4,method=task_arithmetic]")
    folder = run / "seed-0" / "adapters" / "task-02"
    config, factors = read_lora(folder)
    assert config["r"] == 4 and all(a.shape[0] == 4 for a, _ in factors.values())
    assert json.loads((folder / "head.json").read_text())["labels"] == ["animal", "food", "tool", "place"]
    assert json.loads((folder / "merge.json").read_text())["tasks_merged"] == 2
    assert len(predict(run, ROWS)) == len(ROWS)


def test_merge_learner_rejects_non_lora_and_bad_options(tmp_path, tiny_encoder, typing_data, capsys):
    args = ["run", "--model", str(tiny_encoder), "--data", str(typing_data[0]), "--tasks", str(typing_data[1]),
            "--no-progress", "--out", str(tmp_path / "x")]
    assert main(args + ["--learner", "merge[method=average]"]) == 2
    assert "unknown merge method 'average'" in capsys.readouterr().err
    assert main(args + ["--learner", "merge[merge_options={dense: 0.2}]"]) == 2
    assert "dense" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_merge_run_is_dw_merge_and_a_plain_peft_adapter(dynamic_run, tmp_path):
    run, _ = dynamic_run
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--method", "linear", "--rank", "8", "--out", str(out), "--no-eval"]) == 0
    experts = [read_lora(run / "seed-0" / "adapters" / t) for t in ("task-01", "task-02")]
    expected = merge_lora(experts, "linear", 8)
    merged_config, merged = read_lora(out / "seed-0" / "adapters" / "task-02")
    got = lora_deltas(merged_config, merged)
    want = {p: torch.stack([lora_deltas(c, f)[p] for c, f in experts]).mean(0) for p in got}
    for path in got:  # the mean of two rank-8 updates has rank <= 16: the file holds its best rank-8 part
        a, b = expected.factors[path]
        assert torch.allclose(got[path], b @ a, atol=1e-6)
        err = torch.linalg.matrix_norm(got[path] - want[path]) / torch.linalg.matrix_norm(want[path])
        assert float(err) == pytest.approx(expected.errors[path], abs=1e-4)
    assert len(predict(out, ROWS)) == len(ROWS)
    assert [f.name for f in export_peft(out, tmp_path / "export")] == ["task-02"]  # one module now


def test_merge_refuses_a_run_without_per_task_modules(tmp_path, tiny_encoder, typing_data, capsys):
    run = _run(tiny_encoder, typing_data, tmp_path / "seq", "sequential")
    assert main(["merge", str(run), "--out", str(tmp_path / "m")]) == 2
    assert "merging needs one module and one head per task" in capsys.readouterr().err


def test_compressed_run_predicts_exactly_as_its_decompressed_update(dynamic_run, tmp_path):
    run, _ = dynamic_run
    comp = tmp_path / "comp"
    assert main(["compress", str(run), "--density", "0.1", "--out", str(comp), "--no-eval"]) == 0
    assert list(comp.glob("seed-0/adapters/*/" + COMPRESSED_FILE))
    assert not list(comp.glob("seed-0/adapters/**/adapter_model.safetensors"))
    plain = tmp_path / "plain"
    shutil.copytree(comp, plain)
    for f in plain.glob("seed-0/adapters/**/" + COMPRESSED_FILE):
        decompress_lora_folder(f.parent, f.parent)
        f.unlink()
    write_manifest(plain)  # files changed by hand are served only once recorded again
    a, b = predict(comp, ROWS), predict(plain, ROWS)
    assert [x["label"] for x in a] == [x["label"] for x in b]
    assert [x["score"] for x in a] == [x["score"] for x in b]


def test_export_writes_plain_peft_folders_that_peft_loads(dynamic_run, tmp_path, tiny_encoder):
    from peft import PeftModel
    from transformers import AutoModel

    run, _ = dynamic_run
    folders = export_peft(run, tmp_path / "export")
    assert [f.name for f in folders] == ["task-01", "task-02", "selector"]  # learner.json: one module per task
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(tiny_encoder)), str(folders[0]))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_evaluate_matches_the_run_metrics(dynamic_run, capsys):
    import json

    run, _ = dynamic_run
    assert main(["evaluate", str(run)]) == 0
    metrics = json.loads((run / "seed-0" / "metrics.json").read_text())
    out = capsys.readouterr().out
    assert f"average accuracy {100 * metrics['average_accuracy']:.2f}%" in out


def test_a_run_records_its_learner_and_export_reads_it(dynamic_run):
    import json

    from conpet.learners import CAPABILITIES, LEARNERS

    run, _ = dynamic_run
    recorded = json.loads((run / "learner.json").read_text())
    assert recorded["name"] == "dynamic" and recorded["paper"] == LEARNERS["dynamic"].paper
    assert {k: recorded[k] for k in CAPABILITIES} == {k: getattr(LEARNERS["dynamic"], k) for k in CAPABILITIES}
