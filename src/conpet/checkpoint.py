"""Checkpoints for ``conpet run --resume``: the whole training state in safetensors + JSON.

A checkpoint is a folder with ``state.safetensors`` (every tensor: PET modules, heads, method
state, optimizer moments, torch RNG states) and ``state.json`` (everything else: labels, memories,
numpy/python RNG states, where in the stream it was taken). Nothing is pickled, so loading a
checkpoint never runs code. Folders are written atomically (:func:`conpet.runs.atomic_directory`).

Two kinds, per seed (``DIR/seed-<s>/checkpoint/``):

- ``task-<t>/``: the state after task ``t`` finished (written before ``state.json`` records the
  task as finished, so the two always agree on resume);
- ``in-task/``: the state in the middle of task ``t``, taken every ``train.checkpoint_seconds``
  inside :func:`conpet.learners.loop.fit` (which fit of the task, which step, the optimizer).

Resuming inside a task re-runs the task's preamble from the ``task-<t-1>`` state with the same
random state (so the same batches are laid out), skips the fits and steps already done, and at
the checkpointed fit loads the learner, optimizer and random state saved there. The result is
the same as an uninterrupted run (see docs/reliability.md for what is bitwise identical).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from conpet import distributed
from conpet.learners.loop import Best
from conpet.runs import atomic_directory

STATE_FILE = "state.safetensors"
META_FILE = "state.json"


# -- random state ----------------------------------------------------------------------------------
def _device_rng() -> torch.Tensor | None:
    return torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def capture_rng(ctx) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random state a run uses: the seed's numpy generator and torch generator, and the
    global torch, numpy and python states. The global torch states (CPU, and CUDA where used)
    are gathered from every process (dropout draws differ per process); call it on every rank."""
    np_global = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    per_rank = distributed.gather_objects((torch.get_rng_state(), _device_rng()))
    tensors = {"rng/torch_gen": ctx.torch_gen.get_state(), "rng/torch_global": per_rank[0][0]}
    for k, (cpu, device) in enumerate(per_rank):
        tensors[f"rng/rank{k}/torch_global"] = cpu
        if device is not None:
            tensors[f"rng/rank{k}/cuda"] = device
    meta = {
        "numpy_ctx": ctx.rng.bit_generator.state,
        "numpy_global": [np_global[0], np_global[1].tolist(), *np_global[2:]],
        "python": [py_version, list(py_state), py_gauss],
    }
    return tensors, meta


