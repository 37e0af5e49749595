"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning") via peft: learned vectors rescale keys, values and the feed-forward
activations. Options are peft ``IA3Config`` fields (defaults: peft's per-architecture targets).
Trainable: the sizes of the rescaled activations (k, v outputs and the feed-forward input).
peft's IA3Config has no ``layers_to_transform``: a scope becomes regexes over the targets.
"""

from __future__ import annotations

import re

from torch import nn

from conpet.errors import ConfigError
from conpet.pet.base import register_pet
from conpet.pet.peft_backed import PeftBacked, layer_regex


@register_pet("ia3")
class IA3(PeftBacked):
    """(IA)^3 via peft: learned rescaling vectors."""

    paper = "Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"
    routes_per_row = False

    def config_class(self):
        from peft import IA3Config

        return IA3Config

    def peft_options(self, model):
        options = dict(self.options)
        if self.scope is None:
            return options
        from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
                                          TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS)

        model_type = model.config.model_type
        targets = options.get("target_modules") or TARGETS.get(model_type)
        feedforward = options.get("feedforward_modules") or FEEDFORWARD.get(model_type)
        if not isinstance(targets, (list, tuple)) or not isinstance(feedforward, (list, tuple)):
            raise ConfigError(f"pet 'ia3' with train.top_layers needs target_modules and feedforward_modules as "
                              f"lists of names for model type '{model_type}'")
        options["target_modules"] = layer_regex(self.scope, [re.escape(n) for n in targets])
        options["feedforward_modules"] = layer_regex(self.scope, [re.escape(n) for n in feedforward])
        return options

    def delta_weights(self, model: nn.Module, name: str):
        """``W (l - 1)`` (the learned vector scales the weight's columns for the feed-forward
        input, its rows otherwise) and, for the rows case, ``b (l - 1)`` for a bias."""
        out = {}
        for path, layer in self.tuner_layers(model, name):
            base = layer.get_base_layer()
            scale = layer.ia3_l[name].detach()
            out[f"{path}.weight"] = base.weight.detach() * (scale - 1)
            if not layer.is_feedforward and base.bias is not None:
                out[f"{path}.bias"] = base.bias.detach() * (scale.reshape(base.bias.shape) - 1)
        return out
