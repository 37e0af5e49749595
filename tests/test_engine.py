"""The feature engine: the split forward pass (cached lower layers + PET in the top layers)
computes exactly what the plain forward pass computes, and only trains the top layers."""

import pytest
import torch

from conpet.backbone import cloze_features, load_backbone
from conpet.config import DataConfig, from_dict, load_config
from conpet.data import load_stream
from conpet.engine import FeatureEngine, auto_top_layers
from conpet.errors import ConfigError
from conpet.inputs import collate, encode_rows
from conpet.pet import get_pet
from conpet.build import prepare
from conpet.runner import evaluate_run, run
from conpet.runs import load_run_config


@pytest.fixture
def setup(request, typing_data):
    def make(model_dir, top_layers, cache_dtype=torch.float32):
        data, tasks = typing_data
        stream = load_stream(DataConfig(file=str(data), tasks=str(tasks)))
        bb = load_backbone(str(model_dir))
        enc = encode_rows(stream.rows, stream.kind, bb.tokenizer, bb.is_decoder, 64)
        engine = FeatureEngine(bb, enc, top_layers, "fp32", cache_dtype=cache_dtype)
        return stream, bb, enc, engine
    return make


@pytest.mark.parametrize("model_fixture", ["tiny_encoder", "tiny_decoder"])
def test_split_forward_equals_full_forward_with_pet(request, setup, model_fixture):
    stream, bb, enc, engine = setup(request.getfixturevalue(model_fixture), top_layers=1)
    pet = get_pet("lora", {"init_lora_weights": False}, scope=engine.scope)
    model = pet.attach(bb.model, "default").eval()
    rows = [0, 3, 17, 30, 41]
    with torch.no_grad():
        full = cloze_features(model, collate(enc, rows, bb.pad_id))
        split = engine.features(model, rows)
        again = engine.features(model, rows)
    assert torch.allclose(full, split, atol=1e-5)
    assert torch.equal(split, again) and engine.hits == 5 and engine.misses == 5
    lora_layers = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert lora_layers and all(".1." in n for n in lora_layers)  # only the top layer (index 1 of 2)


def test_gradients_reach_the_top_layer_pet_only(setup, tiny_decoder):
    stream, bb, enc, engine = setup(tiny_decoder, top_layers=1)
    pet = get_pet("lora", scope=engine.scope)
    model = pet.attach(bb.model, "default")
    params = pet.parameters(model, "default")
    engine.features(model, [0, 1, 2]).sum().backward()
    assert all(p.grad is not None for p in params)


def test_cache_is_memory_bounded(setup, tiny_encoder):
    stream, bb, enc, engine = setup(tiny_encoder, top_layers=1)
    one_row = len(enc.ids[0]) * 32 * 4
    engine.max_cache_bytes = 3 * one_row
    engine.features(bb.model, list(range(10)))
    assert len(engine.cache) <= 10 and engine.cache_bytes <= max(3 * one_row, engine.cache_bytes)
    engine.features(bb.model, [20, 21])
    assert len(engine.cache) <= 4 and 20 in engine.cache and 21 in engine.cache


def test_bad_top_layers_is_a_clear_error(setup, tiny_encoder):
    with pytest.raises(ConfigError, match="between 1 and 2"):
        setup(tiny_encoder, top_layers=5)


def test_runner_with_top_layers_matches_layer_confined_lora_without_cache(tiny_decoder, typing_data, tmp_path):
    """Caching changes speed, not results: in fp32 the cache holds fp32 states, so the run with the
    cache and the run without it (same LoRA placement: every linear layer of the top layer, the
    default of a confined LoRA) give the same accuracy matrix."""
    data, tasks = typing_data
    base = {"model": str(tiny_decoder), "data": {"file": str(data), "tasks": str(tasks)},
            "train": {"epochs": 2, "batch_size": 8, "precision": "fp32", "top_layers": 1}}
    cached = run(from_dict({**base, "out": str(tmp_path / "a")}), progress=False)
    plain = from_dict({**base, "out": str(tmp_path / "b"),
                       "train": {**base["train"], "top_layers": None},
                       "pet": {"options": {"layers_to_transform": [1], "layers_pattern": "layers",
                                           "target_modules": "all-linear"}}})
    uncached = run(plain, progress=False)
    assert cached["tunable_params"] == uncached["tunable_params"]
    assert cached["accuracy_matrix"] == uncached["accuracy_matrix"]


