"""The PET interface: attach named modules to a frozen backbone, train, save, load, detach.

A learner never touches a PET method's internals; it asks for:

- ``attach(model, name)``: wrap the frozen backbone with a first module called ``name``;
- ``add(model, name)``: add another module (one per task, a selector...) to the same backbone;
- ``activate(model, name)``: route the forward pass through module ``name``;
- ``parameters(model, name)``: the tensors to optimize;
- ``save(model, name, folder)`` / ``load(model, folder, name)``;
- ``detach(model)``: give the untouched backbone back.

Methods register with ``@register_pet("name")`` and are built by :func:`get_pet`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from conpet.errors import ConfigError, ModelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")


def check_safe_folder(folder: Path) -> None:
    """Refuse a saved module folder holding pickled files: conpet reads only safetensors and JSON
    (unpickling runs arbitrary code)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such adapter folder")
    unsafe = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    if unsafe:
        raise ModelError(f"{folder}: refusing to load pickled file(s) {', '.join(unsafe)}; conpet reads only "
                         f".safetensors and .json")
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"{folder}: no .safetensors weights in the adapter folder")


def check_binding(folder: Path, fingerprint: str, backbone_desc: str) -> None:
    """Refuse a module saved on another base model (its ``conpet.json`` records the base's fingerprint)."""
    import json

    meta_file = Path(folder) / "conpet.json"
    if not meta_file.is_file():
        return
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    saved = meta.get("backbone_fingerprint")
    if saved and saved != fingerprint:
        raise ModelError(f"{folder}: this adapter was trained on base model {meta.get('backbone_path', '?')} "
                         f"(fingerprint {saved}), not on {backbone_desc} (fingerprint {fingerprint}); "
                         f"refusing to load it onto a different base")

PET_METHODS: dict[str, type["PETMethod"]] = {}


def in_module(param_name: str, module: str) -> bool:
    """Whether a parameter path belongs to module ``module`` (peft puts the adapter name in it)."""
    return f".{module}." in param_name or param_name.endswith(f".{module}")


def register_pet(name: str) -> Callable[[type["PETMethod"]], type["PETMethod"]]:
    def wrap(cls: type["PETMethod"]) -> type["PETMethod"]:
        cls.name = name
        PET_METHODS[name] = cls
        return cls

    return wrap


class PETMethod(ABC):
    name: ClassVar[str] = "?"
    paper: ClassVar[str] = ""
    routes_per_row: ClassVar[bool] = True
    """Whether one forward pass can route each row through its own module (``adapter_names``)."""
    input_level: ClassVar[bool] = False
    """Whether the method changes the input embeddings or prepends virtual tokens (prompt family):
    such a module needs the whole forward pass, so ``train.top_layers`` (which caches the lower
    layers without PET) cannot be used with it."""
    bf16_autocast: bool = False
    """Set by the runner when training and prediction run under bf16 autocast: a method may then
    skip dtype round trips that autocast makes redundant (peft's input casting)."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = dict(options or {})
        self.calibration: Callable[[nn.Module, int], None] | None = None
        """Set by the runner before each task: ``calibration(model, max_rows)`` runs ``model``
        (no gradient) on rows of that task, for data-aware initialisations (CorDA)."""

    @abstractmethod
    def attach(self, model: nn.Module, name: str) -> nn.Module:
        """Wrap ``model`` with a first module ``name``; return the wrapped model."""

    @abstractmethod
    def attach_from(self, model: nn.Module, folder: Path, name: str) -> nn.Module:
        """Wrap ``model`` with a saved module loaded from ``folder`` under the name ``name``."""

    @abstractmethod
    def add(self, model: nn.Module, name: str) -> None:
        """Add a fresh module ``name`` to an already wrapped model."""

    @abstractmethod
    def activate(self, model: nn.Module, name: str) -> None:
        """Make ``name`` the module used by the forward pass."""

    @abstractmethod
    def parameters(self, model: nn.Module, name: str) -> list[nn.Parameter]:
        """Trainable tensors of module ``name``."""

    @abstractmethod
    def save(self, model: nn.Module, name: str, folder: Path) -> None:
        """Write module ``name`` into ``folder`` (which exists and is empty)."""

    @abstractmethod
    def load(self, model: nn.Module, folder: Path, name: str) -> None:
        """Load a saved module from ``folder`` under the name ``name``."""

    @abstractmethod
    def modules(self, model: nn.Module) -> list[str]:
        """Names of the modules attached to ``model``, in creation order."""

    @abstractmethod
    def remove(self, model: nn.Module, name: str) -> None:
        """Delete module ``name``."""

    @abstractmethod
    def detach(self, model: nn.Module) -> nn.Module:
        """Remove every module and return the unchanged backbone."""

    def step_hook(self, model: nn.Module, name: str, total_steps: int | None = None) -> Callable[[int], None] | None:
        """Called after every optimizer step (gradients still present) while module ``name`` trains
        a fit of ``total_steps`` steps (sparse regrowth, LISA's layer sampling, AdaLoRA's rank
        budget...); ``None`` for most methods."""
        return None

    def param_groups(self, model: nn.Module, name: str, lr: float) -> list[dict]:
        """Optimizer groups of module ``name`` at the run's learning rate ``lr``; a method with
        its own learning rates (DePT's two, the prompt family's) overrides this."""
        return [{"params": self.parameters(model, name), "lr": lr}]

    def extra_loss(self, model: nn.Module, name: str) -> torch.Tensor | None:
        """A regulariser added to the training loss of module ``name`` (AdaLoRA's orthogonality
        penalty); ``None`` for most methods."""
        return None

    def delta_weights(self, model: nn.Module, name: str) -> dict[str, torch.Tensor] | None:
        """The dense update module ``name`` makes to the backbone's own parameters, keyed by their
        names in the unwrapped backbone (``layers.3.self_attn.q_proj.weight``): adding it to a
        copy of the backbone gives the module's function (tested). ``None`` where the method is
        not an update of existing weights (adapters, prompts, routed experts, DoRA)."""
        return None

    def copy(self, model: nn.Module, src: str, dst: str) -> None:
        """Create (or overwrite) module ``dst`` as a frozen copy of module ``src``."""
        names = dict(model.named_parameters())
        if not any(in_module(n, dst) for n in names):
            self.add(model, dst)
            self.activate(model, src)
            names = dict(model.named_parameters())
        copied = 0
        for n, p in names.items():
            if in_module(n, src):
                target = n.replace(f".{src}.", f".{dst}.") if f".{src}." in n else n[: -len(src)] + dst
                with torch.no_grad():
                    names[target].copy_(p)
                names[target].requires_grad_(False)
                copied += 1
        if not copied:
            raise ValueError(f"module '{src}' has no parameters to copy")

    def count(self, model: nn.Module, name: str) -> int:
        return sum(p.numel() for p in self.parameters(model, name))


def get_pet_class(method: str) -> type[PETMethod]:
    import conpet.pet  # noqa: F401  (registers the methods)

    if method not in PET_METHODS:
        raise ConfigError(f"pet.method: unknown PET method '{method}' (available: {', '.join(sorted(PET_METHODS))})")
    return PET_METHODS[method]


def get_pet(method: str, options: dict[str, Any] | None = None) -> PETMethod:
    return get_pet_class(method)(options)
