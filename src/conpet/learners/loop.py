"""THE training loop, and evaluation. Every learner trains through :func:`fit`.

A learner gives ``fit`` three things: the batches to run (lists of row indices, all epochs
already laid out, so replay schedules are just other lists), the parameter groups to optimize,
and a ``loss_fn(indices) -> loss`` (a mean over the rows). ``fit`` does the rest: autocast,
backward (fp16 with gradient scaling), clipping, the optimizer step and a progress bar with loss
and ETA.

Each batch is one **global** batch. Under ``torchrun`` / ``accelerate launch`` every process
takes its contiguous share of it (:func:`conpet.distributed.shard`); with ``train.grad_accum = k``
that share is cut again into k micro-batches. Each micro-batch loss is weighted by its share of
the global batch, so the gradients that ``DistributedDataParallel`` averages over processes are
those of the global batch's mean loss, whatever the number of processes and micro-batches. A loss
that needs the whole global batch beside its micro-batch (CRL's memory bank) reads :func:`step_batch`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from conpet import distributed as dist
from conpet.config import TrainConfig
from conpet.device import Compute, as_compute, shrink_on_oom


@dataclass
class Best:
    """The best state a fit has seen (``train.select_on_dev``): its dev score, the step after
    which it was taken (0 = before training) and a copy of the fit's trainable tensors."""

    score: float
    step: int
    tensors: list[torch.Tensor]


@dataclass
class FitStats:
    steps: int = 0
    seconds: float = 0.0
    samples: int = 0
    losses: list[float] = field(default_factory=list)
    best: Best | None = None
    """With dev selection: the state the fit kept (restored at its end)."""

    @property
    def final_loss(self) -> float:
        tail = self.losses[-20:]
        return sum(tail) / len(tail) if tail else float("nan")

    def __add__(self, other: "FitStats") -> "FitStats":
        """Two fits of one task as one (steps, seconds, samples summed; losses in order)."""
        return FitStats(self.steps + other.steps, self.seconds + other.seconds, self.samples + other.samples,
                        self.losses + other.losses, other.best or self.best)


def pet_training(pet, model, name: str, lr: float, loss_fn: Callable[[list[int]], torch.Tensor],
                 total_steps: int, task: int) -> tuple[list[dict], Callable[[list[int]], torch.Tensor],
                                                       list[Callable[[int], None]]]:
    """What training module ``name`` of ``pet`` for task ``task`` adds to a fit: its optimizer
    groups, the loss with the method's regulariser (if any) and its per-step hook (if any)."""
    pet.begin_fit(model, name, task)
    groups = pet.param_groups(model, name, lr)  # first: it turns training on for the hook's tensors
    hook = pet.step_hook(model, name, total_steps)

    def loss_with_regulariser(indices: list[int]) -> torch.Tensor:
        loss = loss_fn(indices)
        extra = pet.extra_loss(model, name)
        return loss if extra is None else loss + extra

    return groups, loss_with_regulariser, [hook] if hook else []


class _Trainable(torch.nn.Module):
    """The fit's trainable tensors as one module whose forward is the loss, so that
    ``DistributedDataParallel`` can average their gradients over processes."""

    def __init__(self, params: list[torch.nn.Parameter], loss_fn: Callable[[list[int]], torch.Tensor]) -> None:
        super().__init__()
        self.params = torch.nn.ParameterList(params)  # the same tensors, not copies
        self.loss_fn = loss_fn

    def forward(self, indices: list[int]) -> torch.Tensor:
        return self.loss_fn(indices)


_STEP_BATCH: list[int] | None = None


def step_batch() -> list[int] | None:
    """The global batch of the optimizer step :func:`fit` is running (every process's rows, in
    order), or None outside a step. For a loss that must see the whole batch beside its
    micro-batch or share (CRL samples its bank once per step for the whole batch's labels)."""
    return _STEP_BATCH


def micro_batches(indices: list[int], grad_accum: int, rank: int = 0, world: int = 1) -> list[tuple[list[int], float]]:
    """This process's micro-batches of a global batch and the weight of each one's mean loss
    (``len(micro) * world / len(indices)``: summed over micro-batches and averaged over processes,
    the weighted gradients are the gradient of the global batch's mean loss). Empty shares are left out."""
    share = dist.shard(indices, world, rank)
    parts = [dist.shard(share, grad_accum, k) for k in range(grad_accum)]
    return [(p, len(p) * world / len(indices)) for p in parts if p]


