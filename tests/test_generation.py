"""Generative streams: rows, target-only loss, greedy decoding against HF generate, metrics,
every generative learner on a tiny stream, and the misuse errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ANIMALS, FOODS, PLACES, TOOLS
from conpet.cli import main
from conpet.config import from_dict
from conpet.errors import DataError
from conpet.text_metrics import chrf, exact_match, normalize, primary_metric, rouge_l, score, token_f1

WORDS = ANIMALS + FOODS + TOOLS + PLACES


def write_generative_data(folder: Path) -> Path:
    """Two tasks (plural, capitals) over 48 words; one row in four is test, one dev."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gen.jsonl"
    with open(path, "w") as f:
        for k, w in enumerate(WORDS):
            split = "test" if k % 4 == 0 else "dev" if k % 4 == 1 else "train"
            f.write(json.dumps({"prompt": f"Plural of {w}?", "target": w + "s", "task": "plural", "split": split}) + "\n")
            f.write(json.dumps({"instruction": "Write the word in capitals.", "input": w, "output": w.upper(),
                                "task": "upper", "split": split}) + "\n")
    return path


@pytest.fixture
def gen_data(tmp_path) -> Path:
    return write_generative_data(tmp_path / "data")


def _cfg(model, data, out, learner="sequential", **train):
    return from_dict({"model": str(model), "learner": learner, "out": str(out), "data": {"file": str(data)},
                      "train": {"epochs": 1, "batch_size": 8, "precision": "fp32", **train}})


# -- metrics against hand-computed values ------------------------------------------------------------
def test_text_metrics_by_hand():
    assert normalize("The  Dog's, bark!") == "dogs bark"
    assert exact_match("the cat.", "Cat") == 1.0 and exact_match("cats", "cat") == 0.0
    # prediction "a big red dog" -> [big, red, dog]; reference "red dog barks" -> [red, dog, barks]
    # common 2: precision 2/3, recall 2/3, F1 2/3
    assert token_f1("a big red dog", "red dog barks") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    # LCS of "the cat sat on the mat" and "the cat on the mat": 5 tokens; P = 5/6, R = 5/5
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(2 * (5 / 6) / (5 / 6 + 1))
    assert chrf("hello", "hello") == pytest.approx(1.0) and chrf("abc", "xyz") == 0.0
    assert score("exact_match", ["a", "b"], ["a", "c"]) == 0.5
    assert primary_metric("auto", ["chien", "le chat"]) == "exact_match"
    assert primary_metric("auto", ["a long answer of five words"]) == "rouge_l"
    assert primary_metric("f1", ["x"]) == "f1"
    assert primary_metric("auto", ["chien"], recommended="chrf") == "chrf"  # a benchmark's recommendation
    assert primary_metric("exact_match", ["chien"], recommended="chrf") == "exact_match"  # data.metric wins


# -- rows ---------------------------------------------------------------------------------------------
def test_generative_rows_and_their_stream(gen_data):
    from conpet.config import DataConfig
    from conpet.data import load_stream

    stream = load_stream(DataConfig(benchmark=None, file=str(gen_data)))
    assert stream.generative and [t.name for t in stream.tasks] == ["plural", "upper"]
    upper = stream.rows[stream.tasks[1].train[0]]
    assert upper.text == "Write the word in capitals.\n\n" + upper.target.lower() and upper.label == "upper"


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Plural of dog?", "task": "t"}, "has a prompt but no target"),
    ({"prompt": "Plural of dog?", "target": "dogs"}, "needs field 'task'"),
    ({"prompt": "p", "instruction": "i", "target": "x", "task": "t"}, "not both"),
])
def test_bad_generative_rows(tmp_path, record, message):
    from conpet.data.formats import read_rows

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message):
        read_rows(path)


