"""Data parallelism on torch.distributed: who this process is, and the few collectives conpet uses.

conpet never launches processes itself: ``torchrun --nproc_per_node N -m conpet run ...`` or
``accelerate launch -m conpet run ...`` start N copies and set ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` joins their process group
(NCCL on CUDA devices, gloo on CPUs) from those variables. Without them everything here is a
no-op and a run is one process.

What a rank does (docs/gpus.md):

- every rank lays out the same global batches (same seed, same replay schedule);
  :func:`shard` gives each its contiguous share of a batch, and gradients are averaged by
  :class:`torch.nn.parallel.DistributedDataParallel` (see :mod:`conpet.learners.loop`);
- evaluation batches are dealt out round-robin and the predictions gathered (:func:`gather_dicts`);
- only rank 0 (:func:`is_main`) writes the run directory; the others read it on ``--resume``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist


def launched() -> bool:
    """True when a launcher (torchrun, accelerate) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the launcher's process group once (``env://``): NCCL for CUDA, gloo otherwise."""
    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on the process that writes (rank 0, or the only process)."""
    return rank() == 0


def shard(indices: Sequence[int], parts: int, index: int) -> list[int]:
    """Share ``index`` of ``parts`` contiguous, near-equal shares of ``indices`` (the first
    ``len % parts`` shares get one more row; a share may be empty)."""
    n, k = len(indices), parts
    start = index * (n // k) + min(index, n % k)
    return list(indices[start:start + n // k + (1 if index < n % k else 0)])


def gather_dicts(part: dict) -> dict:
    """The union of every rank's ``part`` (each rank gets it)."""
    if not active():
        return part
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, part)
    out: dict = {}
    for p in parts:
        out.update(p)
    return out


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not active():
        return [obj]
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (decisions that must agree, e.g. when to checkpoint)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of ``value`` over ranks (a loss logged once for the global batch)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank, as one small tensor broadcast (a per-step decision)."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def on_main(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` on rank 0 only (a write to the run directory); every rank gets its result,
    or raises its error, so that no rank is left waiting in a collective after rank 0 failed."""
    if not active():
        return fn(*args)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001 - handed to every rank, then raised
            error = e
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def close() -> None:
    """Leave the process group (end of a launched command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