def restore_rng(ctx, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    ctx.torch_gen.set_state(tensors["rng/torch_gen"].cpu())
    own = f"rng/rank{distributed.rank()}/"
    torch.set_rng_state(tensors.get(own + "torch_global", tensors["rng/torch_global"]).cpu())
    if own + "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[own + "cuda"].cpu())
    ctx.rng.bit_generator.state = meta["numpy_ctx"]
    name, keys, *rest = meta["numpy_global"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


# -- optimizer state -------------------------------------------------------------------------------
def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"opt/{index}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# -- folders ---------------------------------------------------------------------------------------
def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write one checkpoint folder atomically (replacing an older one of the same name); under
    several processes only rank 0 writes."""
    distributed.on_main(_write_checkpoint, folder, tensors, meta)


def _write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    with atomic_directory(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp / STATE_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta))


def read_checkpoint(folder: Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint's tensors, on ``device`` (the run's: a run checkpointed on one device resumes
    on another, as checkpoints are written from CPU copies), and its metadata."""
    return load_file(str(folder / STATE_FILE), device=str(device)), json.loads((folder / META_FILE).read_text())


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


class Checkpointer:
    """Writes and reads one seed's checkpoints; :func:`~conpet.learners.loop.fit` calls
    :meth:`begin_fit`, :meth:`after_step` and :meth:`end_fit` (in-task checkpoints and their resume)."""

    def __init__(self, seed_folder: Path, every_seconds: float) -> None:
        self.root = seed_folder / "checkpoint"
        self.every_seconds = every_seconds
        self.learner = None
        self.ctx = None
        self.task = -1
        self.fit_index = 0
        self.resume_at: tuple[int, int, int] | None = None
        """(task, fit, step) of an in-task checkpoint to resume from, once."""
        self.fit_losses: list[list[float]] = []
        """The step losses of the current task's finished fits (an in-task checkpoint keeps them)."""
        self.resume_losses: list[list[float]] = []
        """Those of the checkpoint resumed from: a fit finished before it reports them again."""
        self.last_save = time.monotonic()

    def bind(self, learner, ctx) -> None:
        self.learner, self.ctx = learner, ctx

    # -- task boundaries --
    def task_folder(self, t: int) -> Path:
        return self.root / f"task-{t + 1:03d}"

    def start_task(self, t: int) -> None:
        self.task, self.fit_index, self.fit_losses = t, 0, []
        self.last_save = time.monotonic()

    def save_task_end(self, t: int) -> None:
        tensors, meta = self.learner.state()
        rng_t, rng_meta = capture_rng(self.ctx)
        write_checkpoint(self.task_folder(t), {**prefixed("learner/", tensors), **rng_t},
                         {"kind": "task-end", "task": t, "learner": meta, "rng": rng_meta})

    def finish_task(self, t: int) -> None:
        """After ``state.json`` records task ``t``: drop older and in-task checkpoints."""
        distributed.on_main(self._drop_older, t)

    def _drop_older(self, t: int) -> None:
        for old in self.root.glob("task-*"):
            if old.name != self.task_folder(t).name:
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.root / "in-task", ignore_errors=True)

    def remove_all(self) -> None:
        distributed.on_main(shutil.rmtree, self.root, True)

    def load_task_end(self, t: int) -> None:
        tensors, meta = read_checkpoint(self.task_folder(t), self.ctx.device)
        self.learner.load_state(unprefixed("learner/", tensors), meta["learner"])
        restore_rng(self.ctx, tensors, meta["rng"])

    def find_in_task(self, t: int) -> None:
        """Arm resume from an in-task checkpoint of task ``t``, when one exists."""
        folder = self.root / "in-task"
        if (folder / META_FILE).is_file():
            meta = json.loads((folder / META_FILE).read_text())
            if meta["task"] == t:
                self.resume_at = (t, meta["fit"], meta["step"])
                self.resume_losses = meta.get("fit_losses", [])

    # -- inside fit --
    def begin_fit(self, optimizer: torch.optim.Optimizer, stats, scaler=None) -> int:
        """Called by ``fit`` before its first step; returns the first step to run. An fp16 fit's
        gradient scaler gets its saved scale and growth tracker back, so resume stays exact."""
        k = self.fit_index
        self.fit_index += 1
        if self.resume_at is None or self.resume_at[0] != self.task:
            return 0
        _, fit, step = self.resume_at
        if k < fit:  # this fit finished before the checkpoint: its result is in the saved state
            stats.losses.extend(self.resume_losses[k] if k < len(self.resume_losses) else [])
            return -1
        self.resume_at = None
        tensors, meta = read_checkpoint(self.root / "in-task", self.ctx.device)
        self.learner.load_state(unprefixed("learner/", tensors), meta["learner"])
        load_optimizer_state(optimizer, tensors, meta["optimizer"])
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        restore_rng(self.ctx, tensors, meta["rng"])
        stats.losses.extend(meta["losses"])
        if meta.get("best") is not None:
            stats.best = Best(meta["best"]["score"], meta["best"]["step"],
                              [tensors[f"best/{i}"].clone() for i in range(meta["best"]["n"])])
        return step + 1

    def end_fit(self, stats) -> None:
        """Called by ``fit`` after its last step: keep its losses for this task's later checkpoints."""
        self.fit_losses.append(list(stats.losses))

    def after_step(self, step: int, optimizer: torch.optim.Optimizer, stats, scaler=None) -> None:
        # rank 0's clock decides, so that every process takes part in the same checkpoints
        if not distributed.agree(time.monotonic() - self.last_save >= self.every_seconds, self.ctx.device):
            return
        tensors, meta = self.learner.state()
        opt_t, opt_meta = optimizer_state(optimizer)
        rng_t, rng_meta = capture_rng(self.ctx)
        best = stats.best
        best_t = {f"best/{i}": t for i, t in enumerate(best.tensors)} if best is not None else {}
        write_checkpoint(self.root / "in-task", {**prefixed("learner/", tensors), **opt_t, **rng_t, **best_t}, {
            "kind": "in-task", "task": self.task, "fit": self.fit_index - 1, "step": step,
            "learner": meta, "optimizer": opt_meta, "rng": rng_meta, "losses": stats.losses,
            "fit_losses": self.fit_losses,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "best": None if best is None else {"score": best.score, "step": best.step, "n": len(best.tensors)},
        })
        self.last_save = time.monotonic()
