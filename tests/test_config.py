import pytest

from conpet.config import RunConfig, from_dict, load_config, parse_override
from conpet.errors import ConfigError


def test_defaults_are_the_documented_main_job():
    cfg = RunConfig()
    assert (cfg.model, cfg.learner, cfg.data.benchmark, cfg.pet.method) == ("minilm", "sequential", "wordnet-typing", "lora")


def test_unknown_key_names_it_and_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch' \(did you mean 'train.epochs'\?\)"):
        from_dict({"train": {"epoch": 3}})


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=r"'train.batch_size' must be int, got 'big'"):
        from_dict({"train": {"batch_size": "big"}})


def test_range_checks():
    with pytest.raises(ConfigError, match="'seeds' must be >= 1"):
        from_dict({"seeds": 0})
    with pytest.raises(ConfigError, match="data.setting"):
        from_dict({"data": {"setting": "domain"}})


def test_yaml_then_flags_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learner: joint\ntrain:\n  epochs: 5\n  lr: 0.01\npet:\n  options: {r: 4}\n")
    cfg = load_config(str(path), {"train.epochs": 2, "model": None}, ["pet.options.lora_alpha=8", "seeds=3"])
    assert cfg.learner == "joint" and cfg.train.epochs == 2 and cfg.train.lr == 0.01
    assert cfg.pet.options == {"r": 4, "lora_alpha": 8} and cfg.seeds == 3 and cfg.model == "minilm"


def test_bad_yaml_reports_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learner: joint\ntrain: [epochs: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(str(path))


def test_parse_override_reads_yaml_values():
    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)
    assert parse_override("pet.options.target_modules=[q_proj, v_proj]")[1] == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError):
        parse_override("train.lr")


def test_config_round_trips_through_yaml(tmp_path):
    cfg = from_dict({"learner": "joint", "train": {"epochs": 2}})
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path)).to_dict() == cfg.to_dict()


def test_yaml_exponent_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n")
    assert load_config(str(path)).train.lr == 1e-4
