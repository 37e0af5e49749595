"""Precision and autocast: the one place that decides how tensors are computed.

Bottom floor of the package (imports nothing of conpet's): the engine, the training loop, the PET
methods and prediction all ask this module instead of calling ``torch.autocast`` themselves.

- :func:`resolve_precision` turns the config's ``auto`` into ``bf16`` where the CPU runs bf16
  natively (AVX512-BF16 or AMX), else ``fp32``;
- :func:`autocast` is the context every forward pass runs under.
"""

from __future__ import annotations

import contextlib

import torch

def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` where the CPU runs it natively, else ``fp32``; others unchanged."""
    if precision == "auto":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return precision


def autocast(precision: str):
    """bf16 autocast on CPU (weights stay fp32); a no-op context for fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
