"""OSF: orthogonal subspace fine-tuning (Nayak et al. 2025, "Sculpting Subspaces: Constrained
Full Fine-Tuning in LLMs for Continual Learning", arXiv 2504.07097) via peft's ``OSFConfig``.

Every targeted weight is decomposed once, ``W = U S V^T`` (fp32 SVD, factors cast back to the
weight's dtype); the top ``effective_rank`` singular triplets are **preserved** (frozen) and the
remaining ``min(m, n) - effective_rank`` ones train, their gradients projected orthogonally to the
preserved left and right singular vectors (peft's gradient hooks on ``U_low``/``V_low``). The
forward pass is ``W x + (U_l S_l V_l - U_l0 S_l0 V_l0) x`` (peft 0.21's factored form: the base
weight stays as it is and the update starts at zero, exactly as a matrix, up to rounding in the
factored product), not the rebuilt ``U_h S_h V_h + U_l S_l V_l`` of earlier peft versions.

Options are peft ``OSFConfig`` fields: ``effective_rank`` (the *preserved* rank: an integer >= 1,
or a fraction in (0, 1) of ``min(m, n)`` per matrix; default peft's ``min(m, n) // 2``),
``target_modules`` (names, or ``all-linear``; default peft's per-architecture list, q/k/v/o/
gate/up/down for Llama-like models, else every linear layer) and ``rank_pattern`` (regex ->
rank, as ``effective_rank``); conpet's ``lr`` is the learning rate of the OSF parameters,
default 3e-5 (``null``: ``train.lr``). OSF trains full-rank subspaces of the weights, so it
wants a full fine-tuning rate, not LoRA's 1e-3 (peft's example: 5e-6 on Llama-3.1-8B). The
default was chosen on the *dev* split of SmolLM2 on ``wordnet-typing`` tasks 1-3 (accuracy after
task 1 / task 3: 1e-3 27.6 / 8.3, the model broken; 1e-4 86.2 / 22.9; 3e-5 93.1 / 22.4; 1e-5
79.3 / 22.4). OSF sits on the linear layers *inside the transformer blocks*
(the names become a regex over the scoped layers: peft's OSF has no ``layers_to_transform``).

Trainable per target: ``(m + n + 1) (min(m, n) - k)`` for a preserved rank ``k`` (U, S and V of
the trainable part). peft dispatches only ``nn.Linear`` (no quantized weights, no GPT-2
``Conv1D``). The continual recipe (merge after each task, re-decompose, preserve more) is the
``osf`` learner (:mod:`conpet.learners.osf`).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from conpet.errors import ConfigError
from conpet.pet.base import register_pet
from conpet.pet.peft_backed import PeftBacked, layer_regex, linear_module_names


def check_preserved_rank(key: str, value: Any) -> None:
    """A preserved rank: an integer >= 1 or a fraction in (0, 1) of ``min(m, n)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"pet.options.{key}: must be an integer >= 1 or a fraction in (0, 1), got {value!r}")
    if isinstance(value, int) and value < 1:
        raise ConfigError(f"pet.options.{key}: a preserved rank must be >= 1 (peft rejects 0), got {value!r}")
    if isinstance(value, float) and not 0.0 < value < 1.0:
        raise ConfigError(f"pet.options.{key}: a fraction must be in (0, 1) (1.0 would preserve everything and "
                          f"leave nothing to train; give an integer for an absolute rank), got {value!r}")


@register_pet("osf")
class OSF(PeftBacked):
    """OSF via peft: the low singular subspace of each weight trains, the top one is preserved."""

    paper = "Nayak et al. 2025, Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning"
    routes_per_row = False  # peft's OSF layer runs the first active adapter for every row
    default_lr = 3e-5
    supports_kbit = False  # peft dispatches OSF to nn.Linear only

    def config_class(self):
        from peft import OSFConfig

        return OSFConfig

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = super().check_options(options)
        if options.get("effective_rank") is not None:
            check_preserved_rank("effective_rank", options["effective_rank"])
        pattern = options.get("rank_pattern")
        if pattern is not None:
            if not isinstance(pattern, dict):
                raise ConfigError(f"pet.options.rank_pattern: a mapping regex -> rank, got {pattern!r}")
            for regex, rank in pattern.items():
                try:
                    re.compile(str(regex))
                except re.error as e:
                    raise ConfigError(f"pet.options.rank_pattern: bad regex {regex!r}: {e}") from None
                check_preserved_rank(f"rank_pattern.{regex}", rank)
        targets = options.get("target_modules")
        if isinstance(targets, str) and targets != "all-linear" and self.scope is not None:
            raise ConfigError("pet.options.target_modules: a regex cannot be confined to train.top_layers; give a "
                              "list of names (or all-linear), or train.top_layers: null")
        return options

    def peft_options(self, model: nn.Module) -> dict[str, Any]:
        """``target_modules`` as a regex over the linear layers of the (scoped) transformer blocks;
        a user's own regex is kept as it is (no scope)."""
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING as TARGETS

        options = dict(self.options)
        targets = options.get("target_modules")
        if isinstance(targets, str) and targets != "all-linear":
            return options
        if targets is None:
            config = getattr(model, "config", None)
            targets = TARGETS.get(getattr(config, "model_type", None))
        if targets is None or targets == "all-linear":
            targets = linear_module_names(model)
        options["target_modules"] = layer_regex(self.scope, [re.escape(n) for n in targets])
        return options

    def attach(self, model, name, calibration=None):
        wrapped = super().attach(model, name, calibration)
        if not self.count(wrapped, name):
            raise ConfigError(f"pet 'osf': the preserved rank leaves nothing to train (effective_rank "
                              f"{self.options.get('effective_rank')!r} reaches min(m, n) of every target)")
        return wrapped

    def expected_count(self, model: nn.Module) -> int:
        """``(m + n + 1) (min(m, n) - k)`` per target, from the base weights and the preserved ranks."""
        name = next(iter(model.peft_config))
        total = 0
        for _, layer in self.tuner_layers(model, name):
            m, n = layer.get_base_layer().weight.shape
            total += (m + n + 1) * (min(m, n) - layer.effective_rank[name])
        return total

    def delta_weights(self, model: nn.Module, name: str):
        """``U_l S_l V_l - U_l0 S_l0 V_l0`` per targeted weight (peft's ``get_delta_weight``)."""
        return {f"{path}.weight": layer.get_delta_weight(name).detach()
                for path, layer in self.tuner_layers(model, name)}
