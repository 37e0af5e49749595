"""Nothing lost, nothing trusted blindly: kill -9 and resume, manifest and verify, adapters bound
to their base model, no pickle.

Kill -9 and resume for every learner is in ``tests/test_learner_matrix.py``.
"""

from __future__ import annotations

import json

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conpet.cli import main
from conpet.errors import ModelError
from conpet.runs import recover_interrupted

def _args(model: Path, data: tuple[Path, Path], out: Path) -> list[str]:
    return ["run", "--model", str(model), "--data", str(data[0]), "--tasks", str(data[1]), "--epochs", "3",
            "--batch-size", "4", "--no-progress", "--out", str(out)]


@pytest.fixture(scope="module")
def baselines(tmp_path_factory, tiny_encoder):
    from conftest import write_typing_data

    root = tmp_path_factory.mktemp("reliability")
    data = write_typing_data(root / "data")
    out = root / "sequential"
    assert main(_args(tiny_encoder, data, out)) == 0
    return root, data, {"sequential": out}


def test_resume_refuses_changed_flags_and_a_non_run(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path), "--no-progress"]) == 2
    assert "not a conpet run directory" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path), "--epochs", "2"]) == 2
    assert "--resume uses the configuration saved in the run directory; drop --epochs" in capsys.readouterr().err


def test_a_finished_run_is_not_overwritten(baselines, tiny_encoder, capsys):
    root, data, runs = baselines
    assert main(_args(tiny_encoder, data, runs["sequential"])) == 2
    assert "holds a run already" in capsys.readouterr().err


def test_verify_detects_changed_and_missing_files(baselines, tmp_path, capsys):
    import shutil

    _, _, runs = baselines
    run = tmp_path / "copy"
    shutil.copytree(runs["sequential"], run)
    assert main(["verify", str(run)]) == 0
    assert "OK" in capsys.readouterr().out
    adapter = next(run.glob("seed-0/adapters/task-01/*.safetensors"))
    adapter.write_bytes(adapter.read_bytes()[:-1] + b"\0")
    (run / "seed-0" / "metrics.json").unlink()
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "changed: seed-0/adapters/task-01/" in out and "missing: seed-0/metrics.json" in out


def test_verify_checks_an_unfinished_run_from_its_state(baselines, tmp_path, capsys):
    import shutil

    _, _, runs = baselines
    run = tmp_path / "unfinished"
    shutil.copytree(runs["sequential"], run)
    (run / "manifest.json").unlink()
    assert main(["verify", str(run)]) == 0
    assert "seed-0: unfinished run, 2 task(s) done" in capsys.readouterr().out


def test_interrupted_folder_replacement_is_recovered(tmp_path):
    """A kill between the two renames of atomic_directory leaves .NAME.old and no NAME."""
    (tmp_path / "adapters" / ".task-01.old").mkdir(parents=True)
    (tmp_path / "adapters" / ".task-01.old" / "w.safetensors").write_bytes(b"x")
    (tmp_path / "adapters" / ".task-02.abc.tmp").mkdir()
    (tmp_path / ".state.json.x.tmp").write_text("{")
    actions = recover_interrupted(tmp_path)
    assert (tmp_path / "adapters" / "task-01" / "w.safetensors").read_bytes() == b"x"
    assert not list(tmp_path.rglob("*.tmp")) and len(actions) == 3


