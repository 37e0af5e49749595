"""P-tuning (Liu et al. 2021, "GPT Understands, Too") via peft: virtual-token embeddings produced
by a prompt encoder (an MLP by default, ``encoder_reparameterization_type: LSTM`` for the paper's
LSTM). Trainable (MLP): ``tokens x d + d h + h + h h + h + h d + d`` with ``h =
encoder_hidden_size`` (default 128). Learning rate 1e-3 by default (see
:mod:`conpet.pet.prompt_learning`)."""

from __future__ import annotations

from typing import Any


from conpet.pet.base import register_pet
from conpet.pet.prompt_learning import PromptLearning


@register_pet("p_tuning")
class PTuning(PromptLearning):
    """Prompt-encoder virtual tokens via peft."""

    paper = "Liu et al. 2021, GPT Understands, Too"
    defaults: dict[str, Any] = {"num_virtual_tokens": 20, "encoder_hidden_size": 128}
    default_lr = 1e-3

    def config_class(self):
        from peft import PromptEncoderConfig

        return PromptEncoderConfig

    def expected_count(self, model):
        c = next(iter(model.peft_config.values()))
        d, h = c.token_dim, c.encoder_hidden_size
        if str(c.encoder_reparameterization_type).upper().endswith("MLP"):
            return c.num_virtual_tokens * d + d * h + h + h * h + h + h * d + d
        raise NotImplementedError("formula given for the MLP encoder only")
