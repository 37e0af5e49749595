"""PET methods backed by peft's public API (one adapter per module name, peft's file format)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from conpet.errors import ConfigError
from conpet.pet.base import PETMethod, check_safe_folder, in_module, register_pet


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct short names of the linear layers inside the transformer blocks (what peft's
    ``all-linear`` targets), e.g. ``[down_proj, gate_proj, k_proj, ...]``."""
    import re

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and re.search(r"\.\d+\.", n)}
    if not names:
        raise ConfigError("pet.options: target_modules 'all-linear' found no linear layer in the backbone's blocks")
    return sorted(names)


@contextlib.contextmanager
def readable_folder(folder: Path):
    """``folder`` itself, checked to hold no pickle; a ComPEFT-compressed folder
    (:func:`conpet.adapters.compress_lora_folder`) is decompressed into a temporary peft folder."""
    from conpet.adapters import decompress_lora_folder, is_compressed

    folder = Path(folder)
    if is_compressed(folder):
        with tempfile.TemporaryDirectory(prefix="conpet-decompressed-") as tmp:
            decompress_lora_folder(folder, Path(tmp))
            yield Path(tmp)
        return
    check_safe_folder(folder)
    yield folder


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

    def resolve_options(self, model: nn.Module) -> None:
        """Options that depend on the backbone, settled once before the first module is built."""

    def attach(self, model: nn.Module, name: str) -> nn.Module:
        from peft import get_peft_model

        self.resolve_options(model)
        try:
            wrapped = get_peft_model(model, self._config(), adapter_name=name)
        except ValueError as e:
            raise ConfigError(f"pet.options for '{self.name}': {e}") from None
        self.activate(wrapped, name)
        return wrapped

    def attach_from(self, model: nn.Module, folder: Path, name: str) -> nn.Module:
        from peft import PeftModel

        with readable_folder(folder) as plain:
            wrapped = PeftModel.from_pretrained(model, str(plain), adapter_name=name, is_trainable=False)
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
        with readable_folder(folder) as plain:
            model.load_adapter(str(plain), adapter_name=name, is_trainable=True)

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

    def resolve_options(self, model: nn.Module) -> None:
        # peft refuses the string "all-linear" together with layers_to_transform (the fast path of
        # train.top_layers); spell it out as the names of the backbone's linear layers instead.
        if self.options.get("target_modules") == "all-linear" and self.options.get("layers_to_transform") is not None:
            self.options["target_modules"] = linear_module_names(model)

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(**{**self.defaults, **self.options})
