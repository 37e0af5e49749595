"""The learner matrix: the same checks on every registered learner, as peft tests every PET method.

One row of :data:`LEARNER_CASES` per learner (a test fails when a registered learner has none).
Every row: a 2-task classification run on a tiny random-weight model (a causal LM where the
learner declares ``needs_lm_head``); the saved modules reloaded give the run's logits exactly;
kill -9 inside task 2, ``--resume``, and the metrics and every saved tensor are those of the
uninterrupted run; a bad option is one line, exit 2, before anything is written. Where declared:
a generative run whose reloaded modules answer as the run did (``generative``), and 2 gloo
processes with the backbone sharded (``shards_backbone``) give the run of one. ``make test`` runs
the checks a row names in ``fast``; the others are marked ``slow`` (``make test-slow``).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conpet.cli import main
from conpet.learners import LEARNERS, get_learner


@dataclass(frozen=True)
class Case:
    spec: str
    """What ``--learner`` gets (options that make a 2-task tiny run meaningful)."""
    fast: frozenset[str] = frozenset()
    """Checks beyond the always-fast ones that ``make test`` runs: ``kill``, ``generative``, ``processes``."""
    kill_step: int = 1
    """The kill lands at an in-task checkpoint of task 2 at this step or later ..."""
    kill_fit: int = 0
    """... of this fit of the task or a later one (a learner with several fits per task)."""

    @property
    def name(self) -> str:
        return self.spec.split("[")[0]

    @property
    def cls(self):
        return get_learner(self.name)


LEARNER_CASES = [
    Case("sequential", fast=frozenset({"generative"})),
    Case("joint"),
    Case("emr"),
    Case("emr*", fast=frozenset({"processes"})),
    Case("ewc"),
    Case("ewc*"),
    Case("l2"),
    Case("l2*"),
    Case("lwf"),
    Case("lwf*"),
    Case("ea-emr"),
    Case("ea-emr*"),
    Case("dynamic[top_k=2]", fast=frozenset({"generative", "kill"}), kill_fit=1),  # in the expert fit
    Case("merge[rank=4]"),
    Case("o-lora", fast=frozenset({"kill"})),
    Case("inflora", fast=frozenset({"kill"})),
    Case("lae"),
    Case("fpf"),
    Case("k-fpf"),
    Case("i-lora"),
    Case("crl"),
    Case("crl*"),
    Case("osf", fast=frozenset({"generative"})),
    Case("cofitune", fast=frozenset({"generative"})),
    Case("zscl[we_interval=2]", fast=frozenset({"generative"}), kill_step=3),
    Case("model-surgery", fast=frozenset({"generative", "kill"})),
]


def rows(check: str, where=lambda case: True):
    """The cases ``where`` holds, as parameters; marked slow unless the case lists ``check`` as fast."""
    return [pytest.param(case, id=case.spec, marks=() if check in case.fast or check == "always" else pytest.mark.slow)
            for case in LEARNER_CASES if where(case)]


def _args(model: Path, data: tuple[Path, Path], out: Path, case: Case) -> list[str]:
    return ["run", "--model", str(model), "--data", str(data[0]), "--tasks", str(data[1]), "--learner", case.spec,
            "--pet", case.cls.requires_pet or "lora", "--epochs", "3", "--batch-size", "4", "--no-progress",
            "--set", "train.checkpoint_seconds=0", "--out", str(out)]


def kill_inside_task(args: list[str], out: Path, task: int = 1, min_step: int = 0, min_fit: int = 0,
                     timeout: float = 300) -> None:
    """Start ``conpet ARGS`` (writing run directory ``out``) and SIGKILL it once an in-task
    checkpoint of task ``task`` (0-based) in fit ``min_fit`` at step >= ``min_step`` (or in a
    later fit) is written; fails if the run ends first. Run with ``train.checkpoint_seconds=0``
    so every step is checkpointed."""
    from conpet.checkpoint import META_FILE

    proc = subprocess.Popen([sys.executable, "-m", "conpet.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "CONPET_PROGRESS": "0"})
    meta = out / "seed-0" / "checkpoint" / "in-task" / META_FILE
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            m = json.loads(meta.read_text())
            if m["task"] == task and (m["fit"], m["step"]) >= (min_fit, min_step):
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive, f"the run ended before an in-task checkpoint of task {task + 1} at fit {min_fit} step {min_step}"
    assert not (out / "manifest.json").exists()


def _adapters(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(f.relative_to(run)): load_file(str(f)) for f in sorted(run.glob("seed-0/adapters/**/*.safetensors"))}


TIMINGS = {"train_seconds", "eval_seconds", "peak_rss_mb", "peak_rss_mb_per_process", "resumed"}


def _close(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) or (a != a and b != b)
    return a == b


def same_run(a: Path, b: Path) -> None:
    """Runs ``a`` and ``b`` have the same metrics (accuracies exactly, losses and other floats to
    1e-6, timings aside) and the same saved tensors, bit for bit."""
    ma, mb = (json.loads((d / "seed-0" / "metrics.json").read_text()) for d in (a, b))
    assert ma["accuracy_matrix"] == mb["accuracy_matrix"]
    assert ma.keys() == mb.keys()
    for key in ma.keys() - TIMINGS:
        assert _close(ma[key], mb[key]), f"metrics.json {key}: {ma[key]} != {mb[key]}"
    ta, tb = _adapters(a), _adapters(b)
    assert ta.keys() == tb.keys() and ta
    for name in ta:
        assert ta[name].keys() == tb[name].keys()
        for key in ta[name]:
            assert torch.equal(ta[name][key], tb[name][key]), f"{name}:{key} differs after resume"


@torch.no_grad()
def final_outputs(learner) -> torch.Tensor | list[str]:
    """Every test row's logits (classification) or greedy answer (generative), in row order."""
    from conpet.evaluation import generate_rows

    stream = learner.ctx.stream
    indices = [i for task in stream.tasks for i in task.test]
    if stream.generative:
        answers = generate_rows(learner, indices)
        return [answers[i] for i in indices]
    return torch.cat([learner.logits(indices[k:k + 8]).float() for k in range(0, len(indices), 8)])


