"""Compacter (Mahabadi et al. 2021): Houlsby-placed adapters of PHM layers; see :class:`Compacter`."""

from __future__ import annotations

import torch
from torch import nn

from conpet.errors import ConfigError
from conpet.pet.adapter import SeriesAdapter
from conpet.pet.base import check_positive_int, register_pet
from conpet.pet.sites import out_features


class PHMLinear(nn.Module):
    """A parameterized hypercomplex multiplication layer with rank-1 ``B_i = s_i t_i^T``:
    ``W = sum_i A_i (x) (s_i t_i^T)``; ``A`` (the slow weights, ``[n, n, n]``) is shared."""

    def __init__(self, d_in: int, d_out: int, n: int, shared: nn.Parameter, zero: bool = False) -> None:
        super().__init__()
        if d_in % n or d_out % n:
            raise ConfigError(f"compacter: sizes {d_in} and {d_out} must be divisible by phm_dim n={n}")
        self.n = n
        object.__setattr__(self, "shared", shared)
        self.s = nn.Parameter(torch.randn(n, d_in // n, 1) * (0.0 if zero else 0.02))
        self.t = nn.Parameter(torch.randn(n, 1, d_out // n) * 0.02)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def weight(self) -> torch.Tensor:
        b = self.s @ self.t  # [n, d_in/n, d_out/n]
        return torch.stack([torch.kron(self.shared[i], b[i]) for i in range(self.n)]).sum(0)  # [d_in, d_out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight().to(x.dtype) + self.bias.to(x.dtype)


class CompacterPart(nn.Module):
    def __init__(self, d: int, b: int, n: int, shared_down: nn.Parameter, shared_up: nn.Parameter) -> None:
        super().__init__()
        self.down = PHMLinear(d, b, n, shared_down)
        self.up = PHMLinear(b, d, n, shared_up, zero=True)

    def forward(self, h):
        return self.up(nn.functional.gelu(self.down(h)))


@register_pet("compacter")
class Compacter(SeriesAdapter):
    """Compacter (Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter
    Layers"): Houlsby-placed adapters whose down and up projections are PHM layers, ``W = sum_i
    A_i (x) B_i`` with ``B_i = s_i t_i^T`` rank one and the ``A_i`` ("slow weights", ``n`` of size
    ``n x n``) shared by every adapter of the model (one set for down-, one for up-projections).
    Trainable: ``2 n^3`` shared + per adapter ``(d + b) + b`` (down) + ``(b + d) + d`` (up).
    The shared slow weights belong to each named module (every module has its own set)."""

    paper = "Mahabadi et al. 2021, Compacter: Efficient Low-Rank Hypercomplex Adapter Layers"
    defaults = {"bottleneck": 32, "phm_dim": 4, "placement": "houlsby"}

    def check_options(self, options):
        options = super().check_options(options)
        check_positive_int("phm_dim", options["phm_dim"])
        return options

    def build_shared(self):
        n = int(self.options["phm_dim"])
        shared = nn.Module()
        shared.down = nn.Parameter(torch.randn(n, n, n) / n)
        shared.up = nn.Parameter(torch.randn(n, n, n) / n)
        return shared

    def build(self, base, path, shared):
        n, d, b = int(self.options["phm_dim"]), out_features(base), int(self.options["bottleneck"])
        return CompacterPart(d, b, n, shared.down, shared.up)

    def apply(self, part, x, y):
        return y + part(y).to(y.dtype)

    def expected_count(self, model):
        n, b = int(self.options["phm_dim"]), int(self.options["bottleneck"])
        d = out_features(next(iter(model.sites.values())).base)
        return 2 * n**3 + len(model.sites) * ((d + b) + b + (b + d) + d)
