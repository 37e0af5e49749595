"""LISA (Pan et al. 2024): layerwise importance sampling; see :class:`LISA`."""

from __future__ import annotations

import re

import torch

from conpet.families import LINEAR_TARGETS
from conpet.pet.base import check_positive_int, register_pet, seeded_generator
from conpet.pet.delta import DeltaPart, DeltaPET


@register_pet("lisa")
class LISA(DeltaPET):
    """LISA (Pan et al. 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large
    Language Model Fine-Tuning"): every ``interval`` steps, ``active_layers`` transformer layers
    are sampled uniformly and only their weights train (the others are frozen until the next
    draw). Named deviation: LISA also always trains the embeddings and the LM head; conpet runs
    no LM head and keeps the embeddings frozen. Trainable: every targeted weight can change
    (over the draws); stored sparsely."""

    paper = "Pan et al. 2024, LISA: Layerwise Importance Sampling for Memory-Efficient LLM Fine-Tuning"
    defaults = {"target_modules": LINEAR_TARGETS, "active_layers": 2, "interval": 20, "seed": 0}

    def build(self, base, path, shared):
        return DeltaPart(base)

    def expected_count(self, model):
        return sum(s.base.weight.numel() for s in model.sites.values())

    def _layer_of(self, path):
        return int(re.search(r"\.(\d+)\.", path).group(1))

    def check_options(self, options):
        options = super().check_options(options)
        check_positive_int("active_layers", options["active_layers"])
        check_positive_int("interval", options["interval"])
        return options

    def _draw(self, model, name, draw: int) -> None:
        layers = sorted({self._layer_of(p) for p in model.sites})
        gen = seeded_generator(self.options["seed"], name, draw)
        k = min(int(self.options["active_layers"]), len(layers))
        active = {layers[i] for i in torch.randperm(len(layers), generator=gen)[:k].tolist()}
        for path, site in model.sites.items():
            site.parts[name].delta.requires_grad_(self._layer_of(path) in active)

    def parameters(self, model, name):
        params = [site.parts[name].delta for site in model.sites.values()]
        self._draw(model, name, 0)
        return params

    def step_hook(self, model, name, total_steps=None):
        interval = int(self.options["interval"])

        def resample(step: int) -> None:
            if (step + 1) % interval == 0:
                self._draw(model, name, (step + 1) // interval)

        return resample
