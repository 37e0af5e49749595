"""ZSCL: distillation of the frozen base's next-token distributions on reference text, L2 to the
task start, and a weight ensemble (of s B A for LoRA) that becomes the module after each task."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conpet.backbone import last_hidden
from conpet.cli import main
from conpet.config import from_dict
from conpet.inputs import right_padded
from conpet.heads import task_targets


REFERENCE = "The river runs past the old mill.\nA child reads a book under the tree.\nRain fell all night.\n"


@pytest.fixture
def short_reference(tmp_path):
    """A short reference text (one chunk of about 30 tokens): the KD's logits over the whole
    vocabulary dominate a tiny model's step."""
    path = tmp_path / "reference.txt"
    path.write_text(REFERENCE)
    return path


def _learner(model, data, tasks, pet=None, reference=None, top_layers=None, **options):
    from conpet.build import build_learner, prepare

    cfg = from_dict({"model": str(model), "learner": "zscl",
                     "data": {"file": str(data), "tasks": str(tasks), "reference_text": reference and str(reference)},
                     "learner_options": options, "pet": pet or {"method": "lora", "options": {"r": 2, "lora_alpha": 4}},
                     "train": {"epochs": 2, "batch_size": 4, "lr": 0.05, "precision": "fp32", "top_layers": top_layers}})
    prepared = prepare(cfg)
    return build_learner(cfg, prepared, seed=0)


def _lora(learner) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    name = learner.module_name
    return {path: (layer.lora_A[name].weight.detach().clone(), layer.lora_B[name].weight.detach().clone(),
                   layer.scaling[name]) for path, layer in learner.ctx.pet.tuner_layers(learner.model, name)}


def _delta(lora) -> dict[str, torch.Tensor]:
    return {k: s * b.double() @ a.double() for k, (a, b, s) in lora.items()}


def test_kd_is_the_token_kl_to_the_bare_backbone_and_zero_before_any_update(tiny_decoder, typing_data):
    learner = _learner(tiny_decoder, *typing_data, l2=0.5)
    numbers = learner.reference_batch(0, 0)
    assert len(numbers) == 4 and learner.reference_batch(0, 0) == numbers != learner.reference_batch(0, 1)
    chunks = [learner.reference_chunks()[i] for i in numbers]
    ids, mask = right_padded(chunks, 0, "cpu")
    keep = mask[:, 1:].bool()
    with torch.no_grad():  # the zero-shot model, before any module is attached
        base = learner.ctx.lm_head(last_hidden(learner.ctx.backbone.model(input_ids=ids, attention_mask=mask))[:, :-1][keep])
    learner.begin_task(0)
    assert float(learner.kd_loss(numbers).detach()) == pytest.approx(0.0, abs=1e-7)  # LoRA starts at B = 0
    with torch.no_grad():
        for p in learner.pet_parameters():
            p.add_(0.3 * torch.randn_like(p))
    teacher, student = learner.reference_logits(numbers)
    assert torch.allclose(teacher, base, atol=1e-6) and not torch.allclose(student, base, atol=1e-3)
    pt = torch.softmax(base.double() / 2, dim=-1)
    ps = torch.softmax(student.detach().double() / 2, dim=-1)
    by_hand = 4 * float((pt * (pt.log() - ps.log())).sum(-1).mean())
    kd = learner.kd_loss(numbers)
    assert float(kd.detach()) == pytest.approx(by_hand, rel=1e-4) and by_hand > 1e-4
    assert kd.requires_grad  # the student side trains
    # the whole loss: label-smoothed CE over the task's classes + KD + l2 * sum (theta - theta_start)^2
    learner.task, learner.step = 0, 0
    learner.params = learner.pet_parameters()
    learner.anchor = [torch.zeros_like(p) for p in learner.params]
    learner._targets = task_targets(learner.ctx.stream, 0, "cpu")
    rows = learner.ctx.stream.tasks[0].train[:4]
    columns, local = learner._targets
    ce = torch.nn.functional.cross_entropy(learner.logits(rows)[:, columns], local[learner.ctx.targets(rows)],
                                           label_smoothing=0.2)
    l2 = sum(float((p.detach().double() ** 2).sum()) for p in learner.params)
    total = float(ce.detach()) + float(learner.kd_loss(learner.reference_batch(0, 0)).detach()) + 0.5 * l2
    assert float(learner.loss(rows).detach()) == pytest.approx(total, rel=1e-5)
    learner.close()


