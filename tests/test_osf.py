"""OSF: the low singular subspace of each weight trains with its gradient projected away from the
preserved top directions; the osf learner merges each task into the weights (not unload), then
re-decomposes them with a larger preserved rank, and gives the backbone back bit for bit."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from conpet.backbone import cloze_features, load_backbone
from conpet.config import from_dict
from conpet.data.stream import Row
from conpet.errors import ConfigError
from conpet.inputs import collate, encode_rows
from conpet.pet import LayerScope, get_pet
from conpet.runs import adapter_dir, finished_run


def _cfg(model, data, tasks=None, out="unused", pet=None, **options):
    return from_dict({"model": str(model), "learner": "osf", "out": str(out),
                      "data": {"file": str(data), **({"tasks": str(tasks)} if tasks else {})},
                      "learner_options": options, "pet": pet or {"method": "osf", "options": {}},
                      "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "precision": "fp32", "top_layers": 1}})


def _svd(weight: torch.Tensor):
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return u, s, vh


def test_wrapping_is_exact_and_sgd_steps_keep_the_preserved_directions(tiny_decoder):
    """By hand: the module's frozen part is the SVD of W; at the start the wrapped model is the
    backbone (dW = 0); after plain SGD steps the update dW satisfies U_h^T dW = 0 and dW V_h^T = 0
    (the top-k singular triplets of W are those of W + dW) while dW itself is not small."""
    bb = load_backbone(str(tiny_decoder))
    rows = [Row(text=f"Yesterday we talked about the {w} for a while.", label="x", entity=w)
            for w in ["dog", "bread", "hammer", "city", "lion", "cake", "saw", "river"]]
    batch = collate(encode_rows(rows, "typing", bb.tokenizer, bb.is_decoder, 64), list(range(8)), bb.pad_id)
    targets = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    base = copy.deepcopy(bb.model)
    with torch.no_grad():
        plain = cloze_features(base, batch)
    pet = get_pet("osf", {"effective_rank": 0.5})
    model = pet.attach(base, "m")
    model.eval()
    with torch.no_grad():
        # the update starts at zero: dW = 0 exactly, the factored forward up to fp32 rounding
        assert all(torch.count_nonzero(layer.get_delta_weight("m")) == 0 for _, layer in pet.tuner_layers(model, "m"))
        assert torch.allclose(cloze_features(model, batch), plain, atol=1e-5)
    layers = dict(pet.tuner_layers(model, "m"))
    assert len(layers) == 14  # q k v o gate up down in both layers (no scope)
    before, tops = {}, {}
    for path, layer in layers.items():
        w = layer.get_base_layer().weight.detach().clone()
        u, s, vh = _svd(w)
        k = min(w.shape) // 2
        assert layer.effective_rank["m"] == k
        low = layer.osf_svd_params["m"]
        assert torch.allclose(low["S_low"].double(), s[k:], atol=1e-5)  # the trailing singular values
        high = (u[:, :k] * s[:k]) @ vh[:k]
        rebuilt = high + (low["U_low"].double() * low["S_low"].double()) @ low["V_low"].double()
        assert torch.allclose(rebuilt, w.double(), atol=1e-5), path  # U_h S_h V_h + U_l S_l V_l = W
        before[path], tops[path] = w, (u[:, :k], s[:k], vh[:k])
    head = nn.Linear(bb.hidden_size, 4)
    opt = torch.optim.SGD(pet.parameters(model, "m"), lr=5.0)
    model.train()
    for _ in range(3):
        loss = F.cross_entropy(head(cloze_features(model, batch)), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = 0.0
    for path, layer in layers.items():
        dw = layer.get_delta_weight("m").detach().double()
        u_h, s_h, vh_h = tops[path]
        scale = float(dw.norm())
        moved = max(moved, scale / float(before[path].norm()))
        # unprojected, about half of dW would lie along the preserved directions; here only the
        # fp32 SVD's rounding does
        assert float((u_h.T @ dw).norm()) < 1e-3 * scale, path
        assert float((dw @ vh_h.T).norm()) < 1e-3 * scale, path
        assert torch.allclose(u_h.T @ (before[path].double() + dw) @ vh_h.T, torch.diag(s_h), atol=1e-4), path
    assert moved > 1e-3, "the trainable subspace moved"
    # trainable U, S, V of rank min(m, n) - k per target, k = int(0.5 min(m, n)), from the weight shapes
    shapes = [tuple(layer.get_base_layer().weight.shape) for _, layer in pet.tuner_layers(model, "m")]
    assert pet.count(model, "m") == sum((m + n + 1) * (min(m, n) - int(0.5 * min(m, n))) for m, n in shapes) > 0


def test_each_task_is_merged_then_redecomposed_with_a_larger_preserved_rank(tiny_decoder, typing_data):
    from conpet.build import build_learner, prepare

    data, tasks = typing_data
    cfg = _cfg(tiny_decoder, data, tasks)
    prepared = prepare(cfg)
    backbone = prepared.engine.backbone
    original = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    learner = build_learner(cfg, prepared, seed=0)
    assert learner.fractions == [0.0, 0.5]  # t / n of two tasks
    seen = []
    real_merge = learner.after_task

    def record(t):  # the module's update, ranks and initial singular values, just before it is merged
        pet = learner.ctx.pet
        seen.append({"delta": pet.delta_weights(learner.model, learner.module_name),
                     "ranks": {p: l.effective_rank[learner.module_name]
                               for p, l in pet.tuner_layers(learner.model, learner.module_name)},
                     "s_low": {p: l._osf_S_low_init[learner.module_name].detach().clone()
                               for p, l in pet.tuner_layers(learner.model, learner.module_name)}})
        real_merge(t)

    learner.after_task = record
    learner.learn(0)
    params = dict(backbone.model.named_parameters())
    assert set(seen[0]["delta"]) == {n for n in params if ".layers.1." in f".{n}" and n.endswith("proj.weight")}
    after_first = {}
    for name, delta in seen[0]["delta"].items():  # merged, not unloaded: W_1 = W_0 + dW
        assert float(delta.norm()) > 0
        assert torch.allclose(params[name], original[name] + delta, atol=1e-6), name
        assert not torch.equal(params[name], original[name])
        after_first[name] = params[name].detach().clone()
    assert set(seen[0]["ranks"].values()) == {1}  # task 0: the smallest rank peft accepts
    assert not learner.has_module(learner.module_name) and learner.model is backbone.model  # the plain, merged backbone answers
    learner.learn(1)
    for path, rank in seen[1]["ranks"].items():  # a larger preserved rank, on the merged weights' SVD
        w = after_first[f"{path}.weight"]
        assert rank == min(w.shape) // 2 > seen[0]["ranks"][path]
        assert torch.allclose(seen[1]["s_low"][path].double(), _svd(w)[1][rank:], atol=1e-5), path
    for name, delta in seen[1]["delta"].items():
        assert torch.allclose(params[name], after_first[name] + delta, atol=1e-6), name
    update = learner.update()
    for name in update:
        assert torch.allclose(update[name], params[name] - original[name], atol=1e-6)
    learner.close()
    assert all(torch.equal(p, original[n]) for n, p in backbone.model.named_parameters()), "the backbone, bit for bit"


def test_classification_run_saves_the_update_and_predict_rebuilds_the_model(tiny_encoder, typing_data, tmp_path):
    from conpet.cli import main
    from conpet.runner import evaluate_run, run

    data, tasks = typing_data
    out = tmp_path / "run"
    metrics = run(_cfg(tiny_encoder, data, tasks, out), progress=False)
    assert len(metrics["accuracy_matrix"]) == 2 and metrics["stored_params"] > metrics["pet_params"] > 0
    assert metrics["pet_params"] < metrics["pet_params_first_task"]  # more is preserved at task 2
    folder = adapter_dir(out, 0, finished_run(out, 0)[2][-1])
    update = load_file(str(folder / "osf_update.safetensors"))
    assert update and all(".layer.1." in k and k.endswith(".weight") for k in update)
    assert all(float(v.norm()) > 0 for v in update.values())
    meta = json.loads((folder / "conpet.json").read_text())
    assert meta["pet"] == "osf" and meta["osf_preserved"] == [0.0, 0.5]
    again = evaluate_run(out)  # the backbone + the saved W_t - W_0 answers as the run did
    assert list(again["per_task"].values()) == metrics["accuracy_matrix"][-1]
    assert main(["predict", str(out), "We saw the wolf.", "--entity", "wolf"]) == 0
    assert main(["verify", str(out)]) == 0


def test_generative_run_with_osf_options(tiny_decoder, tmp_path):
    from test_generation import write_generative_data

    from conpet.cli import main
    from conpet.runner import run

    data = write_generative_data(tmp_path / "gen")
    pet = {"method": "osf", "options": {"target_modules": ["q_proj", "v_proj"]}}
    cfg = _cfg(tiny_decoder, data, out=tmp_path / "run", pet=pet, preserve_start=0.25, preserve_end=0.5)
    metrics = run(cfg, progress=False)
    assert len(metrics["accuracy_matrix"]) == 2 and all(0 <= v <= 1 for v in metrics["accuracy_matrix"][1])
    assert len(metrics["reference_perplexity"]) == 2
    folder = adapter_dir(tmp_path / "run", 0, finished_run(tmp_path / "run", 0)[2][-1])
    keys = load_file(str(folder / "osf_update.safetensors")).keys()
    assert {k.split(".")[-2] for k in keys} == {"q_proj", "v_proj"}
    assert main(["predict", str(tmp_path / "run"), "Plural of cat?"]) == 0


@pytest.mark.parametrize("options,pet,message", [
    ({"preserve_end": 1.0}, None, "preserve_end: a fraction below 1"),
    ({"preserve_start": 0.6, "preserve_end": 0.3}, None, "is below preserve_start"),
    ({"preserve_start": -0.1}, None, "must be >= 0.0"),
    ({"rank": 3}, None, "unknown option 'rank'"),
    ({}, {"method": "osf", "options": {"effective_rank": 4}}, "sets the preserved rank of every task"),
])
def test_bad_learner_options(options, pet, message, tiny_encoder, typing_data):
    from conpet.learners import get_learner

    cfg = _cfg(tiny_encoder, *typing_data, pet=pet, **options)
    with pytest.raises(ConfigError, match=message):
        get_learner("osf").check_options(cfg)


def test_osf_trains_at_its_own_full_fine_tuning_rate_unless_told(tiny_decoder, typing_data):
    """OSF's parameters are slices of the weights: their default rate is 3e-5, not the run's LoRA rate
    (0.01 here); ``pet.options.lr`` sets it (``null``: train.lr), and the learner's per-task OSF keeps it."""
    from conpet.build import build_learner, prepare

    data, tasks = typing_data
    for options, expected in (({}, 3e-5), ({"lr": 2e-4}, 2e-4), ({"lr": None}, 0.01)):
        cfg = _cfg(tiny_decoder, data, tasks, pet={"method": "osf", "options": options})
        learner = build_learner(cfg, prepare(cfg), seed=0)
        for t in (0, 1):
            pet = learner.method_for(t)
            model = pet.attach(learner.ctx.backbone.model, learner.module_name)
            groups = pet.param_groups(model, learner.module_name, cfg.train.lr)
            assert [g["lr"] for g in groups] == [expected] and groups[0]["params"], (options, t)
            learner.ctx.backbone.model = model.unload()
        learner.close()
    with pytest.raises(ConfigError, match="lr"):
        get_pet("osf", {"lr": -1.0})