def run_capturing(argv: list[str]) -> torch.Tensor | list[str]:
    """``conpet ARGV`` in this process; the final modules' :func:`final_outputs`, taken inside the run."""
    from conpet import runner

    seen = {}
    real = {"evaluate": runner.evaluate, "evaluate_generation": runner.evaluate_generation}

    def capture(which):
        def wrapped(learner, t, split="test"):
            if t == len(learner.ctx.stream.tasks) - 1 and split == "test":
                seen["outputs"] = final_outputs(learner)
            return real[which](learner, t, split)
        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        for which in real:
            mp.setattr(runner, which, capture(which))
        assert main(argv) == 0
    return seen["outputs"]


def reloaded_outputs(run_dir: Path) -> torch.Tensor | list[str]:
    """:func:`final_outputs` of the learner rebuilt from ``run_dir`` with its saved modules."""
    from conpet.build import build_learner, prepare
    from conpet.runs import finished_run

    cfg, seed, _, _ = finished_run(run_dir, None)
    learner = build_learner(cfg, prepare(cfg), seed)
    try:
        learner.restore(run_dir, seed)
        return final_outputs(learner)
    finally:
        learner.close()


def _model(case: Case, tiny_encoder: Path, tiny_decoder: Path) -> Path:
    return tiny_decoder if case.cls.needs_lm_head else tiny_encoder


@pytest.fixture(scope="module")
def baselines(tmp_path_factory, tiny_encoder, tiny_decoder):
    """Every row's uninterrupted classification run and its final outputs, taken inside the run."""
    from conftest import write_typing_data

    root = tmp_path_factory.mktemp("matrix")
    data = write_typing_data(root / "data")
    runs = {}
    for k, case in enumerate(LEARNER_CASES):
        out = root / f"base-{k}"
        runs[case.spec] = out, run_capturing(_args(_model(case, tiny_encoder, tiny_decoder), data, out, case))
    return root, data, runs


def test_every_registered_learner_has_a_row():
    """Every learner conpet ships (a package's plugin learners are that package's to test)."""
    names = [case.name for case in LEARNER_CASES]
    shipped = {name for name, cls in LEARNERS.items() if cls.__module__.startswith("conpet.")}
    assert len(names) == len(set(names)), "one row per learner"
    assert set(names) == shipped, f"rows missing: {sorted(shipped - set(names))}"


@pytest.mark.parametrize("case", rows("always"))
def test_the_saved_modules_reload_to_the_runs_logits(baselines, case):
    _, _, runs = baselines
    out, outputs = runs[case.spec]
    assert len(json.loads((out / "seed-0" / "metrics.json").read_text())["accuracy_matrix"]) == 2
    assert main(["verify", str(out)]) == 0
    reloaded = reloaded_outputs(out)
    assert reloaded.shape == outputs.shape and torch.isfinite(outputs).all()
    assert torch.equal(reloaded, outputs)


def split_rows(run_dir: Path) -> list[list]:
    """Each task's test rows of the stream a run was made on, as rows (labels kept for scoring)."""
    from conpet.data import load_stream
    from conpet.runs import load_run_config

    stream = load_stream(load_run_config(run_dir / "config.yaml").data)
    return [[stream.rows[i] for i in task.test] for task in stream.tasks]