def test_under_top_layers_the_reference_text_runs_the_frozen_layers_once_per_chunk(tiny_decoder, typing_data):
    pet = {"method": "lora", "options": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}}
    full, split = _learner(tiny_decoder, *typing_data, pet), _learner(tiny_decoder, *typing_data, pet, top_layers=1)
    assert split.ctx.engine.split and full.ctx.engine.split is None
    for learner in (full, split):
        learner.begin_task(0)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking top-layer module, the same in both (below it: B = 0 in full)
        named = dict(full.model.named_parameters())
        changed = 0
        for name, p in split.model.named_parameters():
            if p.requires_grad and "lora" in name:
                p.add_(0.3 * torch.randn_like(p))
                named[name].copy_(p)
                changed += 1
    assert changed
    numbers = split.reference_batch(0, 0)
    for a, b in zip(full.reference_logits(numbers), split.reference_logits(numbers)):
        assert torch.allclose(a, b, atol=1e-4)
    engine = split.ctx.engine
    misses = engine.misses
    split.reference_logits(numbers)  # the chunks' lower layers are cached: no new miss
    assert engine.misses == misses and all(("zscl-reference", i) in engine.cache for i in numbers)
    full.close()
    split.close()


def test_reference_chunks_that_run_the_device_out_of_memory_are_cached_in_halves(tiny_decoder, typing_data):
    pet = {"method": "lora", "options": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}}
    split = _learner(tiny_decoder, *typing_data, pet, top_layers=1)
    split.begin_task(0)
    numbers = split.reference_batch(0, 0)
    expected = split.reference_logits(numbers)
    engine = split.ctx.engine
    for i in numbers:
        del engine.cache[("zscl-reference", i)]
    lower, sizes = engine._lower, []

    def small_device(batch):
        sizes.append(len(batch["input_ids"]))
        if len(batch["input_ids"]) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return lower(batch)

    engine._lower = small_device
    again = split.reference_logits(numbers)
    assert len(numbers) > 1 and sizes[0] == len(numbers) and sizes.count(1) == len(numbers)
    for a, b in zip(expected, again):
        assert torch.allclose(a, b, atol=1e-5)
    split.close()


def test_top_k_kd_is_the_kl_over_the_teachers_top_tokens_renormalised():
    from conpet.learners.zscl import token_kd

    teacher = torch.tensor([[4.0, 1.0, 3.0, -2.0], [0.0, 2.0, 1.0, 5.0]])
    student = torch.tensor([[1.0, 2.0, 0.5, 0.0], [3.0, 0.0, 1.0, 1.0]])
    assert float(token_kd(teacher, student, 2.0, top_k=4)) == pytest.approx(float(token_kd(teacher, student, 2.0)))
    # by hand, top 2 of the teacher: row 0 tokens (0, 2), row 1 tokens (3, 1); tau 2
    expected = 0.0
    for t, s in (([4.0, 3.0], [1.0, 0.5]), ([5.0, 2.0], [1.0, 0.0])):
        p, q = torch.tensor(t) / 2, torch.tensor(s) / 2
        p, q = p.softmax(-1), q.softmax(-1)
        expected += float((p * (p.log() - q.log())).sum())
    assert float(token_kd(teacher, student, 2.0, top_k=2)) == pytest.approx(4 * expected / 2, rel=1e-6)


