"""Shared plumbing of prompt tuning, prefix tuning and P-tuning through peft's prompt learning
(``FEATURE_EXTRACTION`` task type): virtual tokens are prepended to every input (prefix tuning:
to every layer's keys and values), so the cloze position moves by their number
(:func:`conpet.backbone.cloze_features` reads it from the output length). These methods act at
the input, so they cannot be confined to the top layers (``train.top_layers: auto`` resolves to
every layer for them; an explicit number is an error).

``lr`` is the learning rate of the virtual tokens, default 3e-2 for prompt and prefix tuning
(peft's prompt-learning examples; soft prompts want a larger rate than LoRA's ``train.lr``) and
1e-3 for P-tuning, whose prompt encoder is an MLP (peft's P-tuning guide; at 3e-2 it diverges as
soon as replay adds steps); ``lr: null`` uses ``train.lr``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from conpet.pet.peft_backed import PeftBacked


class PromptLearning(PeftBacked):
    input_level = True
    routes_per_row = False
    load_trainable = False
    defaults: dict[str, Any] = {"num_virtual_tokens": 20}
    fixed_fields = {"task_type": "FEATURE_EXTRACTION"}
    default_lr: float = 3e-2

    def detach(self, model: nn.Module) -> nn.Module:
        return model.get_base_model()  # peft leaves the backbone's own modules untouched here

    def expected_count(self, model: nn.Module) -> int:  # pragma: no cover - abstract
        """Trainable parameters from the method's formula (``model`` wrapped; peft's resolved config)."""
        raise NotImplementedError