def fit(
    loss_fn: Callable[[list[int]], torch.Tensor],
    param_groups: list[dict],
    batches: list[list[int]],
    train: TrainConfig,
    compute: Compute | str,
    desc: str = "train",
    progress: bool = True,
    after_step: Iterable[Callable[[int], None]] = (),
    checkpointer=None,
    dev_score: Callable[[], float] | None = None,
    epochs: int = 1,
) -> FitStats:
    """Run one optimizer step per (global) batch; return timing and loss statistics.

    ``compute`` (:class:`conpet.device.Compute`, or a precision string meaning the CPU) gives the
    autocast and, for fp16, the gradient scaler.

    With a ``checkpointer`` (:class:`conpet.checkpoint.Checkpointer`) the learner, optimizer and
    random state are saved every ``train.checkpoint_seconds``, and a resumed run skips the steps
    (or the whole fit) that an in-task checkpoint already holds.

    With ``dev_score`` (a score on dev rows, never test rows) the fit is scored before its first
    step and at the end of each of its ``epochs`` (equal shares of ``batches``); the best state
    (ties go to the earlier one, so the untrained start can win, as in ConPET's code) is restored
    at the end.
    """
    compute = as_compute(compute)
    params = [p for g in param_groups for p in g["params"]]
    optimizer = torch.optim.AdamW(param_groups, weight_decay=train.weight_decay)
    scaler = compute.grad_scaler()
    rank, world = dist.rank(), dist.world_size()
    accum = train.grad_accum
    step_fn: Callable[[list[int]], torch.Tensor] = loss_fn
    ddp = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(_Trainable([p for p in params if p.requires_grad], loss_fn),
                                      device_ids=[compute.device] if compute.device.type == "cuda" else None,
                                      broadcast_buffers=False, find_unused_parameters=True)
        step_fn = ddp
    stats = FitStats()
    start = time.perf_counter()
    first = checkpointer.begin_fit(optimizer, stats, scaler) if checkpointer is not None else 0
    ends = {round(len(batches) * k / max(1, epochs)) for k in range(1, max(1, epochs) + 1)}

    def consider(step: int) -> None:
        score = dev_score()
        if stats.best is None or score > stats.best.score:
            stats.best = Best(score, step, [p.detach().clone() for p in params])

    if dev_score is not None and first == 0:
        consider(0)
    bar = tqdm(batches, desc=desc, unit="step", leave=False, disable=not (progress and dist.is_main()),
               dynamic_ncols=True)
    global _STEP_BATCH
    for step, indices in enumerate(bar):
        if first < 0 or step < first:  # done before the checkpoint this run resumes from
            stats.steps += 1
            stats.samples += len(indices)
            continue
        _STEP_BATCH = indices
        optimizer.zero_grad(set_to_none=True)
        parts = micro_batches(indices, accum, rank, world)
        total = 0.0
        for k, (micro, weight) in enumerate(parts):
            sync = ddp.no_sync() if ddp is not None and k < len(parts) - 1 else contextlib.nullcontext()
            with sync:
                with compute.autocast():
                    loss = step_fn(micro) * weight
                (scaler.scale(loss) if scaler is not None else loss).backward()
            total += loss.item()
        if ddp is not None and not parts:  # a rank with no row this step still joins the all-reduce
            with compute.autocast(), dist.placeholder_pass():
                (step_fn(indices[:1]) * 0.0).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        _STEP_BATCH = None
        for hook in after_step:
            hook(step)
        stats.losses.append(dist.mean_over_ranks(total, compute.device))
        stats.steps += 1
        stats.samples += len(indices)
        if dev_score is not None and step + 1 in ends:
            consider(step + 1)
        if step % 5 == 0:
            bar.set_postfix(loss=f"{stats.final_loss:.3f}")
        if checkpointer is not None:
            checkpointer.after_step(step, optimizer, stats, scaler)
    bar.close()
    if checkpointer is not None:
        checkpointer.end_fit(stats)
    if stats.best is not None and first >= 0:
        with torch.no_grad():
            for p, kept in zip(params, stats.best.tensors):
                p.copy_(kept)
    stats.seconds = time.perf_counter() - start
    return stats


@torch.no_grad()
def predict(logits_fn: Callable[[list[int]], torch.Tensor], batches: list[list[int]], compute: Compute | str,
            allowed: tuple[int, int] | None = None) -> dict[int, int]:
    """Argmax prediction (a global class index) for every row index in ``batches``.

    ``allowed`` restricts the argmax to a column range (task-incremental evaluation). A batch
    that runs the device out of memory is predicted in halves. Under several processes each
    takes every N-th batch and the predictions are gathered, so every process returns all of them.
    """
    compute = as_compute(compute)

    def argmax(indices: list[int]) -> list[int]:
        with compute.autocast():
            logits = logits_fn(indices).float()
        if allowed is not None:
            masked = torch.full_like(logits, float("-inf"))
            masked[:, allowed[0]:allowed[1]] = logits[:, allowed[0]:allowed[1]]
            logits = masked
        return logits.argmax(dim=-1).tolist()

    out: dict[int, int] = {}
    for indices, keep in dist.deal(batches):
        preds = shrink_on_oom(argmax, indices, join=lambda parts: [p for part in parts for p in part],
                              on_shrink=compute.empty_cache)
        if keep:
            out.update(zip(indices, preds))
    return dist.gather_dicts(out)
