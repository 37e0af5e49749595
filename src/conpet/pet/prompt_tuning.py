"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning")
via peft: ``num_virtual_tokens`` (default 20) trainable input embeddings prepended to every
input. Trainable: ``num_virtual_tokens x hidden``."""

from __future__ import annotations


from conpet.pet.base import register_pet
from conpet.pet.prompt_learning import PromptLearning


@register_pet("prompt_tuning")
class PromptTuning(PromptLearning):
    """Soft prompt tuning via peft."""

    paper = "Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning"

    def config_class(self):
        from peft import PromptTuningConfig

        return PromptTuningConfig

    def expected_count(self, model):
        c = next(iter(model.peft_config.values()))
        return c.num_virtual_tokens * c.token_dim
