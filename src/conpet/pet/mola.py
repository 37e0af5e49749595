"""MoLA (Gao et al. 2024, "Higher Layers Need More LoRA Experts"); see :class:`MoLA`."""

from __future__ import annotations

import re

import torch
from torch import nn

from conpet.errors import ConfigError
from conpet.families import LINEAR_TARGETS
from conpet.pet.base import check_positive_int, register_pet
from conpet.pet.sites import InjectedPET, block_paths


def _kaiming_a(r: int, d_in: int) -> torch.Tensor:
    a = torch.empty(r, d_in)
    nn.init.kaiming_uniform_(a, a=5 ** 0.5)  # peft's LoRA A initialisation
    return a


class MoLAPart(nn.Module):
    def __init__(self, d_in: int, d_out: int, experts: int, r: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.stack([_kaiming_a(r, d_in) for _ in range(experts)]))  # [E, r, in]
        self.B = nn.Parameter(torch.zeros(experts, d_out, r))  # [E, out, r]
        self.router = nn.Linear(d_in, experts, bias=False)


@register_pet("mola")
class MoLA(InjectedPET):
    """MoLA (Gao et al. 2024, "Higher Layers Need More LoRA Experts"): every targeted projection
    gets E_l LoRA experts (rank ``r``, ``lora_alpha``) and a router ``Linear(d_in -> E_l)``
    without bias; softmax -> top-``top_k`` (2) -> renormalised weights ->
    ``y + sum_e w_e B_e A_e x * alpha / r``. ``experts`` gives E_l per block of layers from the
    bottom (MoLA-triangle-down ``[2, 4, 6, 8]``, the paper's best: higher layers get more); the
    PET layers (all layers, or the top ones under ``train.top_layers``) are split into
    ``len(experts)`` equal blocks, as the official code splits its 32 layers into 4 blocks of 8. Trainable per site: ``E (r (in + out)) +
    in E``. Named deviation: the optional Switch-style balance loss is not added."""

    paper = "Gao et al. 2024, Higher Layers Need More LoRA Experts"
    defaults = {"r": 8, "lora_alpha": 16, "experts": [2, 4, 6, 8], "top_k": 2, "target_modules": LINEAR_TARGETS}

    def check_options(self, options):
        options = super().check_options(options)
        check_positive_int("r", options["r"])
        check_positive_int("top_k", options["top_k"])
        experts = options["experts"]
        if not isinstance(experts, list) or not experts or not all(
                isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in experts):
            raise ConfigError(f"pet.options.experts: a list of expert counts >= 1 per block of layers, got {experts!r}")
        return options

    def site_pattern(self, model):
        """Also settles the PET layers (the scope's, or every layer with a targeted projection)."""
        paths = block_paths(model, self.options["target_modules"], self.layers)
        self._pet_layers = sorted({int(re.search(r"\.(\d+)\.", p).group(1)) for p in paths})
        return self.options["target_modules"]

    def experts_at(self, path: str) -> int:
        """E_l for the site's layer: the PET layers, bottom to top, are split into
        ``len(experts)`` equal blocks (the profile follows the position among the PET layers, so
        it holds under ``train.top_layers`` too)."""
        position = self._pet_layers.index(int(re.search(r"\.(\d+)\.", path).group(1)))
        blocks = list(self.options["experts"])
        return int(blocks[min(len(blocks) - 1, position * len(blocks) // len(self._pet_layers))])

    def build(self, base, path, shared):
        return MoLAPart(base.in_features, base.out_features, self.experts_at(path), int(self.options["r"]))

    def apply(self, part, x, y):
        scaling = float(self.options["lora_alpha"]) / int(self.options["r"])
        xf = x.to(part.A.dtype)
        probs = torch.softmax(part.router(xf), dim=-1)  # [..., E]
        k = min(int(self.options["top_k"]), probs.shape[-1])
        top, idx = probs.topk(k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        h = torch.einsum("...i,eri->...er", xf, part.A)  # [..., E, r]
        out = torch.einsum("...er,eor->...eo", h, part.B)  # [..., E, out]
        return y + (scaling * (weights.unsqueeze(-1) * out).sum(-2)).to(y.dtype)

    def expected_count(self, model):
        r = int(self.options["r"])
        return sum(self.experts_at(p) * (r * (s.base.in_features + s.base.out_features) + s.base.in_features)
                   for p, s in model.sites.items())
