"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") via peft.

Options are peft ``LoraConfig`` fields; defaults ``r=8, lora_alpha=16, lora_dropout=0.0`` and
``target_modules`` = peft's default for the architecture (query/value projections; for a family
peft has no default for, the one in :data:`conpet.families.FAMILIES`).
``use_rslora`` and ``use_dora`` switch on rsLoRA and DoRA. Confined to the top layers
(``train.top_layers``) and without ``target_modules``, LoRA goes on every linear layer of those
layers: more capacity where it is cheap (docs/speed.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from conpet.families import family_of
from conpet.pet.base import LayerScope, register_pet
from conpet.pet.peft_backed import PeftBacked, linear_module_names

LoraFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""module path -> (A [r, in], B [out, r])"""


def scoped_options(options: dict[str, Any], scope: LayerScope | None, model: nn.Module,
                   all_linear_by_default: bool) -> dict[str, Any]:
    """LoRA-family peft fields for a scope: ``layers_to_transform``/``layers_pattern`` from it,
    and ``all-linear`` spelt out as the backbone's linear layer names (peft refuses the string
    together with ``layers_to_transform``)."""
    options = dict(options)
    config = getattr(model, "config", None)
    targets = family_of(config.model_type).lora_targets if config is not None else None
    if targets is not None and scope is None:
        options.setdefault("target_modules", list(targets))  # peft has no default for the family
    if scope is not None:
        if all_linear_by_default:
            options.setdefault("target_modules", "all-linear")
        options["layers_to_transform"] = list(scope.layers)
        options["layers_pattern"] = scope.pattern
    if options.get("target_modules") == "all-linear" and options.get("layers_to_transform") is not None:
        options["target_modules"] = linear_module_names(model)
    return options


def without_string_targets(options: dict[str, Any]) -> dict[str, Any]:
    """For checking values before the backbone is known: a string ``target_modules`` beside
    ``layers_to_transform`` is spelt out at attach time, so a stand-in list is checked instead."""
    if isinstance(options.get("target_modules"), str) and options.get("layers_to_transform") is not None:
        return {**options, "target_modules": ["q_proj"]}
    return options


@register_pet("lora")
class LoRA(PeftBacked):
    """LoRA via peft (rsLoRA and DoRA as options)."""

    paper = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models"
    lora_mergeable = True
    defaults: dict[str, Any] = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}

    def config_class(self):
        from peft import LoraConfig

        return LoraConfig

    def validation_options(self, options):
        return without_string_targets(options)

    def peft_options(self, model):
        return scoped_options(self.options, self.scope, model, all_linear_by_default=True)

    @property
    def rank(self) -> int:
        return int(self.options["r"])

    def delta_weights(self, model: nn.Module, name: str):
        """``dW = scaling x B A`` per targeted weight (peft's ``get_delta_weight``); DoRA's
        magnitude renormalisation is not an additive update: ``None``."""
        out = {}
        for path, layer in self.tuner_layers(model, name):
            if getattr(layer, "use_dora", {}).get(name):
                return None
            out[f"{path}.weight"] = layer.get_delta_weight(name).detach()
        return out

    # -- what the merge learner needs ---------------------------------------------------------------
    def lora_factors(self, model: nn.Module, name: str) -> tuple[dict[str, Any], LoraFactors]:
        """``({r, lora_alpha, use_rslora}, {peft key prefix: (A, B)})`` of module ``name``, the
        factors as fp32 copies keyed like a saved peft folder (``base_model.model.<path>``)."""
        config = model.peft_config[name]
        factors = {f"base_model.model.{path}": (layer.lora_A[name].weight.detach().float().clone(),
                                                 layer.lora_B[name].weight.detach().float().clone())
                   for path, layer in self.tuner_layers(model, name)}
        return {"r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": bool(config.use_rslora)}, factors

    def set_lora_factors(self, model: nn.Module, name: str, factors: LoraFactors) -> None:
        """Write ``factors`` (as :meth:`lora_factors` gives them) into module ``name``."""
        layers = dict(self.tuner_layers(model, name))
        with torch.no_grad():
            for key, (a, b) in factors.items():
                layer = layers[key.removeprefix("base_model.model.")]
                layer.lora_A[name].weight.copy_(a)
                layer.lora_B[name].weight.copy_(b)

    def activate_stacked(self, model: nn.Module, name: str, frozen: list[str]) -> None:
        """Make ``name`` and the ``frozen`` modules active together, their updates adding up in
        the forward pass (peft's multi-adapter LoRA); only ``name`` trains."""
        model.base_model.set_adapter([name, *frozen])
        for module in frozen:
            for p in self.tensors(model, module):
                p.requires_grad_(False)

    def resized(self, rank: int) -> "LoRA":
        """A plain LoRA of rank ``rank`` and scaling 1 on the same layers (where merged updates go)."""
        options = {**self.options, "r": rank, "lora_alpha": rank, "use_rslora": False, "use_dora": False}
        return LoRA(options, scope=self.scope, precision=self.precision)
