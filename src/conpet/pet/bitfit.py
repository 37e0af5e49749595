"""BitFit (Ben Zaken et al. 2022): only bias terms train; see :class:`BitFit`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from conpet.families import LINEAR_TARGETS
from conpet.pet.base import register_pet
from conpet.pet.sites import InjectedPET, out_features


class BiasDelta(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(d))


@register_pet("bitfit")
class BitFit(InjectedPET):
    """BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
    Transformer-based Masked Language-models"): only bias terms train. Implemented as a trainable
    bias added to the output of every linear layer in the transformer blocks, zero-initialised:
    for a layer that has a bias this is the same as training that bias from its pretrained value;
    for bias-free layers (Llama) it adds the bias BitFit would train (named deviation). Several
    named modules can then share one backbone. Trainable: the sum of the linear layers' output
    sizes. LayerNorm biases are not included (named deviation)."""

    paper = "Ben Zaken et al. 2022, BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based MLMs"
    defaults: dict[str, Any] = {}

    def site_pattern(self, model):
        return LINEAR_TARGETS

    def build(self, base, path, shared):
        return BiasDelta(out_features(base))

    def apply(self, part, x, y):
        return y + part.bias.to(y.dtype)

    def expected_count(self, model):
        return sum(out_features(s.base) for s in model.sites.values())