@pytest.mark.parametrize("case", rows("always"))
def test_the_continual_model_gives_the_runs_final_accuracy_row(baselines, case):
    from conpet import ContinualModel

    _, _, runs = baselines
    out, _ = runs[case.spec]
    final = json.loads((out / "seed-0" / "metrics.json").read_text())["accuracy_matrix"][-1]
    model = ContinualModel.from_run(out)
    try:
        assert model.tasks == ["task-01", "task-02"]
        per_task = split_rows(out)
        accs = []
        for rows_of_task in per_task:
            predictions = model.predict([{"text": r.text, "entity": r.entity} for r in rows_of_task])
            accs.append(sum(p.label == r.label for p, r in zip(predictions, rows_of_task)) / len(rows_of_task))
            assert all(p.task in model.tasks and 0 <= p.score <= 1 for p in predictions)
        assert accs == final
        rows_of_2 = [{"text": r.text, "entity": r.entity} for r in per_task[1]]
        named = model.predict(rows_of_2, task="task-02")  # a named task answers with its labels only
        assert {p.label for p in named} <= {"tool", "place"} and all(p.task == "task-02" for p in named)
        routes = model.route(rows_of_2)
        assert all(set(r.scores) == set(model.tasks) and r.task in model.tasks for r in routes)
    finally:
        model.close()


@pytest.mark.parametrize("case", rows("kill"))
def test_killed_inside_task_2_resumes_to_the_same_run(baselines, tiny_encoder, tiny_decoder, case):
    root, data, runs = baselines
    out = root / f"killed-{LEARNER_CASES.index(case)}"
    kill_inside_task(_args(_model(case, tiny_encoder, tiny_decoder), data, out, case), out, task=1,
                     min_step=case.kill_step, min_fit=case.kill_fit)
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    same_run(runs[case.spec][0], out)
    assert not list(out.rglob("checkpoint")), "checkpoints are removed when the seed finishes"


@pytest.mark.slow
def test_killed_inside_the_first_of_several_fits_resumes_to_the_same_run(baselines, tiny_encoder, tiny_decoder):
    """Dynamic ConPET's selector fit comes before its expert exists: resuming inside it once
    activated the missing expert."""
    root, data, runs = baselines
    case = next(c for c in LEARNER_CASES if c.name == "dynamic")
    out = root / "killed-selector-fit"
    kill_inside_task(_args(_model(case, tiny_encoder, tiny_decoder), data, out, case), out, task=1, min_step=1)
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    same_run(runs[case.spec][0], out)


