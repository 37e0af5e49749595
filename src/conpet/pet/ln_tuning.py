"""LN tuning (Qi et al. 2022, "Parameter-Efficient Tuning on Layer Normalization for Pre-trained
Language Models") via peft: only the LayerNorm / RMSNorm weights (and biases) train; confined to
the top layers, only their norms."""

from __future__ import annotations

from torch import nn

from conpet.pet.base import register_pet
from conpet.pet.peft_backed import PeftBacked, layer_regex


@register_pet("ln_tuning")
class LNTuning(PeftBacked):
    """LN tuning via peft: the norms' own parameters train."""

    paper = "Qi et al. 2022, Parameter-Efficient Tuning on Layer Normalization for Pre-trained Language Models"
    routes_per_row = False

    def config_class(self):
        from peft import LNTuningConfig

        return LNTuningConfig

    def peft_options(self, model):
        options = dict(self.options)
        if "target_modules" not in options:  # every norm inside the (scoped) transformer blocks
            options["target_modules"] = layer_regex(self.scope, [r"(norm|LayerNorm)[^.]*"])
        return options

    def delta_weights(self, model: nn.Module, name: str):
        """The tuned norm's parameters minus the frozen ones."""
        out = {}
        for path, layer in self.tuner_layers(model, name):
            base = dict(layer.get_base_layer().named_parameters())
            for key, p in layer.ln_tuning_layers[name].named_parameters():
                out[f"{path}.{key}"] = (p - base[key]).detach()
        return out
