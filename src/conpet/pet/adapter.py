"""Bottleneck adapters in series (Houlsby et al. 2019; ``placement: pfeiffer`` = Pfeiffer et al.
2021); see :class:`SeriesAdapter`."""

from __future__ import annotations

import torch
from torch import nn

from conpet.errors import ConfigError
from conpet.families import is_llama_like
from conpet.pet.base import check_positive_int, register_pet
from conpet.pet.sites import InjectedPET, out_features


class Bottleneck(nn.Module):
    """``up(act(down(h)))`` with ``up`` zero-initialised (the module starts as the identity)."""

    def __init__(self, d_in: int, d_out: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, bottleneck)
        self.up = nn.Linear(bottleneck, d_out)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.relu(self.down(h)))


@register_pet("adapter")
class SeriesAdapter(InjectedPET):
    """Bottleneck adapters in series (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning
    for NLP"): ``h <- h + up(relu(down(h)))`` on the output of the attention output projection and
    of the feed-forward output projection (before the residual add), ``up`` zero-initialised.
    ``placement: pfeiffer`` keeps only the feed-forward one (Pfeiffer et al. 2021, AdapterFusion).
    Trainable per adapter: ``2 * d * b + b + d`` (``d`` hidden size, ``b`` = ``bottleneck``)."""

    paper = "Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP (placement: pfeiffer = Pfeiffer et al. 2021)"
    defaults = {"bottleneck": 64, "placement": "houlsby"}

    def check_options(self, options):
        options = super().check_options(options)
        if options["placement"] not in ("houlsby", "pfeiffer"):
            raise ConfigError(f"pet.options.placement: must be 'houlsby' or 'pfeiffer', got {options['placement']!r}")
        check_positive_int("bottleneck", options["bottleneck"])
        return options

    def site_pattern(self, model):
        if is_llama_like(path for path, _ in model.named_modules()):
            ffn, attn = r"^mlp\.down_proj$", r"^self_attn\.o_proj$"
        else:
            ffn, attn = r"^output\.dense$", r"^attention\.output\.dense$"
        return ffn if self.options["placement"] == "pfeiffer" else f"{ffn}|{attn}"

    def build(self, base, path, shared):
        d = out_features(base)
        return Bottleneck(d, d, int(self.options["bottleneck"]))

    def apply(self, part, x, y):
        return y + part(y).to(y.dtype)

    def expected_count(self, model):
        n = len(model.sites)
        b, d = int(self.options["bottleneck"]), out_features(next(iter(model.sites.values())).base)
        return n * (2 * d * b + b + d)