def test_misuse_is_a_clear_error_before_anything_is_written(tiny_decoder, tiny_encoder, gen_data, tmp_path, capsys):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(gen_data.read_text() + json.dumps({"text": "a dog", "label": "animal"}) + "\n")
    long = tmp_path / "long.jsonl"
    long.write_text(gen_data.read_text() + json.dumps({"prompt": "p", "target": "word " * 400, "task": "plural", "split": "train"}) + "\n")
    cases = [
        (["--data", str(mixed), "--model", str(tiny_decoder)], "a stream has one kind of task"),
        (["--data", str(long), "--model", str(tiny_decoder)], "leaves no room for the prompt within train.max_length"),
        (["--data", str(gen_data), "--model", str(tiny_decoder), "--set", "data.chat_template=true"],
         "the model's tokenizer has no chat template"),
        (["--data", str(gen_data), "--model", str(tiny_encoder)], "an encoder cannot generate answers"),
        (["--data", str(gen_data), "--model", str(tiny_decoder), "--learner", "ea-emr"],
         "does not train generative (prompt -> target) streams yet"),
        (["--data", str(gen_data), "--model", str(tiny_decoder), "--learner", "sequential,crl"],
         "'crl' does not train generative (prompt -> target) streams yet"),  # the second of a comparison too
        (["--data", str(gen_data), "--model", str(tiny_decoder), "--learner", "dynamic",
          "--set", "learner_options.top_k=2"], "the selector routes each prompt to one expert"),
    ]
    for k, (flags, message) in enumerate(cases):
        out = tmp_path / f"out-{k}"
        assert main(["run", *flags, "--out", str(out), "--no-progress"]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


# -- the loss counts target tokens only --------------------------------------------------------------
def test_loss_counts_target_tokens_only(tiny_decoder, gen_data):
    from conpet.build import build_learner, prepare
    from conpet.generation import lm_loss, target_positions

    cfg = _cfg(tiny_decoder, gen_data, "unused", top_layers=None)
    prepared = prepare(cfg)
    engine = prepared.engine
    learner = build_learner(cfg, prepared, seed=0)
    learner.new_module()
    rows = prepared.stream.tasks[0].train[:4]
    _, pos, nxt = target_positions(engine, rows)
    enc = engine.encoded
    assert len(nxt) == sum(len(enc.ids[i]) - enc.target_start[i] for i in rows)
    loss = lm_loss(engine, learner.model, learner.ctx.lm_head, rows)
    # changing a prompt token's *label* changes nothing: prompt positions are not predicted
    states = engine.states(learner.model, rows)
    by_hand = []
    for r, i in enumerate(rows):
        ids, start = enc.ids[i], enc.target_start[i]
        logits = learner.ctx.lm_head(states[r, start - 1:len(ids) - 1]).float()
        by_hand.append(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[start:]), reduction="sum").detach())
    assert loss.detach().item() == pytest.approx(float(sum(by_hand)) / len(nxt), rel=1e-5)
    everything = []
    for r, i in enumerate(rows):  # the loss a prompt-counting objective would give differs
        ids = enc.ids[i]
        logits = learner.ctx.lm_head(states[r, : len(ids) - 1]).float()
        everything.append(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
    assert abs(float(sum(everything).detach()) / sum(len(enc.ids[i]) - 1 for i in rows) - loss.item()) > 1e-3
    learner.close()


# -- decoding matches Hugging Face generate ---------------------------------------------------------
def test_greedy_decoding_matches_hf_generate_with_and_without_the_adapter(lively_decoder, gen_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    from conpet.build import build_learner, prepare
    from conpet.generation import greedy_generate
    from conpet.runner import run

    cfg = _cfg(lively_decoder, gen_data, tmp_path / "run", top_layers=None)
    run(cfg, progress=False)
    prepared = prepare(cfg)
    learner = build_learner(cfg, prepared, seed=0)
    ctx = learner.ctx
    rows = prepared.stream.tasks[0].test[:3] + prepared.stream.tasks[1].test[:3]
    prompts = [ctx.encoded.prompt(i) for i in rows]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    eos = ctx.backbone.tokenizer.sep_token_id
    ours_base = greedy_generate(ctx.backbone.model, ctx.lm_head, prompts, ctx.backbone.pad_id, [eos], 6, ctx.compute)

    causal = AutoModelForCausalLM.from_pretrained(str(lively_decoder)).eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def hf(model):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)[:, width:].tolist()
        return [row[: row.index(eos)] if eos in row else row for row in out]

    assert ours_base == hf(causal) and len({tuple(t) for t in ours_base}) > 1
    no_cache = greedy_generate(ctx.backbone.model, ctx.lm_head, prompts, ctx.backbone.pad_id, [eos], 6, ctx.compute,
                               kv_cache=False)
    assert no_cache == ours_base  # one full pass per token, right-padded: the same tokens
    learner.restore(Path(cfg.out), 0)
    ours = greedy_generate(learner.model, ctx.lm_head, prompts, ctx.backbone.pad_id, [eos], 6, ctx.compute)
    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(str(lively_decoder)),
                                      str(Path(cfg.out) / "seed-0" / "adapters" / "upper")).eval()
    causal.model = plain.base_model.model  # the LoRA-injected decoder under HF's own LM head and generate
    assert ours == hf(causal)
    learner.close()


