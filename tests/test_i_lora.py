"""I-LoRA: the slow module is the EMA of the fast one with the official alpha schedule, the
consistency loss penalises fast hidden states only where they are below the slow ones, the loss of
a replay step is the official formula over HF's ``hidden_states``, the reservoir keeps every row
with the same chance, and a run killed inside a task resumes to the same result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conpet.build import build_learner, check, prepare
from conpet.cli import main
from conpet.config import from_dict
from conpet.errors import ConfigError
from conpet.learners.i_lora import SLOW, consistency


def _cfg(model, data, tasks=None, out=None, epochs=3, top_layers=None, **options):
    data_cfg = {"file": str(data), **({"tasks": str(tasks)} if tasks else {})}
    return from_dict({"model": str(model), "learner": "i-lora", "data": data_cfg, "learner_options": options,
                      **({"out": str(out)} if out else {}),
                      "train": {"epochs": epochs, "batch_size": 4, "lr": 0.01, "precision": "fp32",
                                "top_layers": top_layers}})


def _learner(model, data, tasks, **kwargs):
    cfg = _cfg(model, data, tasks, **kwargs)
    prepared = prepare(cfg)
    return build_learner(cfg, prepared, seed=0), prepared


def _learn(learner, prepared, *tasks):
    """Learn ``tasks`` as the runner does: the frozen lower layers cached (eval mode) first."""
    stream, engine = prepared
    for t in tasks:
        engine.warm(stream.tasks[t].train)
        learner.learn(t)


def _module(learner, name):
    return {n.replace(name, "M"): p.detach().clone() for n, p in learner.model.named_parameters()
            if f".{name}." in n or n.endswith(f".{name}")}


def test_slow_module_is_the_ema_of_the_fast_one_with_the_alpha_schedule(tiny_encoder, typing_data):
    data, tasks = typing_data
    learner, prepared = _learner(tiny_encoder, data, tasks, epochs=2, ema_alpha=0.9)
    fast = learner.module_name
    snapshots, start, ema = [], {}, learner.after_step

    def record(fit, step):  # the fast module after each optimizer step, then the real EMA update
        if not start:
            start.update(_module(learner, SLOW))  # the slow module as created (a fresh module)
        snapshots.append(_module(learner, fast))
        ema(fit, step)

    learner.after_step = record
    _learn(learner, prepared, 0, 1)
    expected = {k: v.clone() for k, v in start.items()}
    alphas = []
    for n, snap in enumerate(snapshots, start=1):  # step counted over both tasks
        alpha = min(1 - 1 / (n + 1), 0.9)
        alphas.append(alpha)
        for k in expected:
            expected[k] = alpha * expected[k] + (1 - alpha) * snap[k]
    slow = _module(learner, SLOW)
    assert slow.keys() == expected.keys() and len(snapshots) == learner.global_step == 12
    for k in expected:
        assert torch.allclose(slow[k], expected[k], atol=1e-6), k
    assert alphas[:3] == pytest.approx([1 / 2, 2 / 3, 3 / 4]) and alphas[-1] == 0.9  # the schedule, then the cap
    # the official defect (the EMA rewrote the fast weights, the slow module stayed at its init) is not there
    assert any(not torch.equal(slow[k], start[k]) for k in slow)
    assert all(torch.equal(snapshots[-1][k], v) for k, v in _module(learner, fast).items())
    learner.close()


def test_consistency_penalises_only_fast_states_below_the_slow_ones():
    fast = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]], requires_grad=True)  # 1 row, 2 tokens, hidden 2
    slow = torch.tensor([[[0.5, 3.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, False]])  # the second token is padding
    # token 1: (1 - max(1, 0.5))^2 = 0 and (2 - max(2, 3))^2 = 1; 3 hidden states, 1 token, hidden 2
    loss = consistency([fast], [slow], mask, n_states=3)
    assert loss.item() == pytest.approx(1 / 6)
    loss.backward()
    assert torch.allclose(fast.grad, torch.tensor([[[0.0, 2 * (2.0 - 3.0) / 6], [0.0, 0.0]]]))
    above = consistency([slow + 1.0], [slow], torch.ones(1, 2, dtype=torch.bool), n_states=1)
    assert above.item() == 0.0  # fast >= slow everywhere: no penalty
    assert consistency([slow - 0.5], [slow], torch.ones(1, 2, dtype=torch.bool), 1).item() == pytest.approx(0.25)


@pytest.mark.parametrize("top_layers", [None, 1])
def test_replay_step_loss_is_the_official_formula_over_hf_hidden_states(tiny_encoder, typing_data, top_layers):
    data, tasks = typing_data
    learner, prepared = _learner(tiny_encoder, data, tasks, epochs=1, top_layers=top_layers, reg_weight=10.0)
    _learn(learner, prepared, 0, 1)
    stream, model, pet = prepared.stream, learner.model, learner.ctx.pet
    batch, buffer = stream.tasks[1].train[:4], stream.tasks[0].train[:3]
    learner.batches, learner.replay, learner.fit_start = [batch], [buffer], learner.global_step
    model.eval()
    got = learner.loss(batch)

    def hf(rows, module):  # a plain full forward with HF's hidden_states
        pet.activate(model, module)
        b = learner.ctx.batch(rows)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        logits = learner.head(out.last_hidden_state[torch.arange(len(rows)), b["cloze_pos"]])
        return out.hidden_states, F.cross_entropy(logits, learner.ctx.targets(rows)), b["attention_mask"]

    with torch.no_grad():
        _, ce_batch, _ = hf(batch, learner.module_name)
        h_fast, ce_buffer, mask = hf(buffer, learner.module_name)
        h_slow, _, _ = hf(buffer, SLOW)
        pet.activate(model, learner.module_name)
    assert len(h_fast) == 3  # embeddings + 2 layers
    keep = mask[..., None].float()
    terms = sum(((f - torch.maximum(f, s)) ** 2 * keep).sum() for f, s in zip(h_fast, h_slow))
    cons = terms / (len(h_fast) * keep.sum() * h_fast[0].shape[-1])
    assert cons > 0  # after two tasks the fast and slow modules differ
    expected = 0.5 * (ce_batch + ce_buffer) + 10.0 * cons
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (got, expected)
    learner.close()


def test_reservoir_keeps_every_row_alike_and_replays_every_task_seen(tiny_encoder, typing_data):
    data, tasks = typing_data
    learner, prepared = _learner(tiny_encoder, data, tasks, buffer_size=8)
    assert learner.plan([[0, 1, 2], [3, 4, 5, 6, 7]], replay=False) == [[], []]
    assert learner.buffer == [0, 1, 2, 3, 4, 5, 6, 7] and learner.seen == 8  # the first rows fill it
    replay = learner.plan([[8, 9, 10]], replay=True)[0]
    assert len(learner.buffer) == 8 and learner.seen == 11 and len(replay) == 3 and set(replay) <= set(learner.buffer)
    # reservoir sampling: each of 400 offered rows is kept with probability 8/400, early or late
    kept = np.zeros(400)
    for _ in range(300):
        learner.buffer, learner.seen = [], 0
        learner.plan([list(range(k, k + 4)) for k in range(0, 400, 4)], replay=False)
        kept[learner.buffer] += 1
    assert kept.sum() == 300 * 8
    assert abs(kept[:200].sum() / kept.sum() - 0.5) < 0.05 and abs(kept[:100].sum() / kept.sum() - 0.25) < 0.05

    learner.buffer, learner.seen = [], 0
    _learn(learner, prepared, 0)
    first, second = set(prepared.stream.tasks[0].train), set(prepared.stream.tasks[1].train)
    assert learner.replay == [[]] * len(learner.batches)  # no replay on the first task (official)
    assert len(learner.buffer) == 8 and set(learner.buffer) <= first and learner.seen == 3 * len(first)
    _learn(learner, prepared, 1)
    assert len(learner.buffer) == 8 and learner.seen == 3 * (len(first) + len(second))
    assert set(learner.buffer) & first and set(learner.buffer) & second
    drawn = [row for rows in learner.replay for row in rows]
    assert all(len(r) == len(b) for r, b in zip(learner.replay, learner.batches))  # a batch of the same size
    assert set(drawn) & first and set(drawn) & second  # replay draws from every task seen
    learner.close()


def test_runs_end_to_end_saves_both_modules_and_predicts_with_the_slow_one(tiny_encoder, typing_data, tmp_path,
                                                                          capsys):
    from conpet.runner import run

    data, tasks = typing_data
    cfg = _cfg(tiny_encoder, data, tasks, tmp_path / "run", eval_module="slow")
    metrics = run(cfg, progress=False)
    assert len(metrics["accuracy_matrix"]) == 2
    folder = tmp_path / "run" / "seed-0" / "adapters" / "task-02"
    assert (folder / SLOW / "adapter_model.safetensors").is_file()
    prepared = prepare(cfg)
    learner = build_learner(cfg, prepared, seed=0)
    learner.restore(tmp_path / "run", 0)
    rows = prepared.stream.tasks[0].test[:5]
    with torch.no_grad():
        slow, fast = learner.logits_of(SLOW, rows), learner.logits_of(learner.module_name, rows)
        assert torch.equal(learner.logits(rows), slow) and not torch.allclose(slow, fast)
    learner.close()
    assert main(["predict", str(tmp_path / "run"), "We saw the wolf.", "--entity", "wolf"]) == 0
    assert main(["verify", str(tmp_path / "run")]) == 0


def test_runs_on_a_generative_stream(tiny_decoder, tmp_path, capsys):
    from test_generation import write_generative_data

    out = tmp_path / "run"
    data = write_generative_data(tmp_path / "gen")
    assert main(["run", "--model", str(tiny_decoder), "--data", str(data), "--learner", "i-lora[buffer_size=16]",
                 "--epochs", "1", "--batch-size", "8", "--out", str(out), "--no-progress"]) == 0
    seed = json.loads((out / "seed-0" / "metrics.json").read_text())
    assert len(seed["accuracy_matrix"]) == 2 and seed["task_metric"] == ["exact_match", "exact_match"]
    assert len(seed["reference_perplexity"]) == 2
    assert main(["predict", str(out), "Plural of cat?"]) == 0
    assert "Plural of cat?" in capsys.readouterr().out


@pytest.mark.parametrize("options,match", [
    ({"buffer_size": 0}, "buffer_size: must be >= 1"),
    ({"ema_alpha": 1.5}, "ema_alpha: must be <= 1.0, got 1.5"),
    ({"reg_weight": -1.0}, "reg_weight: must be >= 0"),
    ({"eval_module": "ema"}, "eval_module: must be one of fast, slow"),
    ({"buffersize": 10}, "did you mean 'buffer_size'"),
])
def test_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        check(from_dict({"model": "minilm", "learner": "i-lora", "learner_options": options}))
