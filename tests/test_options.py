"""Options are checked once, before anything is written or loaded, and converted to their types
there: learner options (one helper, shared replay options declared once) and PET options (each
method checks its own when it is built)."""

from __future__ import annotations

import pytest

from conpet.build import check
from conpet.cli import main
from conpet.config import from_dict, parse_learner_spec, split_learner_specs
from conpet.errors import ConfigError
from conpet.pet import get_pet


def _cfg(**values):
    return from_dict({"model": "minilm", **values})


@pytest.mark.parametrize("learner,options,match", [
    ("dynamic", {"top_k": 1.7}, "top_k: must be an integer"),
    ("dynamic", {"top_k": 0}, "top_k: must be >= 1"),
    ("dynamic", {"replay_source": "disk"}, "replay_source: must be one of history, memory"),
    ("dynamic", {"topk": 2}, "did you mean 'top_k'"),
    ("emr*", {"memory_per_class": "many"}, "memory_per_class: must be an integer"),
    ("emr*", {"new_ratio": 0}, "new_ratio: must be > 0"),
    ("ewc", {"ewc_lambda": "strong"}, "ewc_lambda: must be float"),
    ("sequential", {"top_k": 2}, "takes no options"),
    ("merge", {"rank": 0}, "rank: must be >= 1"),
])
def test_bad_learner_options_are_errors_naming_the_option(learner, options, match):
    with pytest.raises(ConfigError, match=match):
        check(_cfg(learner=learner, learner_options=options))


def test_learner_options_are_converted_once():
    from conpet.learners import get_learner

    opts = get_learner("dynamic").check_options(_cfg(learner="dynamic", learner_options={"top_k": 2}))
    assert opts["top_k"] == 2 and opts["replay_source"] == "history" and opts["new_ratio"] == 1.0
    assert isinstance(get_learner("emr*").check_options(_cfg(learner="emr*", learner_options={"new_ratio": 2}))
                      ["new_ratio"], float)


@pytest.mark.parametrize("method,options,match", [
    ("lora", {"rank": 4}, "unknown option 'rank' for 'lora'"),
    ("lora", {"lora_alph": 4}, "did you mean 'lora_alpha'"),
    ("adapter", {"bottleneck": 0}, "bottleneck: must be an integer >= 1"),
    ("mola", {"experts": [2, 0]}, "experts"),
    ("mos", {"private_r": 9}, "private_r"),
    ("prompt_tuning", {"lr": -1}, "lr: must be a positive number"),
    ("sparse_ft", {"density": 2.0}, "density must be in"),
])
def test_pet_options_are_checked_when_the_method_is_built(method, options, match):
    with pytest.raises(ConfigError, match=match):
        get_pet(method, options)


def test_a_misspelt_pet_option_fails_before_anything_is_written_or_loaded(tmp_path, capsys, monkeypatch):
    import conpet.build

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the options were checked")

    monkeypatch.setattr(conpet.build, "load_backbone", no_backbone)
    out = tmp_path / "run"
    assert main(["run", "--set", "pet.options.lora_alph=8", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("conpet: error: pet.options: unknown option 'lora_alph'") and "lora_alpha" in err
    assert not out.exists()


def test_learner_spec_grammar():
    assert split_learner_specs("sequential,dynamic[top_k=2,new_ratio=0.5],emr*") == \
        ["sequential", "dynamic[top_k=2,new_ratio=0.5]", "emr*"]
    assert parse_learner_spec("dynamic[top_k=2,new_ratio=1e-1]") == ("dynamic", {"top_k": 2, "new_ratio": 0.1})
    with pytest.raises(ConfigError, match="options go in brackets"):
        parse_learner_spec("dynamic[top_k=2")


def test_dynamic_replays_from_its_memory(tiny_encoder, typing_data, tmp_path):
    from conpet.build import build_learner, prepare

    data, tasks = typing_data
    cfg = from_dict({"model": str(tiny_encoder), "learner": "dynamic", "out": str(tmp_path / "run"),
                     "learner_options": {"replay_source": "memory", "memory_per_class": 2},
                     "data": {"file": str(data), "tasks": str(tasks)},
                     "train": {"epochs": 1, "batch_size": 4, "precision": "fp32"}})
    learner = build_learner(cfg, prepare(cfg), seed=0)
    learner.learn(0)
    assert len(learner.memory) == 4  # 2 classes x 2 exemplars
    replayed = {i for batch in learner.replay_batches(1) for i in batch[2:]}  # the old half of each batch
    assert replayed <= set(learner.memory.rows(["animal", "food"]))
    learner.learn(1)
    learner.close()


def test_a_utf8_file_with_a_byte_order_mark_is_read(tmp_path, typing_data):
    from conpet.data.formats import read_rows, read_task_file

    data, tasks = typing_data
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
    assert [r.text for r in read_rows(bom)] == [r.text for r in read_rows(data)]
    bom_csv = tmp_path / "bom.csv"
    bom_csv.write_bytes(b"\xef\xbb\xbftext,label\nA dog barked.,animal\n")
    assert read_rows(bom_csv)[0].label == "animal"
    bom_tasks = tmp_path / "tasks.json"
    bom_tasks.write_bytes(b"\xef\xbb\xbf" + tasks.read_bytes())
    assert read_task_file(bom_tasks) == read_task_file(tasks)


def test_predict_checks_the_engine_like_every_other_entry_point(tiny_decoder, typing_data, tmp_path, monkeypatch):
    from conpet.data.stream import Row
    from conpet.engine import FeatureEngine
    from conpet.predict import predict

    data, tasks = typing_data
    out = tmp_path / "run"
    assert main(["run", "--model", str(tiny_decoder), "--data", str(data), "--tasks", str(tasks), "--epochs", "1",
                 "--set", "train.top_layers=1", "--no-progress", "--out", str(out)]) == 0
    calls = []
    original = FeatureEngine.check
    monkeypatch.setattr(FeatureEngine, "check", lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    predict(out, [Row(text="We saw the wolf.", label="?", entity="wolf")])
    assert calls == [1]


def test_an_unknown_method_name_gets_the_closest_known_one():
    from conpet.learners import get_learner
    from conpet.pet import get_pet_class

    with pytest.raises(ConfigError, match=r"unknown PET method 'prompt-tuning' \(did you mean 'prompt_tuning'\?\)"):
        get_pet_class("prompt-tuning")
    with pytest.raises(ConfigError, match=r"unknown learner 'model_surgery' \(did you mean 'model-surgery'\?\)"):
        get_learner("model_surgery")
    with pytest.raises(ConfigError, match=r"unknown learner 'qqq' \(available: cofitune, crl,"):
        get_learner("qqq")


def test_a_run_checks_the_learners_options_once(tiny_encoder, typing_data, tmp_path, monkeypatch):
    """``conpet.build.check`` checks them before anything loads; preparation and every seed's
    learner reuse what it returned."""
    from conpet.config import from_dict
    from conpet.learners import get_learner
    from conpet.runner import run

    data, tasks = typing_data
    cls = get_learner("emr*")
    original, calls = cls.check_options.__func__, []
    monkeypatch.setattr(cls, "check_options", classmethod(lambda c, cfg: (calls.append(1), original(c, cfg))[1]))
    run(from_dict({"model": str(tiny_encoder), "learner": "emr*", "seeds": 2, "out": str(tmp_path / "run"),
                   "data": {"file": str(data), "tasks": str(tasks)}, "train": {"epochs": 1, "precision": "fp32"}}),
        progress=False)
    assert len(calls) == 1
