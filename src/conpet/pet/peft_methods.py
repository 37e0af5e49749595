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
        self._skip_input_casts(wrapped)
        self.activate(wrapped, name)
        return wrapped

    def _skip_input_casts(self, model: nn.Module) -> None:
        """Under bf16 autocast, peft's cast of each LoRA input to the adapter's fp32 dtype is
        undone by autocast right after (bf16 -> fp32 -> bf16, exact both ways): skip it. Same
        numbers, fewer copies (peft's own ``disable_input_dtype_casting``, made permanent)."""
        if self.bf16_autocast:
            for m in model.modules():
                if hasattr(m, "cast_input_dtype_enabled"):
                    m.cast_input_dtype_enabled = False

    def attach_from(self, model: nn.Module, folder: Path, name: str) -> nn.Module:
        from peft import PeftModel

        with readable_folder(folder) as plain:
            wrapped = PeftModel.from_pretrained(model, str(plain), adapter_name=name, is_trainable=False)
        self._skip_input_casts(wrapped)
        self.activate(wrapped, name)
        return wrapped

    def add(self, model: nn.Module, name: str) -> None:
        model.add_adapter(name, self._config())
        self._skip_input_casts(model)

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
        self._skip_input_casts(model)

    def modules(self, model: nn.Module) -> list[str]:
        return list(getattr(model, "peft_config", {}))

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


@register_pet("ia3")
class IA3(PeftBacked):
    """(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
    than In-Context Learning") via peft: learned vectors rescale keys, values and the feed-forward
    activations. Options are peft ``IA3Config`` fields (defaults: peft's per-architecture targets).
    Trainable: the sizes of the rescaled activations (k, v outputs and the feed-forward input)."""

    paper = "Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"
    routes_per_row = False

    def peft_config(self):
        from peft import IA3Config

        return IA3Config(**self.options)


@register_pet("ln_tuning")
class LNTuning(PeftBacked):
    """LN tuning (Qi et al. 2022, "Parameter-Efficient Tuning on Layer Normalization for
    Pre-trained Language Models") via peft: only the LayerNorm / RMSNorm weights (and biases)
    train. With ``train.top_layers`` only the norms of the top layers are tuned."""

    paper = "Qi et al. 2022, Parameter-Efficient Tuning on Layer Normalization for Pre-trained Language Models"
    routes_per_row = False

    def resolve_options(self, model: nn.Module) -> None:
        layers = self.options.pop("layers_to_transform", None)
        pattern = self.options.pop("layers_pattern", None)
        if "target_modules" not in self.options:  # every norm inside the transformer blocks
            idx = "|".join(str(i) for i in layers) if layers is not None else r"\d+"
            where = rf"{pattern}\." if pattern else ""
            self.options["target_modules"] = rf".*\.{where}({idx})\..*(norm|LayerNorm)[^.]*$"

    def peft_config(self):
        from peft import LNTuningConfig

        options = {k: v for k, v in self.options.items() if k not in ("layers_to_transform", "layers_pattern")}
        return LNTuningConfig(**options)
