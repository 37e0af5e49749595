"""A parallel adapter beside the feed-forward block (He et al. 2022); see :class:`ParallelAdapter`."""

from __future__ import annotations

from conpet.families import is_llama_like
from conpet.pet.adapter import Bottleneck
from conpet.pet.base import check_positive_int, check_positive_number, register_pet
from conpet.pet.sites import InjectedPET, in_features, out_features


@register_pet("parallel_adapter")
class ParallelAdapter(InjectedPET):
    """A parallel adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
    Learning"): ``y <- FFN(x) + s * up(relu(down(x)))`` beside the feed-forward block, ``s`` =
    ``scaling`` (4 in the paper). Named deviation: on BERT-like encoders, whose feed-forward block
    is split across modules, it sits beside the feed-forward output projection instead."""

    paper = "He et al. 2022, Towards a Unified View of Parameter-Efficient Transfer Learning"
    defaults = {"bottleneck": 64, "scaling": 4.0}

    def check_options(self, options):
        options = super().check_options(options)
        check_positive_int("bottleneck", options["bottleneck"])
        check_positive_number("scaling", options["scaling"])
        return options

    def site_pattern(self, model):
        return r"^mlp$" if is_llama_like(path for path, _ in model.named_modules()) else r"^output\.dense$"

    def build(self, base, path, shared):
        return Bottleneck(in_features(base), out_features(base), int(self.options["bottleneck"]))

    def apply(self, part, x, y):
        return y + float(self.options["scaling"]) * part(x).to(y.dtype)

    def expected_count(self, model):
        b = int(self.options["bottleneck"])
        return sum(in_features(s.base) * b + b + b * out_features(s.base) + out_features(s.base)
                   for s in model.sites.values())
