"""Methods as their papers (and official code) define them: HFT's category-level half re-drawn at
every task, MoS's private shards and distinct index matrices, MoLA's expert profile over the PET
layers, EWC's per-sample Fisher, L2 anchored from task 1 on, EA-EMR*'s bounded refit, and
ConPET's own recipe options (batch_limit, the expert started from the selector)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from conpet.backbone import load_backbone
from conpet.build import build_learner, prepare
from conpet.config import from_dict
from conpet.engine import find_layers
from conpet.pet import LayerScope, get_pet
from conpet.pet.hft import category
from conpet.replay import replay_steps


def _cfg(model, typing_data, out, learner, tasks_file=None, **options):
    data, tasks = typing_data
    return from_dict({"model": str(model), "out": str(out), "learner": learner, "learner_options": options,
                      "data": {"file": str(data), "tasks": str(tasks_file or tasks)},
                      "train": {"epochs": 1, "batch_size": 4, "lr": 5e-3, "head_lr": 5e-2, "precision": "fp32"}})


def _blocks(paths):
    out: dict[str, list[str]] = {}
    for p in paths:
        out.setdefault(re.search(r"^(.*?\.\d+)\.", p).group(1), []).append(p)
    return out


@pytest.fixture(params=["encoder", "decoder"])
def backbone(request, tiny_encoder, tiny_decoder):
    return load_backbone(str(tiny_encoder if request.param == "encoder" else tiny_decoder))


# -- HFT ---------------------------------------------------------------------------------------------
def test_hft_trains_half_of_each_category_per_block_about_half_the_parameters(backbone):
    pet = get_pet("hft")
    model = pet.attach(backbone.model, "m")
    chosen = set(pet.chosen(model, "m"))
    ffn_chosen = ffn_total = 0
    for block, paths in _blocks(model.sites).items():
        attention = [p for p in paths if category(p) == "attention"]
        ffn = [p for p in paths if category(p) == "ffn"]
        assert len(attention) == 4, attention  # q, k, v, o
        assert sum(p in chosen for p in attention) == 2, block
        ffn_chosen += sum(p in chosen for p in ffn)
        ffn_total += len(ffn)
    assert ffn_chosen * 2 == ffn_total  # exactly half of the feed-forward matrices over the blocks
    total = sum(s.base.weight.numel() for s in model.sites.values())
    assert 0.4 <= pet.count(model, "m") / total <= 0.6
    assert pet.count(model, "m") == sum(p.numel() for p in pet.parameters(model, "m"))
    pet.detach(model)


def test_hft_redraws_the_half_at_every_task_for_a_shared_module(backbone):
    pet = get_pet("hft")
    model = pet.attach(backbone.model, "m")
    draws = []
    for task in range(4):
        pet.begin_fit(model, "m", task)
        draws.append(tuple(sorted(pet.chosen(model, "m"))))
        trainable = {p for p in pet.parameters(model, "m")}
        assert all(p.requires_grad == (p in trainable) for site in model.sites.values() for p in site.parts["m"].parameters())
    assert len(set(draws)) > 1, "every task trains its own half"
    pet.begin_fit(model, "m", 2)
    assert tuple(sorted(pet.chosen(model, "m"))) == draws[2], "the draw of a task is reproducible (resume)"
    pet.detach(model)


# -- MoS ---------------------------------------------------------------------------------------------
def test_mos_private_shards_are_private_and_every_index_matrix_is_distinct(backbone):
    r, rv, rp, l = 4, 3, 1, 2
    pet = get_pet("mos", {"r": r, "valid_r": rv, "private_r": rp, "shards": l})
    model = pet.attach(backbone.model, "m")
    by_type: dict[str, list] = {}
    for path, site in model.sites.items():
        by_type.setdefault(re.search(r"\.\d+\.(.+)$", path).group(1), []).append(site.parts["m"])
    indices = []
    for kind, parts in by_type.items():
        n_layers = len(parts)
        shared = (rv - rp) * n_layers * l
        owners: dict[int, int] = {}
        for position, part in enumerate(parts):
            for index in (part.a_index, part.b_index):
                assert len(index) == r * l
                assert len(set(index.tolist())) == r * l, "shards are drawn without replacement"
                own = [int(i) for i in index if i >= shared]
                assert len(own) == rp * l, "the paper's proportion: private_r of each layer's r vectors"
                for i in own:
                    assert owners.setdefault(i, position) == position, "a private shard belongs to one layer"
            indices += [tuple(part.a_index.tolist()), tuple(part.b_index.tolist())]
        assert len(owners) == rv * n_layers * l - shared, "every private shard is used by its layer"
    assert len(set(indices)) == len(indices), "no two sites (or A and B) share an index matrix"
    assert pet.count(model, "m") == sum(rv * len(ps) * (ps[0].pool_a.shape[1] + ps[0].pool_b.shape[1]) * l
                                        for ps in by_type.values())
    pet.detach(model)


# -- MoLA --------------------------------------------------------------------------------------------
def test_mola_expert_profile_follows_the_position_among_the_pet_layers(tmp_path):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=32))
    _, attr, layers = find_layers(model)
    pet = get_pet("mola", {"r": 2, "experts": [2, 4]}, scope=LayerScope((2, 3), attr, len(layers)))
    wrapped = pet.attach(model, "m")
    experts = {int(re.search(r"\.(\d+)\.", p).group(1)): s.parts["m"].A.shape[0] for p, s in wrapped.sites.items()}
    assert experts == {2: 2, 3: 4}, "the top two layers are the lower and the upper block of the PET layers"


# -- EWC ---------------------------------------------------------------------------------------------
def test_ewc_fisher_is_the_mean_of_per_sample_squared_gradients(tiny_encoder, typing_data, tmp_path):
    learner = build_learner(_cfg(tiny_encoder, typing_data, tmp_path / "run", "ewc"), prepare(
        _cfg(tiny_encoder, typing_data, tmp_path / "run", "ewc")), seed=0)
    learner.learn(0)
    plugin = learner.plugins[0]
    rows = plugin.fisher_rows(0)
    params = learner.pet_parameters()
    expected = [torch.zeros_like(p) for p in params]
    for i in rows:  # by hand: one row at a time, the gradient of -log p(y | x)
        loss = F.cross_entropy(learner.logits([i]), learner.ctx.targets([i]))
        for e, g in zip(expected, torch.autograd.grad(loss, params)):
            e += g ** 2
    expected = [e / len(rows) for e in expected]
    fisher = [a for a, _, _ in plugin.sums]  # after one task: A = F_0
    assert all(torch.allclose(f, e, rtol=1e-4, atol=1e-12) for f, e in zip(fisher, expected))
    batch_mean = [torch.zeros_like(p) for p in params]  # what the squared batch-mean gradient would give
    loss = F.cross_entropy(learner.logits(rows), learner.ctx.targets(rows))
    for b, g in zip(batch_mean, torch.autograd.grad(loss, params)):
        b += g ** 2
    assert sum(float(f.sum()) for f in fisher) > 1.5 * sum(float(b.sum()) for b in batch_mean)
    learner.close()


# -- L2 ----------------------------------------------------------------------------------------------
def test_l2_is_anchored_from_the_first_task_to_the_initial_pet_weights(tiny_encoder, typing_data, tmp_path):
    cfg = _cfg(tiny_encoder, typing_data, tmp_path / "run", "l2", l2_lambda=0.5)
    learner = build_learner(cfg, prepare(cfg), seed=0)
    learner.new_module(0)
    plugin = learner.plugins[0]
    plugin.before_task(0)
    initial = [p.detach().clone() for p in learner.pet_parameters()]
    assert float(plugin.extra_loss([], None).detach()) == 0.0
    with torch.no_grad():
        for p in learner.pet_parameters():
            p.add_(0.1)
    expected = 0.5 * sum(((p.detach() - q) ** 2).sum() for p, q in zip(learner.pet_parameters(), initial))
    assert float(plugin.extra_loss([], None).detach()) == pytest.approx(float(expected)) and float(expected) > 0
    learner.close()


# -- EA-EMR* -----------------------------------------------------------------------------------------
def test_ea_emr_star_refit_costs_the_same_at_every_task(tiny_encoder, typing_data, tmp_path):
    one_class_tasks = tmp_path / "tasks4.json"
    one_class_tasks.write_text(json.dumps([["animal"], ["food"], ["tool"], ["place"]]))
    sizes = {}
    for name in ("ea-emr", "ea-emr*"):
        cfg = _cfg(tiny_encoder, typing_data, tmp_path / name, name, tasks_file=one_class_tasks, memory_per_class=3)
        learner = build_learner(cfg, prepare(cfg), seed=0)
        for t in range(4):
            learner.learn(t)
        sizes[name] = learner.plugins[0].refit_sizes
        learner.close()
    assert [rows for rows, _ in sizes["ea-emr"]] == [3, 6, 9, 12], "the original refit grows with the memory"
    assert len({s for s in sizes["ea-emr*"][1:]}) == 1, sizes["ea-emr*"]  # tasks 2..4: one (rows, steps)


# -- ConPET's own recipe ---------------------------------------------------------------------------------
def test_batch_limit_is_the_official_budget_whatever_the_task_size():
    assert replay_steps(10, 8, 3, batch_limit=100) == replay_steps(10_000, 8, 3, batch_limit=100) == 3 * 80
    assert replay_steps(40, 8, 2) == 2 * 10  # default: every new row seen `epochs` times (4 new rows a batch)


def test_dynamic_expert_can_start_from_the_selector(tiny_encoder, typing_data, tmp_path):
    cfg = _cfg(tiny_encoder, typing_data, tmp_path / "run", "dynamic", expert_init="selector")
    learner = build_learner(cfg, prepare(cfg), seed=0)
    copies = []
    original = learner.ctx.pet.copy
    learner.ctx.pet.copy = lambda model, src, dst: (copies.append((src, dst)), original(model, src, dst))[1]
    learner.learn(0)
    learner.learn(1)
    assert copies == [("selector", "expert-001")]
    learner.close()
