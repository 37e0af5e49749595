"""The feature engine: the split forward pass (cached lower layers + PET in the top layers)
computes exactly what the plain forward pass computes, and only trains the top layers."""

import pytest
import torch

from conpet.backbone import cloze_features, load_backbone
from conpet.config import DataConfig, from_dict
from conpet.data import load_stream
from conpet.engine import FeatureEngine
from conpet.errors import ConfigError
from conpet.inputs import collate, encode_rows
from conpet.pet import get_pet
from conpet.runner import run


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