def test_adapter_is_bound_to_its_base_model(baselines, tmp_path, capsys):
    import shutil

    import yaml

    from conftest import _tiny

    _, _, runs = baselines
    run = tmp_path / "moved"
    shutil.copytree(runs["sequential"], run)
    other = tmp_path / "other-base"
    _tiny(other, "encoder")
    torch.manual_seed(1)
    weights = load_file(str(other / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v + 0.01 for k, v in weights.items()}, str(other / "model.safetensors"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"] = str(other)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["predict", str(run), "the dog barked", "--entity", "dog"]) == 2
    err = capsys.readouterr().err
    assert "was trained on base model" in err and "refusing to load it onto a different base" in err
    assert str(other) in err


def test_pickled_files_are_never_loaded(tmp_path):
    from conpet.runs import check_safe_folder

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelError, match="refusing to load pickled file"):
        check_safe_folder(folder)


def test_model_folder_without_safetensors_is_refused(tmp_path, tiny_encoder):
    import shutil

    from conpet.backbone import load_backbone

    folder = tmp_path / "pickled-model"
    shutil.copytree(tiny_encoder, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="never loads pickled weights"):
        load_backbone(str(folder))


def test_unwritable_or_full_output_is_refused_before_training(tmp_path, capsys, monkeypatch, typing_data, tiny_encoder):
    import shutil
    from collections import namedtuple

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = ["run", "--model", str(tiny_encoder), "--data", str(typing_data[0]), "--tasks", str(typing_data[1]),
            "--no-progress"]
    assert main(args + ["--out", str(blocker / "run")]) == 2
    assert "cannot write the run directory (Not a directory)" in capsys.readouterr().err

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5 * 2**20, 5 * 2**20))
    assert main(args + ["--out", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert "only 5 MB free on its disk" in err
    assert not list((tmp_path / "full").glob("seed-*")), "nothing trained or written"


def test_a_run_leaves_the_process_thread_count_as_it_found_it(tmp_path, monkeypatch, tiny_encoder, typing_data):
    """``train.threads`` holds during a library call only. A run with ``--threads 1`` once left a
    pytest process at 1 thread; every later in-process run then summed floats in another order than
    its resumed subprocess, and InfLoRA's SVD design turned that into different weights."""
    from conpet import runner

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    real = runner._run_seeds
    monkeypatch.setattr(runner, "_run_seeds", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    out = tmp_path / "run"
    assert main(["run", "--model", str(tiny_encoder), "--data", str(typing_data[0]), "--tasks", str(typing_data[1]),
                 "--epochs", "1", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    after = torch.get_num_threads()
    torch.set_num_threads(before)
    assert seen == [1], "train.threads holds while the run trains"
    assert after == 2


def test_fp16_resume_restores_the_gradient_scaler(tmp_path):
    """An fp16 fit resumed from an in-task checkpoint ends as the uninterrupted fit: the gradient
    scaler's backed-off scale is saved with the optimizer. Without it the resumed scaler starts at
    65536 again, overflows, and skips steps the uninterrupted fit took."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from conpet.checkpoint import Checkpointer
    from conpet.config import TrainConfig
    from conpet.device import Compute
    from conpet.learners.loop import fit

    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(0)) * 300  # fp16 gradients overflow at 2^16
    batches = [[k % 12, (k + 1) % 12] for k in range(14)]
    compute = Compute(torch.device("cpu"), "fp16")
    train = TrainConfig(lr=1e-2, grad_clip=1.0)

    class Learner:
        def __init__(self):
            self.w = torch.nn.Parameter(torch.full((8, 8), 0.1))

        def state(self):
            return {"w": self.w.detach()}, {}

        def load_state(self, tensors, meta):
            with torch.no_grad():
                self.w.copy_(tensors["w"])

    def run(steps: int, checkpointer=None) -> tuple[torch.Tensor, list[float]]:
        learner = Learner()
        if checkpointer is not None:
            ctx = SimpleNamespace(torch_gen=torch.Generator(), rng=np.random.default_rng(0), device=torch.device("cpu"))
            checkpointer.bind(learner, ctx)
            checkpointer.start_task(0)
        stats = fit(lambda rows: (x[rows] @ learner.w).pow(2).mean(), [{"params": [learner.w], "lr": train.lr}],
                    batches[:steps], train, compute, progress=False, checkpointer=checkpointer)
        return learner.w.detach().clone(), stats.losses

    whole, _ = run(len(batches))
    run(5, Checkpointer(tmp_path, every_seconds=0.0))  # "killed" after step 4: its in-task checkpoint stays
    resumed = Checkpointer(tmp_path, every_seconds=3600.0)
    resumed.find_in_task(0)
    assert resumed.resume_at == (0, 0, 4)
    again, _ = run(len(batches), resumed)
    assert torch.equal(again, whole)


def test_resuming_a_checkpoint_of_an_older_state_layout_is_one_line(tmp_path, tiny_encoder, typing_data, capsys):
    """A checkpoint written before a learner declared its state (a development snapshot) stops
    ``--resume`` with one line naming what is missing, not a traceback."""
    from test_learner_matrix import Case, _args, kill_inside_task

    out = tmp_path / "run"
    kill_inside_task(_args(tiny_encoder, typing_data, out, Case("dynamic")), out, task=1)
    meta_file = out / "seed-0" / "checkpoint" / "task-001" / "state.json"
    meta = json.loads(meta_file.read_text())
    del meta["learner"]["declared"]  # the layout Dynamic ConPET wrote before it declared its state
    meta_file.write_text(json.dumps(meta))
    assert main(["run", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    last = err.strip().split("\n")[-1]  # after the model loader's progress bar
    assert last.startswith("conpet: error: the checkpoint has no 'n_tasks' of DynamicConPET") and "Traceback" not in err