@pytest.mark.parametrize("options,message", [
    ({"effective_rank": 0}, "must be >= 1"),
    ({"effective_rank": 1.0}, "fraction must be in"),
    ({"effective_rank": "half"}, "an integer >= 1 or a fraction"),
    ({"rank_pattern": {"q_proj(": 2}}, "bad regex"),
    ({"rank_pattern": {"q_proj": 0.0}}, "fraction must be in"),
    ({"effective_rnak": 2}, "did you mean 'effective_rank'"),
    ({"target_modules": r".*q_proj"}, "cannot be confined"),
])
def test_bad_pet_options(options, message):
    with pytest.raises(ConfigError, match=message):
        get_pet("osf", options, scope=LayerScope((1,), "layers", 2))


def test_a_default_start_above_the_schedules_end_is_an_error(tiny_encoder, typing_data):
    from conpet.build import build_learner, prepare

    cfg = _cfg(tiny_encoder, *typing_data, preserve_start=0.7)  # (n - 1) / n = 0.5 with two tasks
    with pytest.raises(ConfigError, match="give preserve_end too"):
        build_learner(cfg, prepare(cfg), seed=0)


def test_the_subspace_probe_measures_what_the_next_task_preserves():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("osf_subspace", Path(__file__).parents[1] / "bench" / "osf_subspace.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 12))
    v, _ = torch.linalg.qr(torch.randn(8, 8))
    w = u[:, :8] @ torch.diag(torch.arange(8, 0, -1).float()) @ v.T  # singular values 8 .. 1
    top = u[:, :3] @ torch.randn(3, 3) @ v[:, :3].T  # inside the top-3 spans on both sides
    low = u[:, 3:8] @ torch.randn(5, 5) @ v[:, 3:].T  # in the low spans
    mixed = u[:, :3] @ torch.randn(3, 5) @ v[:, 3:].T  # top on the left only: not preserved
    spans = probe.top_spans(w, 3)
    assert probe.preserved_share(spans, top) == pytest.approx(1.0, abs=1e-5)
    assert probe.preserved_share(spans, low) == pytest.approx(0.0, abs=1e-5)
    assert probe.preserved_share(spans, mixed) == pytest.approx(0.0, abs=1e-5)
    both = probe.preserved_share(spans, top + low)
    assert both == pytest.approx(float(top.norm() ** 2 / (top + low).norm() ** 2), rel=1e-4)
    assert probe.span_overlap(spans[0], probe.top_spans(w, 3)[0]) == pytest.approx(1.0, abs=1e-5)
    swapped = u[:, 3:6] @ torch.diag(torch.tensor([20.0, 19.0, 18.0])) @ v[:, 3:6].T + w
    assert probe.span_overlap(spans[0], probe.top_spans(swapped, 3)[0]) < 0.01  # a new top span orthogonal to the old one
