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
- evaluation batches are dealt out round-robin (:func:`deal`) and the predictions gathered
  (:func:`gather_dicts`);
- only rank 0 (:func:`is_main`) writes the run directory; the others read it on ``--resume``;
- with ``backbone.fsdp`` the frozen backbone is sharded over the ranks (:func:`shard_backbone`,
  torch's ``fully_shard`` per transformer layer): each forward pass then all-gathers layer by
  layer, so every rank must run the same forward passes in the same order; :func:`deal` pads the
  short ranks' evaluation with a dropped repeat and :func:`all_true` lets decoding stop together.
"""

from __future__ import annotations

import contextlib
import gc
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


_SHARDED = False
"""Whether :func:`shard_backbone` has sharded a backbone in this process."""
_MESHES: list[Any] = []
"""The device meshes :func:`shard_backbone` made; :func:`close` lets go of their process groups."""


def shard_backbone(model: torch.nn.Module, layers: Sequence[torch.nn.Module], device: torch.device) -> tuple[int, int]:
    """Shard ``model``'s (frozen) weights over every rank with torch's ``fully_shard`` (FSDP2): one
    unit per transformer layer, the rest (embeddings, final norm) as the root unit. Rank 0 holds the
    weights (in CPU memory), the other ranks a meta-device skeleton of the same model: each rank's
    shards are broadcast from rank 0 (``set_model_state_dict(..., broadcast_from_rank0=True)``), so a
    node reads the checkpoint once, not once per process. PET modules attached later live outside
    the shards: replicated, their gradients averaged by DDP as without FSDP. Returns (bytes of
    backbone weights this rank holds, bytes of the whole backbone)."""
    global _SHARDED
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    full = model.state_dict() if is_main() else {}
    buffers = broadcast_object({n: b.cpu() for n, b in model.named_buffers()} if is_main() else None)
    mesh = init_device_mesh(device.type, (world_size(),))
    _MESHES.append(mesh)
    # explicit True, also for the root (whose default keeps its weights gathered after forward):
    # a rank-0-only write (peft's save reads the state dict, which reshards) would otherwise leave
    # rank 0 sharded and the others gathered, and their next all-gathers would not pair up
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    if not is_main():
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():  # non-persistent buffers (rotary frequencies) are not in a state dict
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name].to(buffer.device, buffer.dtype))
    del full
    _SHARDED = True
    local = (p.to_local() if isinstance(p, DTensor) else p for p in model.parameters())
    return sum(t.numel() * t.element_size() for t in local), total


def forget_sharding() -> None:
    """A backbone prepared without ``backbone.fsdp`` (the next run in this process) is not sharded."""
    global _SHARDED
    _SHARDED = False


def sharded() -> bool:
    """Whether this process's backbone is sharded (every forward pass is then a collective)."""
    return _SHARDED and active()


def deal(batches: Sequence[Sequence[int]]) -> list[tuple[list[int], bool]]:
    """This rank's batches, dealt out round-robin, each with whether to keep its result. With a
    sharded backbone every rank gets the same number: a short rank repeats the first batch and
    drops the result, because its forward passes must pair with the others'."""
    mine = [(list(b), True) for b in batches[rank()::world_size()]]
    if sharded() and batches:
        mine += [(list(batches[0]), False)] * (-(-len(batches) // world_size()) - len(mine))
    return mine


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether a loop of forward passes may stop: with a sharded backbone, where every forward pass
    is a collective, when ``flag`` holds on every rank (they stop together); else this rank's ``flag``."""
    if not sharded():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


_PLACEHOLDER = False


@contextlib.contextmanager
def placeholder_pass():
    """Marks the forward pass a process with no row of a step runs only to join the gradient
    all-reduce (its loss is multiplied by 0): a learner that gathers rows across processes
    (:func:`in_placeholder_pass`) must not count the placeholder's row."""
    global _PLACEHOLDER
    _PLACEHOLDER = True
    try:
        yield
    finally:
        _PLACEHOLDER = False


def in_placeholder_pass() -> bool:
    return _PLACEHOLDER


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
    """Leave the process group (end of a launched command), once its worker threads are done.

    gloo joins its worker threads only when the group object is freed. A sharded backbone's device
    mesh outlives the run (torch's DTensor caches keep it) and holds the group in its registry, and
    the run's FSDP states hold it through reference cycles: both are let go first, so that the group
    is freed here. Left alive until the interpreter exits, a worker thread could release a
    collective's tensor after Python began finalizing: SIGABRT, "terminate called without an
    active exception" (1 two-process FSDP run in ~15 on a busy machine)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for mesh in _MESHES:
        registry = getattr(mesh, "_pg_registry", None)  # where a mesh keeps one (torch 2.13 does)
        if isinstance(registry, dict):
            registry.clear()
    _MESHES.clear()
    gc.collect()
    dist.destroy_process_group()
