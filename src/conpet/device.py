"""Device and precision: the one place that decides where and how tensors are computed.

Next to the bottom floor (imports only conpet's errors): the engine, the training loop, the PET
methods and prediction all ask this module instead of calling ``torch.autocast`` or picking a
device themselves.

- :func:`resolve_device` turns ``train.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``)
  into a :class:`torch.device`: ``auto`` is CUDA if present, then Apple MPS, then the CPU;
- :func:`resolve_precision` turns ``train.precision: auto`` into ``bf16`` on a GPU that runs it
  (else ``fp16``, trained with gradient scaling) and on a CPU with native bf16 (AVX512-BF16 or
  AMX), else ``fp32``;
- :class:`Compute` (a device + a precision) gives the autocast context every forward pass runs
  under and the gradient scaler fp16 needs;
- :func:`shrink_on_oom` runs a batched computation again on halves of a batch that ran the device
  out of memory, so evaluation lowers its batch instead of crashing.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch

from conpet.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def available_devices() -> list[str]:
    """The accelerator kinds torch can use here, best first, and ``cpu`` last."""
    out = []
    if torch.cuda.is_available():
        out.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out + ["cpu"]


def resolve_device(setting: str = "auto", available: Sequence[str] | None = None,
                   cuda_count: int | None = None) -> torch.device:
    """``auto`` -> the first of ``available`` (default :func:`available_devices`); an explicit
    device must be available (``cuda:N`` must exist), else :class:`ConfigError`.

    Under ``torchrun`` / ``accelerate launch`` (``LOCAL_RANK`` set) ``auto`` and ``cuda`` mean the
    process's own GPU, ``cuda:<LOCAL_RANK>``."""
    available = list(available if available is not None else available_devices())
    setting = (setting or "auto").strip().lower()
    kind, _, index = setting.partition(":")
    if kind == "auto":
        kind = available[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"train.device: unknown device '{setting}' (use auto, cpu, cuda, cuda:N or mps)")
    if kind not in available:
        raise ConfigError(f"train.device: '{setting}' is not available here (available: {', '.join(available)})")
    if kind != "cuda":
        if index:
            raise ConfigError(f"train.device: '{setting}': only cuda takes an index")
        return torch.device(kind)
    count = cuda_count if cuda_count is not None else torch.cuda.device_count()
    if index:
        if not index.isdigit():
            raise ConfigError(f"train.device: '{setting}': the index must be a number")
        n = int(index)
    else:
        n = int(os.environ.get("LOCAL_RANK", "0"))
    if n >= count:
        raise ConfigError(f"train.device: '{kind}:{n}' does not exist (this machine has {count} CUDA device(s))")
    return torch.device("cuda", n)


def gpu_supports_bf16(device: torch.device) -> bool:
    """True when the run's own GPU computes bf16 natively (CUDA compute capability 8.0 or newer:
    A100, H100...; on ROCm, what torch reports without emulation). ``torch.cuda.is_bf16_supported()``
    with its default counts emulation, so a V100 or T4 would get slow emulated bf16 instead of fp16
    with gradient scaling, and it asks about the current device rather than the run's."""
    if device.type != "cuda":
        return False
    if getattr(torch.version, "hip", None):
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``auto`` -> ``bf16`` where the device computes it natively, ``fp16`` on a GPU that does
    not, ``fp32`` on a CPU without bf16; an explicit choice is checked against the device."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision: must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision == "auto":
        if device.type == "cpu":
            return "bf16" if cpu_supports_bf16() else "fp32"
        if device.type == "mps":
            return "fp16"
        return "bf16" if gpu_supports_bf16(device) else "fp16"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("train.precision: fp16 autocast needs a GPU; on a CPU use bf16 or fp32")
    return precision


@dataclass(frozen=True)
class Compute:
    """Where and how forward passes run: a device and a resolved precision (fp32, bf16, fp16)."""

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    @property
    def dtype(self) -> torch.dtype:
        """The autocast dtype (``float32`` when there is no autocast)."""
        return DTYPES.get(self.precision, torch.float32)

    def autocast(self):
        """The context every forward pass runs under: bf16/fp16 autocast (weights stay fp32), or none."""
        return autocast(self.precision, self.device)

    def grad_scaler(self) -> "torch.amp.GradScaler | None":
        """fp16 needs its loss scaled against gradient underflow; bf16 and fp32 do not."""
        if self.precision != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)

    def to(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=self.device.type == "cuda")

    def empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()


def as_compute(compute: "Compute | str") -> Compute:
    """A :class:`Compute`, or a precision string meaning that precision on the CPU."""
    return compute if isinstance(compute, Compute) else Compute(torch.device("cpu"), compute)


def autocast(precision: str, device: torch.device | str = "cpu"):
    """bf16/fp16 autocast on ``device`` (weights stay fp32); a no-op context for fp32."""
    if precision in DTYPES:
        return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])
    return contextlib.nullcontext()


def full_precision(device: torch.device | str = "cpu"):
    """A region where autocast is off (statistics that must be fp32, e.g. InfLoRA's covariances)."""
    return torch.autocast(torch.device(device).type, enabled=False)


def is_out_of_memory(error: BaseException) -> bool:
    """True for a device out-of-memory error (CUDA, MPS, or the CPU allocator's)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


T = TypeVar("T")


def shrink_on_oom(fn: Callable[[list[int]], T], indices: list[int], join: Callable[[list[T]], T],
                  on_shrink: Callable[[], None] | None = None) -> T:
    """``fn(indices)``, or, when it runs the device out of memory, ``join`` of ``fn`` on the two
    halves (recursively, down to one row, which re-raises). ``on_shrink`` frees cached memory."""
    try:
        return fn(indices)
    except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled
        if not is_out_of_memory(e) or len(indices) <= 1:
            raise
    if on_shrink is not None:
        on_shrink()
    half = len(indices) // 2
    return join([shrink_on_oom(fn, indices[:half], join, on_shrink),
                 shrink_on_oom(fn, indices[half:], join, on_shrink)])