def test_decoding_through_an_injected_module_passes_the_cache_under_the_backbones_own_name(lively_decoder,
                                                                                           gen_data, tmp_path):
    """transformers 5 renamed ``past_key_values`` to ``cache`` and warns on the old name (removed in
    5.40): conpet's own injected modules (here a bottleneck adapter) pass the new name, as the
    peft-backed ones do, and their KV-cached tokens equal the full-recompute ones."""
    import warnings

    from conpet.build import build_learner, prepare
    from conpet.generation import greedy_generate

    cfg = from_dict({"model": str(lively_decoder), "learner": "sequential", "pet": {"method": "adapter"},
                     "out": str(tmp_path / "run"), "data": {"file": str(gen_data)},
                     "train": {"epochs": 1, "batch_size": 8, "precision": "fp32", "top_layers": None}})
    prepared = prepare(cfg)
    learner = build_learner(cfg, prepared, seed=0)
    ctx = learner.ctx
    prompts = [ctx.encoded.prompt(i) for i in prepared.stream.tasks[0].test[:4]]
    eos = ctx.backbone.tokenizer.sep_token_id
    base = greedy_generate(ctx.backbone.model, ctx.lm_head, prompts, ctx.backbone.pad_id, [eos], 6, ctx.compute)
    model = ctx.pet.attach(ctx.backbone.model, "m")
    ctx.pet.activate(model, "m")
    torch.manual_seed(0)
    for p in ctx.pet.tensors(model, "m").values():  # an adapter starts as the identity: make it act
        torch.nn.init.normal_(p, std=0.5)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cached = greedy_generate(model, ctx.lm_head, prompts, ctx.backbone.pad_id, [eos], 6, ctx.compute)
    assert not [w for w in seen if "past_key_values" in str(w.message)]
    full = greedy_generate(model, ctx.lm_head, prompts, ctx.backbone.pad_id, [eos], 6, ctx.compute, kv_cache=False)
    assert cached == full
    assert base != cached  # the module acts on the tokens compared
    learner.close()


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning", "dept"])
def test_prompt_methods_decode_and_score_without_repeating_their_virtual_tokens(lively_decoder, gen_data, tmp_path,
                                                                                 method):
    """A method that prepends virtual tokens (or keys) at every forward pass decodes with one full
    pass per token: the batched answers are what a naive loop over each prompt alone gives, and
    the reference perplexity scores the text tokens only (it once crashed on the longer output)."""
    from conpet.backbone import last_hidden
    from conpet.build import build_learner, prepare
    from conpet.inputs import end_token_id
    from conpet.runner import run

    cfg = _cfg(lively_decoder, gen_data, tmp_path / "run")
    cfg.pet.method = method
    metrics = run(cfg, progress=False)
    assert len(metrics["reference_perplexity"]) == 2 and all(p > 1 for p in metrics["reference_perplexity"])
    prepared = prepare(cfg)
    learner = build_learner(cfg, prepared, seed=0)
    learner.restore(Path(cfg.out), 0)
    ctx = learner.ctx
    rows = prepared.stream.tasks[0].test[:3] + prepared.stream.tasks[1].test[:3]
    batched = ctx.generate(learner.model, rows)
    eos, tok = end_token_id(ctx.backbone.tokenizer), ctx.backbone.tokenizer
    alone = []
    with torch.no_grad():
        for i in rows:
            seq, answer = list(ctx.encoded.prompt(i)), []
            for _ in range(cfg.data.max_new_tokens):
                hidden = last_hidden(learner.model(input_ids=torch.tensor([seq]), attention_mask=torch.ones(1, len(seq))))
                nxt = int(ctx.lm_head(hidden[0, -1]).argmax())
                if nxt == eos:
                    break
                seq.append(nxt)
                answer.append(nxt)
            alone.append(tok.decode(answer, skip_special_tokens=True).strip())
    assert batched == alone and len(set(alone)) > 1
    learner.close()


def test_predict_answers_prompts_of_a_generative_run(tiny_decoder, gen_data, tmp_path, capsys):
    from conpet.data.stream import Row
    from conpet.predict import predict
    from conpet.runner import run

    run(_cfg(tiny_decoder, gen_data, tmp_path / "run"), progress=False)
    out = predict(tmp_path / "run", [Row(text="Plural of cat?", label="?"), Row(text="Plural of dog?", label="?")])
    assert [r["prompt"] for r in out] == ["Plural of cat?", "Plural of dog?"]
    assert all(isinstance(r["text"], str) for r in out) and out[0]["task"] is None  # one module answers both
    assert main(["predict", str(tmp_path / "run"), "Plural of cat?"]) == 0
    assert "Plural of cat?" in capsys.readouterr().out


