"""CoFiTune: only the FFN up/down of the (25%, 50%] layers train; their gradient rows are scaled by
exactly (1 - importance); the importance is the normalised self-KL gate gradient, non-zero thanks
to the dropout of the two passes, combined over tasks by max; runs end to end and resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conpet.cli import main
from conpet.config import from_dict
from conpet.errors import ConfigError
from conpet.learners.cofitune import normalise
from conpet.pet import LayerScope, get_pet
from conpet.pet.cofitune import CoFiTune, window_layers


@pytest.fixture(scope="module")
def llama4(tmp_path_factory) -> Path:
    """A tiny 4-layer Llama: the window is layer 1, the cache holds layer 0, layers 2-3 run above."""
    from conftest import MINILM_FILES, minilm_dir
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "llama4"
    config = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256, pad_token_id=0,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in MINILM_FILES:
        shutil.copy(minilm_dir() / name, folder / name)
    return folder


def _learner(model, data, tasks=None, **options):
    from conpet.build import build_learner, prepare

    files = {"file": str(data), **({"tasks": str(tasks)} if tasks else {})}
    cfg = from_dict({"model": str(model), "learner": "cofitune", "pet": {"method": "cofitune"}, "data": files,
                     "learner_options": options,
                     "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "precision": "fp32"}})
    prepared = prepare(cfg)
    return build_learner(cfg, prepared, seed=0), prepared


def _deltas(learner):
    return {path: site.parts[learner.module_name].delta for path, site in learner.model.sites.items()}


# -- the defining pieces, by hand -------------------------------------------------------------------------
def test_importance_normalisation_by_hand():
    impt = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    mean, std = 3.0, (((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3) ** 0.5  # unbiased, per layer
    expected = [abs(torch.tanh(torch.tensor((x - mean) / std)).item()) for x in (1.0, 2.0, 3.0, 6.0)]
    got = normalise(impt)
    assert torch.allclose(got[0], torch.tensor(expected), atol=1e-6)
    assert torch.equal(got[1], torch.zeros(4))  # no spread, no importance (the reference divides by 0)


def test_the_window_is_the_official_layer_range_and_auto_caches_below_it():
    assert window_layers("bottom2", 32) == list(range(8, 16))
    assert window_layers("bottom2", 40) == list(range(10, 20))
    assert window_layers("bottom2", 60) == list(range(15, 30))
    assert window_layers("top-plus", 32) == list(range(16, 32))
    assert CoFiTune.confine_top_layers("auto", 32, {}) == 24  # layers 0-7 cached, 8-31 run
    assert CoFiTune.confine_top_layers("auto", 32, {"window": "top"}) == 8
    assert CoFiTune.confine_top_layers(None, 32, {}) is None and CoFiTune.confine_top_layers(30, 32, {}) == 30
    get_pet("cofitune", scope=LayerScope(tuple(range(8, 32)), "layers", 32))
    with pytest.raises(ConfigError, match="train.top_layers >= 24"):
        get_pet("cofitune", scope=LayerScope(tuple(range(28, 32)), "layers", 32))
    with pytest.raises(ConfigError, match="window: one of"):
        get_pet("cofitune", {"window": "bottom3"})


def test_masked_gradient_rows_are_scaled_by_exactly_one_minus_importance(llama4, typing_data):
    data, tasks = typing_data
    learner, prepared = _learner(llama4, data, tasks)
    learner.learn(0)  # importance of task 1 (timing "after")
    assert learner.ctx.pet.layers == [1] and prepared.engine.split == 1  # auto: layer 0 cached
    learner.begin_task(1)
    rows = prepared.stream.tasks[1].train[:4]

    def grads() -> dict[str, torch.Tensor]:
        deltas = _deltas(learner)
        for d in deltas.values():
            d.grad = None
        learner.loss(rows).backward()
        return {path: d.grad.clone() for path, d in deltas.items()}

    learner.model.eval()  # the same forward twice
    plain = grads()
    handles = learner.mask_gradients()
    masked = grads()
    for h in handles:
        h.remove()
    imp = learner.importance
    scale = {"layers.1.mlp.up_proj": 1 - imp["up"][0], "layers.1.mlp.down_proj": 1 - imp["down"][0]}
    assert plain.keys() == scale.keys()
    for path, s in scale.items():
        assert 0 < s.min() < s.max() < 1 and s.shape[0] == plain[path].shape[0]  # one scale per row
        assert torch.allclose(masked[path], plain[path] * s[:, None], rtol=1e-6, atol=1e-12), path
        assert not torch.allclose(masked[path], plain[path])
    learner.close()


def test_only_the_windows_up_and_down_change_and_importance_is_maxed_over_tasks(llama4, typing_data):
    data, tasks = typing_data
    learner, prepared = _learner(llama4, data, tasks)
    backbone = {n: p.detach().clone() for n, p in prepared.engine.backbone.model.named_parameters()}
    raws, sweep = [], learner.importance_sweep

    def record(t):
        raws.append(sweep(t))
        return raws[-1]

    learner.importance_sweep = record
    learner.learn(0)
    first = {k: v.clone() for k, v in learner.importance.items()}
    learner.learn(1)
    assert learner.importance_tasks == [0, 1] and len(raws) == 2
    for kind, size in (("heads", 4), ("up", 64), ("down", 32)):
        assert raws[0][kind].shape == raws[1][kind].shape == (1, size)
        assert (raws[0][kind] != 0).all() and (raws[1][kind] != 0).all()  # dropout: a real signal
        assert torch.equal(first[kind], normalise(raws[0][kind]))
        assert torch.equal(learner.importance[kind], torch.maximum(normalise(raws[0][kind]), normalise(raws[1][kind])))
        assert not torch.equal(learner.importance[kind], first[kind])
    # the trained update: full up/down matrices of layer 1, nothing else; the backbone is untouched
    delta = learner.ctx.pet.delta_weights(learner.model, learner.module_name)
    assert sorted(delta) == ["layers.1.mlp.down_proj.weight", "layers.1.mlp.up_proj.weight"]
    assert all((d != 0).float().mean() > 0.99 for d in delta.values())
    assert learner.tunable_params()["pet_params"] == 2 * 32 * 64
    learner.close()
    assert all(torch.equal(p, backbone[n]) for n, p in prepared.engine.backbone.model.named_parameters())


def test_without_dropout_the_two_passes_agree_and_the_importance_is_zero(llama4, typing_data):
    data, tasks = typing_data
    learner, _ = _learner(llama4, data, tasks, importance_rows=8)
    learner.begin_task(0)
    with_dropout = learner.importance_sweep(0)
    learner.opts["importance_dropout"] = 0.0  # the reference on a dropout-free Llama
    without = learner.importance_sweep(0)
    for kind in with_dropout:
        assert without[kind].abs().max() < 1e-3 * with_dropout[kind].abs().max()  # rounding noise only
    learner.opts["importance_dropout"] = 0.003
    assert all(torch.equal(with_dropout[k], v) for k, v in learner.importance_sweep(0).items())  # seeded
    learner.close()


def test_before_timing_masks_the_first_task_with_the_untrained_models_importance(llama4, typing_data):
    data, tasks = typing_data
    learner, _ = _learner(llama4, data, tasks, importance_timing="before", importance_rows=8)
    seen, sweep = [], learner.importance_sweep

    def record(t):
        seen.append(all(torch.equal(d, torch.zeros_like(d)) for d in _deltas(learner).values()))
        return sweep(t)

    learner.importance_sweep = record
    learner.learn(0)
    assert seen == [True] and learner.importance_tasks == [0]  # computed before the first step
    learner.close()


# -- end to end ------------------------------------------------------------------------------------------
def test_classification_and_generative_runs_end_to_end(tiny_encoder, tiny_decoder, typing_data, tmp_path, capsys):
    from test_generation import write_generative_data

    from conpet.runner import run

    data, tasks = typing_data
    out = tmp_path / "cls"
    assert main(["run", "--model", str(tiny_encoder), "--data", str(data), "--tasks", str(tasks), "--learner",
                 "cofitune", "--pet", "cofitune", "--epochs", "2", "--batch-size", "4", "--no-progress",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "seed-0" / "metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]) == 2
    assert (out / "seed-0" / "adapters" / "task-02" / "method.safetensors").is_file()
    assert main(["predict", str(out), "We talked about the wolf.", "--entity", "wolf", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["verify", str(out)]) == 0

    gen = write_generative_data(tmp_path / "gen")
    cfg = from_dict({"model": str(tiny_decoder), "learner": "cofitune", "pet": {"method": "cofitune"},
                     "out": str(tmp_path / "gen-run"), "data": {"file": str(gen)},
                     "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"}})
    seed = run(cfg, progress=False)
    assert seed["task_metric"] == ["exact_match", "exact_match"] and len(seed["accuracy_matrix"][1]) == 2
    assert len(seed["reference_perplexity"]) == 2
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    ([], "it needs pet.method: cofitune"),
    (["--pet", "cofitune", "--learner", "cofitune[importance_dropout=0]"], "importance_dropout: must be in (0, 1)"),
    (["--pet", "cofitune", "--learner", "cofitune[apply_softmask=attention]"], "apply_softmask: must be one of"),
    (["--pet", "cofitune", "--learner", "cofitune[importance_timing=during]"], "importance_timing: must be one of"),
    (["--pet", "cofitune", "--set", "pet.options.window=bottom3"], "window: one of"),
    (["--pet", "cofitune", "--set", "pet.options.window=middle"], "holds no layer of a 2-layer model"),
    (["--pet", "cofitune", "--set", "train.top_layers=1"], "it needs train.top_layers >= 2"),
])
def test_bad_settings_are_clear_errors(tiny_encoder, typing_data, tmp_path, capsys, args, message):
    data, tasks = typing_data
    argv = ["run", "--model", str(tiny_encoder), "--data", str(data), "--tasks", str(tasks), "--learner", "cofitune",
            "--out", str(tmp_path / "x"), "--no-progress", *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
