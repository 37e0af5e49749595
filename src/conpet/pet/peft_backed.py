"""Shared plumbing of the PET methods backed by peft's public API: one peft adapter per module
name, peft's own file format, ComPEFT-compressed folders read transparently.

A subclass says which peft config class it builds (:meth:`PeftBacked.config_class`) and how the
layer scope becomes config fields (:meth:`PeftBacked.peft_options`); options are checked against
that config's fields when the method is built.

peft (and through it transformers) is imported where it is used, not at module level: listing
methods, ``--help`` and config errors stay instant (peft takes seconds to import).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from conpet.compress import decompress_lora_folder, is_compressed
from conpet.errors import ConfigError
from conpet.pet.base import Calibration, LayerScope, PETMethod, check_known, check_positive_number, in_module
from conpet.runs import check_safe_folder

SCOPE_KEYS = ("layers_to_transform", "layers_pattern")
"""peft fields that ``train.top_layers`` owns when the engine confines PET to the top layers."""


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct short names of the linear layers inside the transformer blocks (what peft's
    ``all-linear`` targets), e.g. ``[down_proj, gate_proj, k_proj, ...]``."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's blocks: a linear layer stored transposed

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, Conv1D)) and re.search(r"\.\d+\.", n)}
    if not names:
        raise ConfigError("pet.options: target_modules 'all-linear' found no linear layer in the backbone's blocks")
    return sorted(names)


def layer_regex(scope, names) -> str:
    """A regex over module paths: modules named ``names`` inside the scoped layers (every block
    without a scope)."""
    idx = "|".join(str(i) for i in scope.layers) if scope is not None else r"\d+"
    where = rf"{scope.pattern}\." if scope is not None else ""
    return rf"(.*\.)?{where}({idx})\..*({'|'.join(names)})$"


@contextlib.contextmanager
def readable_folder(folder: Path) -> Iterator[Path]:
    """``folder`` itself, checked to hold no pickle; a ComPEFT-compressed folder
    (:func:`conpet.compress.compress_lora_folder`) is decompressed into a temporary peft folder."""
    folder = Path(folder)
    if is_compressed(folder):
        with tempfile.TemporaryDirectory(prefix="conpet-decompressed-") as tmp:
            decompress_lora_folder(folder, Path(tmp))
            yield Path(tmp)
        return
    check_safe_folder(folder)
    yield folder


@contextlib.contextmanager
def peft_deprecations_hidden() -> Iterator[None]:
    """Hide the FutureWarning transformers 5 raises when peft reads the deprecated
    ``is_gradient_checkpointing`` while wrapping a model: peft's call, not the user's, and
    printed once per module (the CLI hides all FutureWarnings; a library user saw this one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


class PeftBacked(PETMethod):
    """One peft adapter per module name. Subclasses give :meth:`config_class` and, where the
    scope or the backbone changes the config, :meth:`peft_options`."""

    supports_kbit = True
    """peft puts this method's layers on bitsandbytes weights (``backbone.quantize``)."""

    load_trainable: bool = True
    """Whether peft loads a module as trainable (peft refuses it for prompt adapters and for a
    second trainable AdaLoRA module; :meth:`parameters` turns training on either way)."""
    fixed_fields: dict[str, Any] = {}
    """Config fields the method sets itself, not options (the prompt family's ``task_type``)."""
    default_lr: float | None = None
    """A method that trains at its own learning rate sets this; it then takes the option ``lr``
    (``null``: the run's ``train.lr``), which is conpet's, not peft's."""

    def __init__(self, options: dict[str, Any] | None = None, *, scope: LayerScope | None = None,
                 precision: str = "fp32") -> None:
        options = dict(options or {})
        self.lr = None if self.default_lr is None else \
            check_positive_number("lr", options.pop("lr", self.default_lr), nullable=True)
        """The method's own learning rate (None: the run's ``train.lr``)."""
        super().__init__(options, scope=scope, precision=precision)

    def param_groups(self, model: nn.Module, name: str, lr: float) -> list[dict]:
        return [{"params": self.parameters(model, name), "lr": float(self.lr or lr)}]

    def config_class(self) -> type:  # pragma: no cover - abstract
        raise NotImplementedError

    def config_fields(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self.config_class())} - {"peft_type", "task_type"}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        check_known(self.name, options, self.config_fields())
        if self.scope is not None:
            for key in SCOPE_KEYS:
                if key in options:
                    raise ConfigError(f"pet.options.{key}: set by train.top_layers here; give train.top_layers: "
                                      f"null to place the module yourself")
        options = {**self.defaults, **options}
        self.build_config(self.validation_options(options))  # values checked now, not at attach time
        return options

    def validation_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options as peft sees them before a backbone is known (a subclass replaces what
        only the backbone settles by a stand-in)."""
        return options

    def build_config(self, options: dict[str, Any]):
        try:
            return self.config_class()(**self.fixed_fields, **options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"pet.options for '{self.name}': {e}") from None

    def peft_options(self, model: nn.Module) -> dict[str, Any]:
        """The peft config's fields for this backbone and scope (default: the options as given)."""
        return dict(self.options)

    def peft_config(self, model: nn.Module):
        """The peft config of a new module; what depends on the backbone is settled on the plain
        backbone at the first attach and kept for every later module."""
        if getattr(self, "_resolved", None) is None:
            self._resolved = self.peft_options(model)
        return self.build_config(dict(self._resolved))

    # -- the interface --------------------------------------------------------------------------------
    def attach(self, model: nn.Module, name: str, calibration: Calibration | None = None) -> nn.Module:
        from peft import get_peft_model

        try:
            with peft_deprecations_hidden():
                wrapped = get_peft_model(model, self.peft_config(model), adapter_name=name)
        except ValueError as e:
            raise ConfigError(f"pet.options for '{self.name}': {e}") from None
        self._skip_input_casts(wrapped)
        self.activate(wrapped, name)
        self.initialise(wrapped, name, calibration)
        return wrapped

    def initialise(self, model: nn.Module, name: str, calibration: Calibration | None) -> None:
        """Data-aware start of a new module ``name`` (CorDA, prefix tuning), run after peft built
        it; a no-op for peft's own initialisations and without calibration rows (a module about
        to be overwritten by saved values)."""

    def _skip_input_casts(self, model: nn.Module) -> None:
        """Under bf16 autocast, peft's cast of each LoRA input to the adapter's fp32 dtype is
        undone by autocast right after (bf16 -> fp32 -> bf16, exact both ways): skip it. Same
        numbers, fewer copies (peft's own ``disable_input_dtype_casting``, made permanent)."""
        if self.precision == "bf16":
            for m in model.modules():
                if hasattr(m, "cast_input_dtype_enabled"):
                    m.cast_input_dtype_enabled = False

    def attach_from(self, model: nn.Module, folder: Path, name: str) -> nn.Module:
        from peft import PeftModel

        with readable_folder(folder) as plain:
            with peft_deprecations_hidden():
                wrapped = PeftModel.from_pretrained(model, str(plain), adapter_name=name, is_trainable=False)
        self._skip_input_casts(wrapped)
        self.activate(wrapped, name)
        return wrapped

    def add(self, model: nn.Module, name: str, calibration: Calibration | None = None) -> None:
        model.add_adapter(name, self.peft_config(model))
        self._skip_input_casts(model)
        self.initialise(model, name, calibration)

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
            model.load_adapter(str(plain), adapter_name=name, is_trainable=self.load_trainable)
        self._skip_input_casts(model)

    def modules(self, model: nn.Module) -> list[str]:
        return list(getattr(model, "peft_config", {}))

    def tuner_layers(self, model: nn.Module, name: str):
        """(backbone path, peft tuner layer) of every layer module ``name`` touches."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for path, m in model.named_modules():
            if isinstance(m, BaseTunerLayer) and name in getattr(m, m.adapter_layer_names[0], {}):
                yield path.removeprefix("base_model.model."), m

    def remove(self, model: nn.Module, name: str) -> None:
        model.delete_adapter(name)

    def detach(self, model: nn.Module) -> nn.Module:
        return model.unload()