# -- LwF distils the previous module's next-token distributions ----------------------------------------
def test_generative_lwf_distils_token_distributions(tiny_decoder, gen_data):
    import torch.nn.functional as F

    from conpet.build import build_learner, prepare
    from conpet.generation import token_logits
    from conpet.learners.lwf import TEACHER

    cfg = _cfg(tiny_decoder, gen_data, "unused", learner="lwf*")
    cfg.learner_options = {"steps_per_task": 2, "lwf_temperature": 2.0, "lwf_lambda": 1.0}
    prepared = prepare(cfg)
    learner = build_learner(cfg, prepared, seed=0)
    ctx, plugin = learner.ctx, learner.plugins[0]
    learner.learn(0)
    plugin.before_task(1)  # teacher = the module after task 1
    rows = prepared.stream.tasks[1].train[:4] + prepared.stream.tasks[0].train[:2]
    loss, logits = learner.objective_loss(rows)
    assert logits.shape[-1] == ctx.lm_head.weight.shape[0]  # vocabulary-wide, one row per target token
    assert float(plugin.extra_loss(rows, logits).detach()) == pytest.approx(0.0, abs=1e-6)  # teacher == student now
    with torch.no_grad():  # move the student: the term becomes the hand-computed KL
        for p in learner.pet_parameters():
            p.add_(0.05 * torch.randn_like(p))
    _, student = learner.objective_loss(rows)
    ctx.pet.activate(learner.model, TEACHER)
    teacher = token_logits(ctx.engine, learner.model, ctx.lm_head, rows)
    ctx.pet.activate(learner.model, learner.module_name)
    kl = (F.softmax(teacher / 2, -1) * (F.log_softmax(teacher / 2, -1) - F.log_softmax(student / 2, -1))).sum(-1)
    expected = 4 * kl.mean().detach()
    assert float(plugin.extra_loss(rows, student).detach()) == pytest.approx(float(expected), rel=1e-4) and float(expected) > 0
    learner.close()


# -- Dynamic ConPET: the selector routes each prompt to the expert that generates --------------------------
def test_dynamic_routes_each_prompt_to_one_generating_expert(tiny_decoder, gen_data, tmp_path):
    from conpet.build import build_learner, prepare
    from conpet.data.stream import Row
    from conpet.generation import perplexity
    from conpet.learners.dynamic import expert_name
    from conpet.predict import predict
    from conpet.evaluation import reference_chunks
    from conpet.runner import run

    cfg = _cfg(tiny_decoder, gen_data, tmp_path / "run", learner="dynamic")
    cfg.learner_options = {"steps_per_task": 6}
    metrics = run(cfg, progress=False)
    assert len(metrics["selector_accuracy"][1]) == 2
    prepared = prepare(cfg)
    learner = build_learner(cfg, prepared, seed=0)
    learner.restore(Path(cfg.out), 0)
    ctx = learner.ctx
    rows = prepared.stream.tasks[0].test[:4] + prepared.stream.tasks[1].test[:4]
    routed, route = learner.generate_and_route(rows)  # one batch, peft's per-row adapter_names
    assert learner.generate(rows) == routed
    picks = route.tasks[:, 0].tolist()
    by_expert = {}
    for j in set(picks):  # the same rows, each expert on its own
        ctx.pet.activate(learner.model, expert_name(j))
        mine = [i for i, p in zip(rows, picks) if p == j]
        by_expert.update(zip(mine, ctx.generate(learner.model, mine)))
    assert routed == [by_expert[i] for i in rows]
    mixed = [expert_name(k % 2) for k in range(len(rows))]  # both experts in one batch, row by row
    alone = {}
    for j in range(2):
        ctx.pet.activate(learner.model, expert_name(j))
        alone[j] = ctx.generate(learner.model, rows)
    assert ctx.generate(learner.model, rows, adapter_names=mixed) == [alone[k % 2][k] for k in range(len(rows))]
    assert alone[0] != alone[1]  # the experts differ, so the routing is visible
    # the reference text is served the same way: pooled over the experts the selector picks
    chunks = reference_chunks(learner, 32)[:6]
    pooled = learner.reference_perplexity(chunks)
    single = []
    for j in range(2):
        ctx.pet.activate(learner.model, expert_name(j))
        single.append(perplexity(learner.model, ctx.lm_head, chunks, ctx.compute))
    assert min(single) - 1e-6 <= pooled <= max(single) + 1e-6
    learner.close()
    out = predict(tmp_path / "run", [Row(text="Plural of cat?", label="?")])
    assert out[0]["task"] in ("plural", "upper") and 0 <= out[0]["confidence"] <= 1


@pytest.mark.slow
def test_generative_dynamic_and_lae_run_in_bf16(tiny_decoder, gen_data, tmp_path):
    """The routing pass of Dynamic ConPET and LAE's ensemble run under the run's autocast, with
    the frozen weights stored in bf16 (a selector pass outside autocast was a dtype error)."""
    from conpet.runner import run

    for learner in ("dynamic", "lae"):
        cfg = _cfg(tiny_decoder, gen_data, tmp_path / learner, learner, precision="bf16")
        metrics = run(cfg, progress=False)
        assert metrics["precision"] == "bf16" and len(metrics["accuracy_matrix"]) == 2