@pytest.mark.slow
def test_kill_at_random_moments_then_resume_gives_the_same_run(baselines, tiny_encoder, tiny_decoder, capsys):
    """Kill moments drawn over a whole run (startup, between tasks, inside one), once per row."""
    from conpet.runs import verify_run

    root, data, runs = baselines
    rng = random.Random(0)
    env = {**os.environ, "CONPET_PROGRESS": "0"}
    # how long a run lasts on this machine once its directory exists (the fastest learner): kill
    # moments are drawn inside that window, so they land mid-run on a fast or a slow machine
    probe = root / "probe"
    proc = subprocess.Popen([sys.executable, "-m", "conpet.cli", *_args(tiny_encoder, data, probe, LEARNER_CASES[0])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while not (probe / "config.yaml").exists() and proc.poll() is None:
        time.sleep(0.05)
    started = time.perf_counter()
    proc.wait()
    window = time.perf_counter() - started
    killed_mid_run = 0
    for trial, case in enumerate(LEARNER_CASES):
        out = root / f"trial-{trial}"
        cmd = [sys.executable, "-m", "conpet.cli", *_args(_model(case, tiny_encoder, tiny_decoder), data, out, case)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        while not (out / "config.yaml").exists() and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, window))  # a random moment of the run (startup to the last task)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed_mid_run += 1
        proc.wait()
        if not (out / "manifest.json").exists():  # killed before it finished: resume it
            code = main(["run", "--resume", str(out), "--no-progress"])
            assert code == 0, f"{case.spec}: {capsys.readouterr().err[-500:]}"
        same_run(runs[case.spec][0], out)
        assert verify_run(out)[0] == []
    assert killed_mid_run >= len(LEARNER_CASES) // 2


@pytest.mark.parametrize("case", rows("always"))
def test_a_bad_option_is_one_line_before_anything_is_written(tiny_encoder, typing_data, tmp_path, capsys, case):
    declared = case.cls.options
    key = next((k for k, o in declared.items() if o.minimum is not None), None)
    if key is None:  # no bounded option: an option it does not take
        key, value, message = ("nope", 1, f"unknown option 'nope' for learner '{case.name}'")
    else:
        minimum = declared[key].minimum
        value = minimum - 1 if declared[key].kind is int else -1.0
        message = f"learner_options.{key}: must be >= {minimum}"
    out = tmp_path / "run"
    bad = Case(f"{case.name}[{key}={value}]")
    assert main(_args(tiny_encoder, typing_data, out, bad)) == 2
    err = capsys.readouterr().err
    assert err.startswith("conpet: error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("case", rows("generative", lambda case: case.cls.generative))
def test_a_generative_run_reloads_to_the_same_answers(lively_decoder, tmp_path, case):
    """On the lively decoder, whose greedy tokens depend on what it reads and on the modules; the
    learner with its default options (``dynamic``'s top_k=2 is for classification only)."""
    from test_generation import write_generative_data

    data, out = write_generative_data(tmp_path / "data"), tmp_path / "run"
    answers = run_capturing(["run", "--model", str(lively_decoder), "--data", str(data), "--learner", case.name,
                             "--pet", case.cls.requires_pet or "lora", "--epochs", "1", "--batch-size", "8",
                             "--precision", "fp32", "--no-progress", "--out", str(out)])
    seed = json.loads((out / "seed-0" / "metrics.json").read_text())
    assert len(seed["accuracy_matrix"]) == 2 and all(0 <= v <= 1 for v in seed["accuracy_matrix"][1])
    assert seed["task_metric"] == ["exact_match", "exact_match"]
    assert seed["score_exact_match"] == seed["accuracy_matrix"]  # the primary metric, recorded again
    assert len(seed["score_chrf"][1]) == 2 and all(0 <= v <= 1 for v in seed["score_chrf"][1])
    assert len(seed["reference_perplexity"]) == 2 and seed["base_reference_perplexity"] > 1
    assert main(["verify", str(out)]) == 0
    assert len(set(answers)) > 1, "the lively decoder answers differently to different prompts"
    assert reloaded_outputs(out) == answers
    from conpet import ContinualModel

    model = ContinualModel.from_run(out)
    try:
        prompts = [r.text for rows_of_task in split_rows(out) for r in rows_of_task]
        assert [g.text for g in model.generate(prompts)] == answers
        exported_answers_are_conpets(model, out, tmp_path / "vllm", prompts)
    finally:
        model.close()


def exported_answers_are_conpets(model, run: Path, out: Path, prompts: list[str]) -> None:
    """``conpet export --to vllm``: each task's folder, loaded by plain peft on the plain causal
    LM, answers greedily as conpet does with that task named (or refused, where the learner
    declares its answers are not one module's)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conpet.errors import ConpetError
    from conpet.inputs import end_token_id
    from conpet.vllm_export import export_vllm

    if not type(model.learner).exports_lora:
        with pytest.raises(ConpetError, match="does not answer with one LoRA module"):
            export_vllm(run, out)
        return
    done = export_vllm(run, out)
    assert set(done["tasks"]) == set(model.tasks) and (out / "README.md").is_file()
    config = json.loads((out / done["tasks"][model.tasks[0]] / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["bias"] == "none" and config["task_type"] == "CAUSAL_LM"
    tok = AutoTokenizer.from_pretrained(done["base_model"])
    end = end_token_id(tok)
    base = AutoModelForCausalLM.from_pretrained(done["base_model"], dtype=torch.float32)
    for task in model.tasks:
        served = PeftModel.from_pretrained(base, out / done["tasks"][task]).eval()
        expected = [g.text for g in model.generate(prompts[:4], max_new_tokens=6, task=task)]
        got = []
        for prompt in prompts[:4]:
            if model.chat_template:  # the run's prompt format
                text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=False)
                ids = tok(text, return_tensors="pt", add_special_tokens=False)
            else:  # BERT's tokenizer would add [CLS] ... [SEP]; a prompt gets the BOS token alone, where it has one
                ids = tok(prompt + "\n", return_tensors="pt", add_special_tokens=False)
                if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None:
                    ids = {k: torch.cat([torch.full_like(v[:, :1], tok.bos_token_id if k == "input_ids" else 1), v], 1)
                           for k, v in ids.items()}
            ids = {k: v for k, v in ids.items() if k != "token_type_ids"}  # the tiny models' BERT tokenizer
            with torch.no_grad():
                new = served.generate(**ids, max_new_tokens=6, do_sample=False, eos_token_id=end, pad_token_id=end)
            new = new[0, ids["input_ids"].shape[1]:].tolist()
            got.append(tok.decode(new[:new.index(end)] if end in new else new, skip_special_tokens=True).strip())
        base = served.unload()
        assert got == expected, task
