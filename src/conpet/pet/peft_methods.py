"""PET methods backed by peft's public API (one adapter per module name, peft's file format)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

from conpet.errors import ConfigError
from conpet.pet.base import PETMethod, in_module, register_pet


class PeftBacked(PETMethod):
    """Shared plumbing: subclasses only say how to build the peft config."""

    def peft_config(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _config(self):
        try:
            return self.peft_config()
        except TypeError as e:
            raise ConfigError(f"pet.options: {e} (options of '{self.name}': see peft's config)") from None
        except ValueError as e:
            raise ConfigError(f"pet.options: {e}") from None

    def attach(self, model: nn.Module, name: str) -> nn.Module:
        from peft import get_peft_model

        try:
            wrapped = get_peft_model(model, self._config(), adapter_name=name)
        except ValueError as e:
            raise ConfigError(f"pet.options for '{self.name}': {e}") from None
        self.activate(wrapped, name)
        return wrapped

    def attach_from(self, model: nn.Module, folder: Path, name: str) -> nn.Module:
        from peft import PeftModel

        wrapped = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=False)
        self.activate(wrapped, name)
        return wrapped

    def add(self, model: nn.Module, name: str) -> None:
        model.add_adapter(name, self._config())

    def activate(self, model: nn.Module, name: str) -> None:
        model.set_adapter(name)

    def tensors(self, model: nn.Module, name: str) -> list[nn.Parameter]:
        """Parameters of module ``name`` (peft puts the adapter name in every parameter path)."""
        return [p for n, p in model.named_parameters() if in_module(n, name)]

    def parameters(self, model: nn.Module, name: str) -> list[nn.Parameter]:
        params = self.tensors(model, name)
        for p in params:
            p.requires_grad_(True)
        return params

    def count(self, model: nn.Module, name: str) -> int:
        return sum(p.numel() for p in self.tensors(model, name))

    def save(self, model: nn.Module, name: str, folder: Path) -> None:
        model.save_pretrained(str(folder), selected_adapters=[name])
        inner = folder / name
        if name != "default" and inner.is_dir():  # peft nests non-default adapters
            for f in inner.iterdir():
                shutil.move(str(f), str(folder / f.name))
            inner.rmdir()

    def load(self, model: nn.Module, folder: Path, name: str) -> None:
        model.load_adapter(str(folder), adapter_name=name, is_trainable=True)

    def remove(self, model: nn.Module, name: str) -> None:
        model.delete_adapter(name)

    def detach(self, model: nn.Module) -> nn.Module:
        return model.unload()


@register_pet("lora")
class LoRA(PeftBacked):
    """LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") via peft.

    Options are peft ``LoraConfig`` fields; defaults: ``r=8, lora_alpha=16, lora_dropout=0.0``,
    ``target_modules`` = peft's default for the architecture (query/value projections).
    ``use_rslora`` and ``use_dora`` switch on rsLoRA and DoRA.
    """

    paper = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models"
    defaults: dict[str, Any] = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(**{**self.defaults, **self.options})
