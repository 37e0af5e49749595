"""Sparse fine-tuning (Ansell et al. 2024, SpIEL); see :class:`SparseFT`."""

from __future__ import annotations

import torch

from conpet.errors import ConfigError
from conpet.families import LINEAR_TARGETS
from conpet.pet.base import check_positive_int, check_positive_number, register_pet, seeded_generator
from conpet.pet.delta import DeltaPart, DeltaPET


@register_pet("sparse_ft")
class SparseFT(DeltaPET):
    """Sparse fine-tuning (Ansell et al. 2024, "Scaling Sparse Fine-Tuning to Large Language
    Models", SpIEL): a fixed-density update of the chosen weights. Each targeted linear layer
    trains ``density`` of its entries (a random initial set); every ``regrow_every`` steps the
    ``regrow_fraction`` of active entries with the smallest ``|delta|`` are pruned (set to 0) and
    as many inactive entries with the largest accumulated ``|gradient|`` since the last update are
    regrown (SpIEL-AG). Named deviation: the optimizer moments of regrown entries are not reset.
    Trainable (and stored): ``round(density x out x in)`` entries per layer."""

    paper = "Ansell et al. 2024, Scaling Sparse Fine-Tuning to Large Language Models"
    defaults = {"density": 0.01, "regrow_every": 20, "regrow_fraction": 0.2, "target_modules": LINEAR_TARGETS,
                "seed": 0}

    def check_options(self, options):
        options = super().check_options(options)
        density = check_positive_number("density", options["density"])
        fraction = options["regrow_fraction"]
        if density > 1 or isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ConfigError("pet.options: density must be in (0, 1] and regrow_fraction in [0, 1]")
        check_positive_int("regrow_every", options["regrow_every"])
        return options

    def build(self, base, path, shared):
        # each site's initial set from a real hash of (seed, path): distinct for every layer
        return DeltaPart(base, float(self.options["density"]), seeded_generator(self.options["seed"], path))

    def count(self, model, name):
        return sum(int(site.parts[name].mask.sum()) for site in model.sites.values())

    def expected_count(self, model):
        return sum(max(1, round(float(self.options["density"]) * s.base.weight.numel())) for s in model.sites.values())

    def step_hook(self, model, name, total_steps=None):
        every, fraction = int(self.options["regrow_every"]), float(self.options["regrow_fraction"])

        def regrow(step: int) -> None:
            if (step + 1) % every:
                return
            with torch.no_grad():
                for site in model.sites.values():
                    part = site.parts[name]
                    active = part.mask.view(-1).nonzero().flatten()
                    k = int(fraction * len(active))
                    if k == 0:
                        continue
                    flat, acc = part.delta.view(-1), part.grad_acc.view(-1)
                    drop = active[flat[active].abs().argsort()[:k]]
                    part.mask.view(-1)[drop] = False
                    flat[drop] = 0.0
                    candidates = acc.masked_fill(part.mask.view(-1), -1.0)
                    candidates[drop] = -1.0  # not straight back
                    grow = candidates.topk(k).indices
                    part.mask.view(-1)[grow] = True
                    part.grad_acc.zero_()

        return regrow
