"""DePT (Shi & Lipani, ICLR 2024, "DePT: Decomposed Prompt Tuning for Parameter-Efficient
Fine-tuning"; official code ``ZhengxiangShi/DePT``, ``peft/tuners/prompt_tuning_lora.py``).

A soft prompt shorter than vanilla prompt tuning's, plus a low-rank update of the frozen input
embeddings, trained with two learning rates:

- ``P`` (``prompt_length x d``) is prepended to every input (its attention mask is 1);
- the input token embeddings ``E`` (``L x d``, position ``i`` of the input) become
  ``E + (alpha / sqrt(r)) * A[:L] B`` with ``A`` (``max_length x r``, Kaiming-uniform init) and
  ``B`` (``r x d``, zero init), so the module starts as plain prompt tuning;
- the prompt trains at ``prompt_lr``, ``A`` and ``B`` at ``lowrank_lr``.

Defaults: the paper's ``prompt_length=60, r=30, alpha=8, max_length=256``. Deviations, named: the
paper's learning rates (prompt 3e-1, low rank 5e-3 to 3e-1) were tuned for T5, whose embeddings
are two orders of magnitude larger than a Llama's; conpet's defaults are ``prompt_lr=3e-2``
(peft's prompt-tuning examples for decoder models) and ``lowrank_lr = train.lr``. The prompt is
initialised from the embeddings of randomly drawn vocabulary tokens (the sampled-vocabulary
initialisation of Lester et al. 2021) rather than from T5's first 5000 tokens.

Works with every learner: several named DePT modules live on one backbone (one active at a time;
the dynamic learner groups rows by module). Saved in conpet's own format (``pet_config.json`` +
``pet_model.safetensors``, see :mod:`conpet.pet.sites`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from conpet.errors import ModelError
from conpet.pet.base import Calibration, check_positive_int, check_positive_number, in_module, register_pet
from conpet.pet.sites import InjectedPET


class DePTPart(nn.Module):
    def __init__(self, prompt: torch.Tensor, max_length: int, r: int) -> None:
        super().__init__()
        d = prompt.shape[1]
        self.prompt = nn.Parameter(prompt.clone())
        self.lora_embedding_A = nn.Parameter(torch.empty(max_length, r))
        nn.init.kaiming_uniform_(self.lora_embedding_A, a=math.sqrt(5))
        self.lora_embedding_B = nn.Parameter(torch.zeros(r, d))


class DePTModel(nn.Module):
    """The backbone behind an input stage that applies the active DePT module."""

    def __init__(self, base_model: nn.Module, method: "DePT") -> None:
        super().__init__()
        self.base_model = base_model
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "sites", {})
        self.parts = nn.ModuleDict()
        self.peft_config: dict[str, dict] = {}
        self.active: str | None = None

    @property
    def config(self):
        return self.base_model.config

    def add_adapter(self, name: str) -> None:
        if name in self.peft_config:
            raise ValueError(f"module '{name}' exists already")
        o = self.method.options
        embeddings = self.base_model.get_input_embeddings().weight
        rows = torch.randint(0, embeddings.shape[0], (int(o["prompt_length"]),))
        part = DePTPart(embeddings.detach()[rows.to(embeddings.device)].float().cpu(), int(o["max_length"]), int(o["r"]))
        self.parts[name] = part.to(embeddings.device)  # drawn on the CPU: the same module on every device
        self.peft_config[name] = dict(o)

    def set_adapter(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"no module '{name}'")
        self.active = name
        for n, p in self.parts.named_parameters():
            p.requires_grad_(in_module(n, name))

    def delete_adapter(self, name: str) -> None:
        del self.parts[name]
        del self.peft_config[name]
        if self.active == name:
            self.active = next(iter(self.peft_config), None)

    def unload(self) -> nn.Module:
        return self.base_model

    def forward(self, input_ids=None, attention_mask=None, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is not None and len(set(adapter_names)) > 1:
            raise ValueError("DePT routes one module per batch (routes_per_row is False)")
        name = adapter_names[0] if adapter_names else self.active
        if name is None:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        part = self.parts[name]
        embeds = self.base_model.get_input_embeddings()(input_ids)
        length = embeds.shape[1]
        if length > part.lora_embedding_A.shape[0]:
            raise ModelError(f"DePT: input of {length} tokens is longer than the module's max_length "
                             f"{part.lora_embedding_A.shape[0]} (pet.options.max_length)")
        scale = float(self.method.options["alpha"]) / math.sqrt(int(self.method.options["r"]))
        embeds = embeds + scale * (part.lora_embedding_A[:length] @ part.lora_embedding_B).to(embeds.dtype)
        prompt = part.prompt.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        embeds = torch.cat([prompt, embeds], dim=1)
        if attention_mask is not None:
            ones = torch.ones(attention_mask.shape[0], prompt.shape[1], dtype=attention_mask.dtype,
                              device=attention_mask.device)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        return self.base_model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


@register_pet("dept")
class DePT(InjectedPET):
    paper = "Shi & Lipani 2024, DePT: Decomposed Prompt Tuning for Parameter-Efficient Fine-tuning"
    input_level = True
    routes_per_row = False
    defaults: dict[str, Any] = {"prompt_length": 60, "r": 30, "alpha": 8, "max_length": 256,
                                "prompt_lr": 3e-2, "lowrank_lr": None}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = super().check_options(options)
        for key in ("prompt_length", "r", "max_length"):
            check_positive_int(key, options[key])
        for key in ("prompt_lr", "lowrank_lr"):
            check_positive_number(key, options[key], nullable=key == "lowrank_lr")
        return options

    def attach(self, model: nn.Module, name: str, calibration: Calibration | None = None) -> nn.Module:
        wrapped = DePTModel(model, self)
        wrapped.add_adapter(name)
        wrapped.set_adapter(name)
        return wrapped

    def param_groups(self, model: nn.Module, name: str, lr: float) -> list[dict]:
        tensors = self.tensors(model, name)
        for p in tensors.values():
            p.requires_grad_(True)
        prompt = [p for n, p in tensors.items() if n.endswith(".prompt")]
        lowrank = [p for n, p in tensors.items() if not n.endswith(".prompt")]
        return [{"params": prompt, "lr": float(self.options["prompt_lr"] or lr)},
                {"params": lowrank, "lr": float(self.options["lowrank_lr"] or lr)}]

    def expected_count(self, model: nn.Module) -> int:
        o = self.options
        d = model.base_model.get_input_embeddings().weight.shape[1]
        return o["prompt_length"] * d + o["max_length"] * o["r"] + o["r"] * d
