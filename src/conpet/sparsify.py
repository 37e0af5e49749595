"""Which entries of a weight update to keep: pure functions shared by the merge rules
(:mod:`conpet.merging`) and ComPEFT compression (:mod:`conpet.compress`).

Counts are ``round(fraction * numel)`` rounded half up (:func:`keep_count`), and magnitude ties
are broken by index order (:func:`ranks_by_magnitude`), so every rule that keeps "the largest
``density``" keeps the same entries. Random masks (DARE) draw from an explicit generator.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def half_up(x: float) -> int:
    """``x`` rounded to the nearest integer, halves up (Python's ``round`` rounds halves to even)."""
    return int(math.floor(x + 0.5))


def keep_count(density: float, n: int) -> int:
    """How many of ``n`` entries a ``density`` keeps: ``round(density * n)``, at least 1 if > 0."""
    if n == 0 or density <= 0:
        return 0
    return min(n, max(1, half_up(density * n)))


def ranks_by_magnitude(t: Tensor) -> Tensor:
    """Flat indices of ``t`` from smallest to largest ``|t|`` (stable: ties keep index order)."""
    return torch.argsort(t.reshape(-1).abs(), stable=True)


def top_magnitude_mask(t: Tensor, density: float) -> Tensor:
    """Boolean mask of exactly :func:`keep_count` ``(density, t.numel())`` largest ``|t|``."""
    n = t.numel()
    k = keep_count(density, n)
    mask = torch.zeros(n, dtype=torch.bool, device=t.device)
    if k:
        mask[ranks_by_magnitude(t)[n - k :]] = True
    return mask.reshape(t.shape)


def breadcrumbs_mask(t: Tensor, drop_top: float, drop_bottom: float) -> Tensor:
    """Boolean mask keeping the entries of ``t`` that are neither among the ``drop_top``
    fraction of largest ``|t|`` (outliers) nor among the ``drop_bottom`` fraction of smallest.

    Counts are ``round(fraction * numel)``; magnitude ties are broken by index order.
    """
    n = t.numel()
    n_top = min(n, half_up(drop_top * n))
    n_bottom = min(n - n_top, half_up(drop_bottom * n))
    ranks = ranks_by_magnitude(t)
    mask = torch.zeros(n, dtype=torch.bool, device=t.device)
    mask[ranks[n_bottom : n - n_top]] = True
    return mask.reshape(t.shape)


def global_magnitude_threshold(state: Mapping[str, Tensor], density: float) -> float:
    """The ``|tau|`` at or above which the ``density`` largest entries of the whole flattened
    update lie (TIES trims over the full task vector, not per tensor)."""
    flat = torch.cat([t.detach().reshape(-1).abs().to(torch.float64) for t in state.values()])
    k = keep_count(density, flat.numel())
    if k == 0:
        return math.inf
    return float(torch.topk(flat, k).values.min())


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from fresh entropy when ``seed`` is None."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def dare_drop(delta: Tensor, drop_rate: float, generator: torch.Generator) -> Tensor:
    """One DARE draw: zero each entry with probability ``drop_rate``, rescale the rest by
    ``1 / (1 - drop_rate)`` (so the expectation equals ``delta``)."""
    work = work_dtype(delta.dtype)
    if drop_rate == 0:
        return delta.detach().to(work)
    u = torch.rand(delta.shape, generator=generator, device=generator.device)
    keep = (u >= drop_rate).to(delta.device)
    return delta.detach().to(work) * keep / (1.0 - drop_rate)