def test_rows_first_cached_in_train_mode_carry_no_dropout(tiny_encoder, typing_data):
    """A row cached while the model trains holds the eval-mode (dropout-free) lower layers, and
    the model's modes are left as they were."""
    import torch

    from conpet.build import prepare
    from conpet.config import from_dict

    data, tasks = typing_data
    cfg = from_dict({"model": str(tiny_encoder), "data": {"file": str(data), "tasks": str(tasks)},
                     "train": {"precision": "fp32", "top_layers": 1}})
    engine = prepare(cfg).engine
    rows = list(range(4))
    model = engine.backbone.model
    model.train()
    engine._ensure(rows)
    trained = [engine.cache[i].clone() for i in rows]
    assert model.training and all(m.training for m in model.modules())
    engine.cache.clear()
    model.eval()
    engine._ensure(rows)
    assert all(torch.equal(a, engine.cache[i]) for a, i in zip(trained, rows))


@pytest.fixture(scope="module")
def deep_decoder(tmp_path_factory):
    """A 20-layer tiny decoder: ``auto`` confines PET to its top 8 layers, the rule before 2026-12-05 to 4."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import MINILM_FILES, minilm_dir

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "deep-llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=20,
                                 num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                                 max_position_embeddings=256, pad_token_id=0, tie_word_embeddings=True)
                     ).save_pretrained(folder)
    for name in MINILM_FILES:
        shutil.copy(minilm_dir() / name, folder / name)
    return folder


def test_a_run_saves_the_number_auto_chose_and_a_saved_auto_is_a_clear_error(deep_decoder, typing_data, tmp_path,
                                                                             capsys):
    """``auto`` is a rule that may change between versions, so a run saves the number it resolved
    to and resumes, evaluates and predicts on those layers; a run directory that saved the word
    ``auto`` (a development snapshot) stops with the file, the line and what to write, and runs
    on the layers written there."""
    from conpet.cli import main

    data, tasks = typing_data
    base = {"model": str(deep_decoder), "data": {"file": str(data), "tasks": str(tasks)},
            "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"}}
    run(from_dict({**base, "out": str(tmp_path / "new")}), progress=False)
    assert "PET in the top 8 of 20 layers, the 12 below computed once per row" in capsys.readouterr().err
    assert auto_top_layers(20) == 8 and auto_top_layers(8) is None
    assert load_config(str(tmp_path / "new" / "config.yaml")).train.top_layers == 8

    old = tmp_path / "old"
    explicit = {**base, "out": str(old), "train": {**base["train"], "top_layers": 4}}
    finished = run(from_dict(explicit), progress=False)
    text = (old / "config.yaml").read_text()
    assert "top_layers: 4\n" in text
    (old / "config.yaml").write_text(text.replace("top_layers: 4\n", "top_layers: auto\n"))  # as once saved
    line = text.splitlines().index(next(x for x in text.splitlines() if x.strip().startswith("top_layers:"))) + 1
    with pytest.raises(ConfigError, match=rf"config.yaml:{line}: train.top_layers: auto was saved by a development"):
        load_run_config(old / "config.yaml")
    before = sorted(p.name for p in old.rglob("*"))
    assert main(["evaluate", str(old)]) == 2
    assert f"config.yaml:{line}: train.top_layers: auto" in capsys.readouterr().err
    assert sorted(p.name for p in old.rglob("*")) == before  # nothing written
    (old / "config.yaml").write_text(text)  # the fix the error names
    assert prepare(load_run_config(old / "config.yaml")).engine.top_layers == 4
    assert list(evaluate_run(old)["per_task"].values()) == finished["accuracy_matrix"][-1]


# -- backbone.pooling ------------------------------------------------------------------------------
def test_pool_reads_the_cloze_slot_the_mean_of_real_tokens_or_the_last_token():
    from conpet.backbone import pool

    states = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    lengths, cloze = torch.tensor([2, 4]), torch.tensor([1, 0])
    assert torch.equal(pool(states, lengths, cloze, "cloze"), torch.stack([states[0, 1], states[1, 0]]))
    assert torch.equal(pool(states, lengths, cloze, "last"), torch.stack([states[0, 1], states[1, 3]]))
    assert torch.allclose(pool(states, lengths, cloze, "mean"),
                          torch.stack([states[0, :2].mean(0), states[1].mean(0)]))  # padding left out
    halves = pool(states.bfloat16(), lengths, cloze, "mean")
    assert halves.dtype == torch.bfloat16


def test_pooling_settings_resolve_once(tiny_encoder, tiny_decoder):
    from conpet.backbone import resolve_pooling

    assert resolve_pooling("auto", load_backbone(str(tiny_encoder))) == "cloze"
    assert resolve_pooling("auto", load_backbone(str(tiny_decoder))) == "cloze"
    assert resolve_pooling("last", load_backbone(str(tiny_decoder))) == "last"
    with pytest.raises(ConfigError, match="backbone.pooling: must be one of auto, cloze, mean, last"):
        resolve_pooling("max", load_backbone(str(tiny_decoder)))


def test_auto_pooling_reads_a_sentence_transformers_model_by_its_trained_pooling(tiny_encoder, tmp_path):
    import json
    import shutil

    from conpet.backbone import resolve_pooling, trained_pooling

    for mode, expected in [("mean_tokens", "mean"), ("cls_token", "cloze")]:
        folder = tmp_path / mode
        shutil.copytree(tiny_encoder, folder)
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (folder / "1_Pooling").mkdir()
        flags = {f"pooling_mode_{m}": m == mode for m in ("mean_tokens", "cls_token", "max_tokens")}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
        assert trained_pooling(folder) == mode.rsplit("_", 1)[0]
        assert resolve_pooling("auto", load_backbone(str(folder))) == expected
        assert resolve_pooling("cloze", load_backbone(str(folder))) == "cloze"
    (tmp_path / "mean_tokens" / "1_Pooling" / "config.json").write_text("{not json")
    assert trained_pooling(tmp_path / "mean_tokens") is None  # unreadable: the cloze slot, no crash


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooled_features_of_the_split_pass_equal_the_full_pass(setup, tiny_encoder, pooling):
    stream, bb, enc, split_engine = setup(tiny_encoder, top_layers=1)
    full_engine = FeatureEngine(bb, enc, None, "fp32", pooling=pooling)
    split_engine.pooling = pooling
    pet = get_pet("lora", {"init_lora_weights": False}, scope=split_engine.scope)
    model = pet.attach(bb.model, "default").eval()
    rows = [0, 3, 17, 30, 41]
    with torch.no_grad():
        full, split = full_engine.features(model, rows), split_engine.features(model, rows)
        cloze = cloze_features(model, collate(enc, rows, bb.pad_id))
    assert torch.allclose(full, split, atol=1e-5)
    assert not torch.allclose(full, cloze, atol=1e-3)  # it reads something other than the slot


def test_pooling_other_than_the_prompts_last_token_is_refused_on_a_generative_stream(tmp_path, capsys):
    from conpet.cli import main
    from test_generation import write_generative_data

    gen_data, out = write_generative_data(tmp_path / "data"), tmp_path / "out"
    assert main(["run", "--data", str(gen_data), "--pooling", "mean", "--out", str(out), "--no-progress"]) == 2
    assert "backbone.pooling: 'mean' pools classification rows" in capsys.readouterr().err and not out.exists()
