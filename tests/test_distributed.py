"""Devices, precision, memory savers and data parallelism (torchrun over gloo, 2 CPU processes).

The 1-vs-2-process test is the contract of :mod:`conpet.distributed`: the same stream, seed and
global batch in fp32 give the same losses and accuracies whether the batch is computed by one
process, by two, or in micro-batches (``train.grad_accum``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import warnings

import pytest
import torch

from conpet.cli import main
from conpet.device import Compute, resolve_device, resolve_precision, shrink_on_oom
from conpet.distributed import shard
from conpet.errors import ConfigError
from conpet.learners.loop import micro_batches, predict
from test_learner_matrix import rows

SRC = Path(__file__).resolve().parents[1] / "src" / "conpet"


# -- pure pieces -----------------------------------------------------------------------------------
def test_shares_cover_the_batch_once_and_weights_give_the_global_mean():
    batch = list(range(11))
    for world in (1, 2, 3):
        for accum in (1, 2, 4):
            parts = [micro_batches(batch, accum, r, world) for r in range(world)]
            rows = [i for rank in parts for micro, _ in rank for i in micro]
            assert rows == batch
            # sum over processes of sum over micro-batches of weight * mean = global mean
            weights = {i: w / len(m) for rank in parts for m, w in rank for i in m}
            assert all(abs(w / world - 1 / len(batch)) < 1e-12 for w in weights.values())
    assert shard([1, 2, 3], 2, 0) == [1, 2] and shard([1, 2, 3], 2, 1) == [3]
    assert shard([1], 2, 1) == []


def test_device_auto_prefers_cuda_then_mps_then_cpu():
    assert resolve_device("auto", ["cuda", "mps", "cpu"], cuda_count=2) == torch.device("cuda", 0)
    assert resolve_device("auto", ["mps", "cpu"]) == torch.device("mps")
    assert resolve_device("auto", ["cpu"]) == torch.device("cpu")
    assert resolve_device("cuda:1", ["cuda", "cpu"], cuda_count=2) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_device("cuda:2", ["cuda", "cpu"], cuda_count=2)
    with pytest.raises(ConfigError, match="not available here"):
        resolve_device("cuda", ["cpu"])
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu", ["cpu"])


def test_device_under_a_launcher_is_the_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto", ["cuda", "cpu"], cuda_count=4) == torch.device("cuda", 3)


def test_precision_auto_per_device(monkeypatch):
    import conpet.device as D

    monkeypatch.setattr(D, "cpu_supports_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(D, "cpu_supports_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(D, "gpu_supports_bf16", lambda device: False)
    assert resolve_precision("auto", "cuda") == "fp16"  # e.g. a V100 or T4
    monkeypatch.setattr(D, "gpu_supports_bf16", lambda device: True)
    assert resolve_precision("auto", "cuda") == "bf16"
    with pytest.raises(ConfigError, match="fp16 autocast needs a GPU"):
        resolve_precision("fp16", "cpu")
    with warnings.catch_warnings():  # on a machine without CUDA torch says it disables the scaler
        warnings.simplefilter("ignore", UserWarning)
        assert Compute(torch.device("cuda"), "fp16").grad_scaler() is not None
    assert Compute(torch.device("cpu"), "bf16").grad_scaler() is None


@pytest.mark.parametrize("capability, bf16", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_gpu_bf16_is_native_bf16_of_the_runs_own_gpu(monkeypatch, capability, bf16):
    """A V100 (7.0) or T4 (7.5) emulates bf16, which torch.cuda.is_bf16_supported() counts by
    default: such a GPU must get fp16 + GradScaler. The capability asked is the run's device's."""
    import conpet.device as D

    asked = []
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # counts emulation
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    assert D.gpu_supports_bf16(torch.device("cuda", 1)) is bf16
    assert asked == [torch.device("cuda", 1)]
    assert resolve_precision("auto", torch.device("cuda", 1)) == ("bf16" if bf16 else "fp16")


def test_no_autocast_or_device_choice_outside_the_device_module():
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "device.py":
            continue
        text = path.read_text()
        for pattern in (r"torch\.autocast\(", r"autocast\(\"cpu\"", r"\.cuda\(\)", r"torch\.cuda\.is_available\("):
            if re.search(pattern, text) and not (path.name == "checkpoint.py" and "cuda" in pattern):
                offenders.append(f"{path.name}: {pattern}")
    assert offenders == []


def test_prediction_halves_a_batch_that_runs_out_of_memory():
    calls = []

    def logits(indices):
        calls.append(len(indices))
        if len(indices) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.nn.functional.one_hot(torch.tensor(indices) % 3, 3).float()

    preds = predict(logits, [list(range(7))], "fp32")
    assert preds == {i: i % 3 for i in range(7)}
    assert max(c for c in calls if c <= 2) <= 2 and calls[0] == 7
    with pytest.raises(ValueError):
        shrink_on_oom(lambda idx: (_ for _ in ()).throw(ValueError("not memory")), [1, 2], join=list)


# -- the CLI: bad device settings fail before anything is written ----------------------------------
def test_quantize_and_unavailable_devices_are_clear_errors(tiny_encoder, typing_data, tmp_path, capsys):
    data, tasks = typing_data
    base = ["run", "--model", str(tiny_encoder), "--data", str(data), "--tasks", str(tasks), "--no-progress"]
    cases = [(["--quantize", "nf4"], "backbone.quantize: nf4 needs a CUDA GPU"),
             (["--device", "cuda"], "train.device: 'cuda' is not available here"),
             (["--precision", "fp16"], "fp16 autocast needs a GPU"),
             (["--grad-accum", "0"], "'train.grad_accum' must be >= 1")]
    for k, (flags, message) in enumerate(cases):
        out = tmp_path / f"out-{k}"
        assert main([*base, *flags, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


# -- memory savers give the same training --------------------------------------------------------
def _cfg(model, data, tasks, out, learner="emr*", **train):
    from conpet.config import from_dict

    return from_dict({"model": str(model), "learner": learner, "out": str(out),
                      "data": {"file": str(data), "tasks": str(tasks)},
                      "pet": {"options": {"lora_dropout": 0.0}},
                      "train": {"epochs": 2, "batch_size": 8, "precision": "fp32", **train}})


@pytest.fixture(scope="module")
def no_dropout_encoder(tmp_path_factory, tiny_encoder):
    """The tiny BERT without dropout: two ways of computing the same batch then agree exactly."""
    import shutil

    folder = tmp_path_factory.mktemp("models") / "tiny-bert-no-dropout"
    shutil.copytree(tiny_encoder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_grad_accum_and_gradient_checkpointing_train_the_same(no_dropout_encoder, typing_data, tmp_path):
    from conpet.runner import run

    data, tasks = typing_data
    plain = run(_cfg(no_dropout_encoder, data, tasks, tmp_path / "plain", top_layers=None), progress=False)
    accum = run(_cfg(no_dropout_encoder, data, tasks, tmp_path / "accum", top_layers=None, grad_accum=3),
                progress=False)
    ckpt = run(_cfg(no_dropout_encoder, data, tasks, tmp_path / "ckpt", top_layers=None,
                    gradient_checkpointing=True), progress=False)
    a, b, c = (m["per_seed"][0] if "per_seed" in m else m for m in (plain, accum, ckpt))
    for other in (b, c):
        assert other["accuracy_matrix"] == a["accuracy_matrix"]
        assert other["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


def test_crl_in_micro_batches_trains_as_in_one_batch(no_dropout_encoder, typing_data, tmp_path):
    """CRL samples its bank once per optimizer step for the whole batch's labels, and writes every row
    of the batch into it after the step, however ``train.grad_accum`` cuts the batch (each micro-batch
    once sampled and wrote its own rows: later micro-batches then met earlier ones' rows in the bank)."""
    from conpet.runner import run

    data, tasks = typing_data
    runs = [run(_cfg(no_dropout_encoder, data, tasks, tmp_path / f"accum-{k}", learner="crl", top_layers=None,
                     grad_accum=k), progress=False) for k in (1, 3)]
    a, b = (m["per_seed"][0] if "per_seed" in m else m for m in runs)
    assert b["accuracy_matrix"] == a["accuracy_matrix"]
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


# -- two processes over gloo --------------------------------------------------------------------------
def _torchrun(args: list[str], nproc: int = 2, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "CONPET_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "conpet", *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True, **kwargs)


def _run_args(model, data, tasks, out, epochs=2):
    return ["run", "--model", str(model), "--data", str(data), "--tasks", str(tasks), "--learner", "emr*",
            "--epochs", str(epochs), "--batch-size", "8", "--precision", "fp32", "--threads", "1", "--no-progress",
            "--set", "pet.options.lora_dropout=0", "--set", "train.checkpoint_seconds=0", "--out", str(out)]


def _seed_metrics(out: Path) -> dict:
    return json.loads((out / "seed-0" / "metrics.json").read_text())


def _finish(proc: subprocess.Popen, timeout: float = 240) -> int:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-8000:]  # the launcher's summary is ~2000; the ranks' own errors come before
    return proc.returncode


@pytest.mark.parametrize("learner", ["emr*", pytest.param("crl*", marks=pytest.mark.slow)])
def test_two_processes_give_the_metrics_of_one(no_dropout_encoder, typing_data, tmp_path, learner):
    """crl*: its memory bank is sampled for the whole batch's labels and written with every
    process's rows (it once saw only each process's share: losses 2.8% apart); its two processes
    also cut their shares into 2 micro-batches (the bank is still sampled and written once per step)."""
    data, tasks = typing_data
    one, two = tmp_path / "one", tmp_path / "two"
    args = [a if a != "emr*" else learner for a in _run_args(no_dropout_encoder, data, tasks, one)]
    assert main(args) == 0
    accum = ["--grad-accum", "2"] if learner == "crl*" else []
    _finish(_torchrun([*args[:-1], str(two), *accum]))
    a, b = _seed_metrics(one), _seed_metrics(two)
    assert b["processes"] == 2
    assert b["train_samples"] == a["train_samples"]  # the same global batches
    for row_a, row_b in zip(a["accuracy_matrix"], b["accuracy_matrix"]):
        for x, y in zip(row_a, row_b):
            assert (x is None and y is None) or abs(x - y) <= 0.01
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    # rank 0 alone wrote the run directory, completely
    assert (two / "manifest.json").is_file() and main(["verify", str(two)]) == 0


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rank_pid(launcher: int, rank: int) -> int | None:
    for child in _children(launcher):
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return child
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank's process through /proc")
@pytest.mark.parametrize("sharding", [pytest.param([], id="ddp", marks=pytest.mark.slow),
                                      pytest.param(["--set", "backbone.fsdp=true"], id="fsdp", marks=pytest.mark.slow)])
def test_kill_one_rank_then_resume_gives_the_uninterrupted_run(no_dropout_encoder, typing_data, tmp_path, sharding):
    data, tasks = typing_data
    full, killed = tmp_path / "full", tmp_path / "killed"
    _finish(_torchrun(_run_args(no_dropout_encoder, data, tasks, full, epochs=6) + sharding))
    proc = _torchrun(_run_args(no_dropout_encoder, data, tasks, killed, epochs=6) + sharding)
    deadline = time.monotonic() + 180
    # after task 1 is recorded and while task 2 checkpoints in-task
    in_task = killed / "seed-0" / "checkpoint" / "in-task"
    while not ((killed / "seed-0" / "state.json").is_file() and in_task.is_dir()) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None and proc.poll() is None, "the run ended before a rank could be killed"
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not (killed / "manifest.json").exists(), "the run was meant to be interrupted"
    _finish(_torchrun(["run", "--resume", str(killed), "--no-progress"]))
    a, b = _seed_metrics(full), _seed_metrics(killed)
    assert b["resumed"] is True
    assert b["accuracy_matrix"] == a["accuracy_matrix"]
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
    assert main(["verify", str(killed)]) == 0


# -- FSDP: the frozen backbone sharded over 2 processes ----------------------------------------------
@pytest.mark.parametrize("case", rows("processes", lambda case: case.cls.shards_backbone and not case.cls.needs_lm_head))
def test_fsdp_shards_the_backbone_and_gives_the_run_of_one_process(no_dropout_encoder, typing_data, tmp_path, case):
    """Every row of the learner matrix that declares ``shards_backbone`` (ZSCL, which needs a causal
    LM: ``test_fsdp_decodes_a_generative_stream_in_step``)."""
    learner = case.name  # default options: dynamic's matrix top_k=2 needs top_k=1 on a sharded backbone
    data, tasks = typing_data
    one, two = tmp_path / "one", tmp_path / "two"
    args = [a if a != "emr*" else learner for a in _run_args(no_dropout_encoder, data, tasks, one)]
    assert main(args) == 0
    _finish(_torchrun([*args[:-1], str(two), "--set", "backbone.fsdp=true"]))
    a, b = _seed_metrics(one), _seed_metrics(two)
    assert b["processes"] == 2 and b["train_samples"] == a["train_samples"]
    assert b["backbone_bytes_per_process"] <= 0.55 * b["backbone_bytes"]  # each process holds about half
    assert b["accuracy_matrix"] == a["accuracy_matrix"]
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    from safetensors.torch import load_file

    saved = sorted(two.glob("seed-0/adapters/*/adapter_model.safetensors"))
    assert len(saved) >= 2
    if case.name == "inflora":  # its A is the top singular vectors of an input covariance with near-equal
        return  # eigenvalues on this tiny model: two processes' summation order rotates them (docs/reliability.md)
    for f in saved:  # plain LoRA tensors; the update B A each one process trains (merge's refit is an SVD)
        mine, ref = load_file(str(f)), load_file(str(one / f.relative_to(two)))
        for key in (k for k in ref if "lora_A" in k):
            b = key.replace("lora_A", "lora_B")
            theirs = ref[b] @ ref[key]
            # CRL's contrastive fit amplifies rounding: a learning rate 1e-7 (relative) apart moves its
            # task-2 update by ~1.3% of its largest entry, as two processes do (emr*: 1e-6%; docs/gpus.md)
            atol = 0.02 * float(theirs.abs().max()) if case.name.startswith("crl") else 1e-5
            gap = float((mine[b] @ mine[key] - theirs).abs().max())
            assert gap <= atol, (key, gap, atol)
    assert main(["verify", str(two)]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("learner", ["sequential", "dynamic", "zscl"])
def test_fsdp_decodes_a_generative_stream_in_step(lively_decoder, tmp_path, learner):
    """Greedy decoding stops together on every rank (each step is a collective), and answers as
    one process does. ``lr 1e-12`` keeps both runs on the same weights: the lively decoder turns the
    last-bit differences of 2-process training into other tokens."""
    from test_generation import write_generative_data

    data = write_generative_data(tmp_path / "gen")
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["run", "--model", str(lively_decoder), "--data", str(data), "--learner", learner, "--epochs", "1",
            "--lr", "1e-12",
            "--batch-size", "8", "--precision", "fp32", "--threads", "1", "--no-progress",
            "--set", "pet.options.lora_dropout=0", "--set", "train.eval_batch_size=3", "--out"]
    assert main([*args, str(one)]) == 0
    _finish(_torchrun([*args, str(two), "--set", "backbone.fsdp=true"]))
    a, b = _seed_metrics(one), _seed_metrics(two)
    assert b["accuracy_matrix"] == a["accuracy_matrix"] and b["score_chrf"] == a["score_chrf"]
    assert any(v for row in a["score_chrf"] for v in row if v is not None)  # answers that can differ
    assert b["reference_perplexity"] == pytest.approx(a["reference_perplexity"], rel=1e-4)


def test_deal_pairs_every_forward_pass_when_the_backbone_is_sharded(monkeypatch):
    from conpet import distributed

    batches = [[i] for i in range(5)]
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for sharded, counts in ((False, [3, 2]), (True, [3, 3])):
        monkeypatch.setattr(distributed, "_SHARDED", sharded)
        dealt = []
        for r in range(2):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            dealt.append(distributed.deal(batches))
        assert [len(d) for d in dealt] == counts
        kept = sorted(i for d in dealt for b, keep in d if keep for i in b)
        assert kept == list(range(5))  # every row once; the padding repeat is dropped


@pytest.mark.parametrize("flags, message", [
    (["--pet", "ia3"], "pet.method 'ia3' has not been tried on a sharded backbone"),
    (["--set", "train.top_layers=1"], "train.top_layers 1 caches the lower layers per process"),
    (["--learner", "model-surgery"], "learner 'model-surgery' is not tried on a sharded backbone; these are: crl, crl*, dynamic,"),
    (["--learner", "dynamic[top_k=2]"], "backbone.fsdp: top_k 2 fills old experts' logits"),
])
def test_fsdp_refuses_what_it_has_not_been_tried_with(tiny_encoder, typing_data, tmp_path, capsys, flags, message):
    data, tasks = typing_data
    assert main(["run", "--model", str(tiny_encoder), "--data", str(data), "--tasks", str(tasks), "--no-progress",
                 "--set", "backbone.fsdp=true", *flags, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_close_frees_the_process_group_a_sharded_backbones_mesh_holds(tmp_path, monkeypatch):
    """gloo joins its worker threads only when the group is freed; a device mesh (kept alive after
    the run by torch's DTensor caches) holds the group. Left to the interpreter's exit, a worker
    could release a tensor after Python began finalizing: a rank died with SIGABRT, ~1 FSDP run in 15."""
    import weakref

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from conpet import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        monkeypatch.setattr(distributed, "_MESHES", [mesh])
        group = weakref.ref(dist.group.WORLD)
        distributed.close()
        assert not dist.is_initialized() and group() is None
        assert mesh is not None  # still referenced, as the caches reference it
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