def test_the_module_after_a_task_is_the_weight_ensemble_of_s_b_a(tiny_decoder, typing_data, short_reference,
                                                                  tmp_path):
    learner = _learner(tiny_decoder, *typing_data, reference=short_reference, we_interval=2)
    learner.learn(0)
    starts, snapshots, taken = [], [], []
    make, hook = learner.new_ensemble, learner.after_step

    def new_ensemble():  # the task-start weights (after the head grew), then the real ensemble
        starts.append((_lora(learner), learner.head.weight.detach().clone()))
        return make()

    def record(fit, step):  # the weights at every snapshot step, then the real hook
        hook(fit, step)
        if step % 2 == 0 or step == learner.last_step:
            snapshots.append((_lora(learner), learner.head.weight.detach().clone()))
            taken.append(step)

    learner.new_ensemble = new_ensemble
    learner.after_step = record
    learner.learn(1)
    assert taken[0] == 0 and taken[-1] == learner.last_step and len(taken) >= 3
    # by hand: the mean of the task-start update and each snapshot's, then its best rank-2 fit
    items = [_delta(lora) for lora, _ in starts + snapshots]
    dropped = total = 0.0
    after = _delta(_lora(learner))
    for key in after:
        mean = sum(d[key] for d in items) / len(items)
        u, s, vh = torch.linalg.svd(mean)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert torch.allclose(after[key], best, atol=1e-5), key
        dropped, total = dropped + float((s[2:] ** 2).sum()), total + float((s ** 2).sum())
    assert learner.eval_extra(1)["we_truncation_error"][1] == pytest.approx((dropped / total) ** 0.5, rel=1e-4)
    assert dropped > 0  # several rank-2 snapshots: their average is not rank 2
    # the head is averaged as weights (its new rows from their random start)
    heads = [head for _, head in starts + snapshots]
    assert torch.allclose(learner.head.weight, sum(heads) / len(heads), atol=1e-6)
    assert not torch.allclose(learner.head.weight, heads[-1], atol=1e-4)
    # the saved module is the ensemble
    learner.save(1, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    for path, (a, b, _) in _lora(learner).items():
        key = f"base_model.model.{path}"
        assert torch.equal(saved[f"{key}.lora_A.weight"], a) and torch.equal(saved[f"{key}.lora_B.weight"], b)
    learner.close()


def test_parameter_methods_average_their_weights_and_the_head(tiny_decoder, typing_data, short_reference):
    learner = _learner(tiny_decoder, *typing_data, pet={"method": "bitfit"}, reference=short_reference, we_interval=3)
    learner.begin_task(0)
    params = learner.pet_parameters()
    tracked = params + list(learner.head.parameters())
    seen = [[p.detach().clone() for p in tracked]]
    hook = learner.after_step

    def record(fit, step):
        hook(fit, step)
        if step % 3 == 0 or step == learner.last_step:
            seen.append([p.detach().clone() for p in tracked])

    learner.after_step = record
    learner.learn(0)
    assert len(seen) >= 3
    for k, p in enumerate(tracked):
        assert torch.allclose(p, sum(s[k] for s in seen) / len(seen), atol=1e-6)
    assert learner.eval_extra(0) == {"we_truncation_error": [0.0]}
    learner.close()


def test_runs_end_to_end_on_classification_and_generation_and_predicts(tiny_decoder, typing_data, short_reference,
                                                                        tmp_path, capsys):
    from test_generation import write_generative_data

    data, tasks = typing_data
    common = ["--epochs", "2", "--batch-size", "4", "--no-progress", "--set", "train.top_layers=null",
              "--set", f"data.reference_text={short_reference}"]
    assert main(["run", "--model", str(tiny_decoder), "--data", str(data), "--tasks", str(tasks), "--learner",
                 "zscl[we_interval=3]", "--out", str(tmp_path / "cls"), *common]) == 0
    metrics = json.loads((tmp_path / "cls" / "seed-0" / "metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]) == 2 and len(metrics["we_truncation_error"][1]) == 2
    assert main(["predict", str(tmp_path / "cls"), "We saw the wolf.", "--entity", "wolf"]) == 0
    gen = write_generative_data(tmp_path / "gen")
    assert main(["run", "--model", str(tiny_decoder), "--data", str(gen), "--learner", "zscl",
                 "--out", str(tmp_path / "gen-run"), *common]) == 0
    metrics = json.loads((tmp_path / "gen-run" / "seed-0" / "metrics.json").read_text())
    assert len(metrics["reference_perplexity"]) == 2 and len(metrics["accuracy_matrix"][1]) == 2
    assert main(["predict", str(tmp_path / "gen-run"), "Plural of cat?"]) == 0
    assert "Plural of cat?" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--learner", "zscl[label_smoothing=1.0]"], "label_smoothing: must be below 1"),
    (["--learner", "zscl[we_interval=0]"], "we_interval: must be >= 1"),
    (["--learner", "zscl[temprature=2]"], "did you mean 'temperature'"),
    (["--learner", "zscl", "--set", "train.select_on_dev=true"], "zscl keeps the weight ensemble"),
])
def test_bad_options(tiny_decoder, typing_data, tmp_path, capsys, args, message):
    data, tasks = typing_data
    out = tmp_path / "x"
    assert main(["run", "--model", str(tiny_decoder), "--data", str(data), "--tasks", str(tasks), *args,
                 "--out", str(out), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "config.yaml").exists()


def test_an_encoder_is_refused_before_anything_is_written(tiny_encoder, typing_data, tmp_path, capsys):
    data, tasks = typing_data
    out = tmp_path / "x"
    assert main(["run", "--model", str(tiny_encoder), "--data", str(data), "--tasks", str(tasks), "--learner", "zscl",
                 "--out", str(out), "--no-progress"]) == 2
    assert "is an encoder without an LM head" in capsys.readouterr().err
    assert not (out / "config.yaml").exists()


def test_a_preparation_made_for_a_learner_without_the_lm_head_gets_it_when_zscl_reuses_it(
        tiny_decoder, typing_data, short_reference, tmp_path):
    """``conpet run --learner sequential,zscl`` and the benchmarks prepare the backbone once for the
    first learner (no LM head) and reuse it: zscl loads the head then, in the frozen linears' dtype."""
    from conpet.build import build_learner, prepare

    data, tasks = typing_data
    common = {"model": str(tiny_decoder), "data": {"file": str(data), "tasks": str(tasks),
                                                   "reference_text": str(short_reference)},
              "train": {"epochs": 1, "batch_size": 4, "precision": "bf16", "top_layers": None}}
    prepared = prepare(from_dict({**common, "learner": "sequential"}))
    assert prepared.engine.backbone.lm_head is None
    learner = build_learner(from_dict({**common, "learner": "zscl"}), prepared, seed=0)
    head = prepared.engine.backbone.lm_head
    assert learner.ctx.lm_head is head and head.weight.dtype == torch.bfloat16
    learner.close()
    assert main(["run", "--model", str(tiny_decoder), "--data", str(data), "--tasks", str(tasks), "--learner",
                 "sequential,zscl", "--out", str(tmp_path / "both"), "--epochs", "1", "--no-progress",
                 "--set", "train.top_layers=null", "--set", f"data.reference_text={short_reference}"]) == 0
    assert (tmp_path / "both" / "zscl" / "seed-0" / "metrics.json").is_file()


def test_an_encoder_is_refused_up_front_when_zscl_comes_after_another_learner(tiny_encoder, typing_data, tmp_path,
                                                                             capsys):
    data, tasks = typing_data
    out = tmp_path / "x"
    assert main(["run", "--model", str(tiny_encoder), "--data", str(data), "--tasks", str(tasks), "--learner",
                 "sequential,zscl", "--out", str(out), "--no-progress"]) == 2
    assert "learner 'zscl' distils" in capsys.readouterr().err
    assert not any(out.rglob("*"))  # nothing written (sequential did not run first)
