"""The PET interface: attach named modules to a frozen backbone, train, save, load, detach.

A learner never touches a PET method's internals; it asks for:

- ``attach(model, name, calibration)``: wrap the frozen backbone with a first module ``name``;
- ``add(model, name, calibration)``: add another module (one per task, a selector...);
- ``activate(model, name)``: route the forward pass through module ``name``;
- ``parameters(model, name)``: the tensors to optimize;
- ``save(model, name, folder)`` / ``load(model, folder, name)``;
- ``detach(model)``: give the untouched backbone back.

Everything a method needs is given when it is built: its options (checked right there, so a
misspelt option fails before anything is written or loaded), the :class:`LayerScope` it is
confined to (``train.top_layers``, decided once by :mod:`conpet.build`) and the run's precision.
Data-aware initialisations receive a *calibration* function with each new module.

Methods register with ``@register_pet("name")``; one file per method in this folder.
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from conpet.errors import ConfigError, choices_hint

Calibration = Callable[[nn.Module, int], None]
"""``calibration(model, max_rows)`` runs ``model`` (no gradient) on up to ``max_rows`` training
rows of the task a new module is for (CorDA's covariances, prefix tuning's real tokens)."""

StepHook = Callable[[int], None]

PET_METHODS: dict[str, type["PETMethod"]] = {}


@dataclass(frozen=True)
class LayerScope:
    """The transformer layers PET modules may touch (``train.top_layers``): the indices
    ``layers`` of the stack called ``pattern`` (``layers`` in Llama, ``layer`` in BERT), out of
    ``n_layers``. Each method turns it into its own vocabulary (peft's ``layers_to_transform``,
    regexes, site lists)."""

    layers: tuple[int, ...]
    pattern: str
    n_layers: int

    def position(self, layer: int) -> int:
        """Index of ``layer`` among the scoped layers (0 = the lowest PET layer)."""
        return self.layers.index(layer)


def in_module(param_name: str, module: str) -> bool:
    """Whether a parameter path belongs to module ``module`` (peft puts the adapter name in it)."""
    return f".{module}." in param_name or param_name.endswith(f".{module}")


def counterpart(param_name: str, src: str, dst: str) -> str:
    """The name of module ``dst``'s parameter at the place of module ``src``'s ``param_name``
    (the module name is a path component, or the path's end)."""
    if f".{src}." in param_name:
        return param_name.replace(f".{src}.", f".{dst}.")
    return param_name[: -len(src)] + dst


def module_pairs(model: nn.Module, src: str, dst: str) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(``src`` parameter, the ``dst`` parameter at its place) for every parameter of module ``src``."""
    names = dict(model.named_parameters())
    return [(p, names[counterpart(n, src, dst)]) for n, p in names.items() if in_module(n, src)]


def seeded_generator(*parts: object) -> torch.Generator:
    """A torch generator seeded by a real hash of ``parts`` (e.g. a seed and a module path), so
    different sites get independent draws (``sum(map(ord, path))`` collides across paths)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def check_known(method: str, options: dict[str, Any], known) -> None:
    """A misspelt option is an error naming it (with a did-you-mean), never silently ignored."""
    known = sorted(known)
    for key in options:
        if key not in known:
            hint = choices_hint(str(key), known, cutoff=0.6, listing="known")
            raise ConfigError(f"pet.options: unknown option '{key}' for '{method}'{hint}")


def check_positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"pet.options.{key}: must be an integer >= 1, got {value!r}")
    return value


def check_positive_number(key: str, value: Any, nullable: bool = False) -> float | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"pet.options.{key}: must be a positive number, got {value!r}")
    return float(value)


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
    supports_kbit: ClassVar[bool] = False
    """Whether the method can sit on a bitsandbytes-quantized backbone (``backbone.quantize``)."""
    input_level: ClassVar[bool] = False
    """Whether the method changes the input embeddings or prepends virtual tokens (prompt family):
    such a module needs the whole forward pass, so it cannot be confined to the top layers."""
    lora_mergeable: ClassVar[bool] = False
    """Whether modules are plain LoRA factors the ``merge`` learner can merge (:meth:`lora_factors`)."""
    defaults: ClassVar[dict[str, Any]] = {}
    """The method's own options and their defaults (peft-backed methods: their peft config's)."""

    def __init__(self, options: dict[str, Any] | None = None, *, scope: LayerScope | None = None,
                 precision: str = "fp32") -> None:
        if scope is not None and self.input_level:
            raise ConfigError(f"train.top_layers: pet.method '{self.name}' works at the input embeddings, so "
                              "every layer must see it; it needs train.top_layers: null (or auto)")
        self.scope = scope
        self.precision = precision
        self.options = self.check_options(dict(options or {}))

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Validate the user's options (names and values) and return them with defaults."""
        check_known(self.name, options, self.defaults)
        return {**self.defaults, **options}

    @classmethod
    def confine_top_layers(cls, setting: int | str | None, n_layers: int, options: dict[str, Any]) -> int | str | None:
        """The ``train.top_layers`` setting this method needs (default: the user's); a method that
        trains layers of its own choice (CoFiTune's window) turns ``auto`` into what it needs."""
        return setting

    # -- the interface ------------------------------------------------------------------------------
    @abstractmethod
    def attach(self, model: nn.Module, name: str, calibration: Calibration | None = None) -> nn.Module:
        """Wrap ``model`` with a first module ``name``; return the wrapped model."""

    @abstractmethod
    def attach_from(self, model: nn.Module, folder: Path, name: str) -> nn.Module:
        """Wrap ``model`` with a saved module loaded from ``folder`` under the name ``name``."""

    @abstractmethod
    def add(self, model: nn.Module, name: str, calibration: Calibration | None = None) -> None:
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

    # -- training hooks (defaults: nothing) -----------------------------------------------------------
    def begin_fit(self, model: nn.Module, name: str, task: int) -> None:
        """Called when module ``name`` starts a fit for task ``task`` (HFT draws that task's half)."""

    def step_hook(self, model: nn.Module, name: str, total_steps: int | None = None) -> StepHook | None:
        """Called once per fit of ``total_steps`` steps; the callable it returns runs after every
        optimizer step (gradients still present): sparse regrowth, LISA's layer sampling,
        AdaLoRA's rank budget... ``None`` for most methods."""
        return None

    def param_groups(self, model: nn.Module, name: str, lr: float) -> list[dict]:
        """Optimizer groups of module ``name`` at the run's learning rate ``lr``; a method with
        its own learning rates (DePT's two, the prompt family's) overrides this."""
        return [{"params": self.parameters(model, name), "lr": lr}]

    def extra_loss(self, model: nn.Module, name: str) -> torch.Tensor | None:
        """A regulariser added to the training loss of module ``name`` (AdaLoRA's orthogonality
        penalty); ``None`` for most methods."""
        return None

    # -- what merging and reporting read ----------------------------------------------------------------
    @property
    def rank(self) -> int | None:
        """The module's rank for low-rank methods (LoRA's ``r``), else ``None``."""
        return None

    def delta_weights(self, model: nn.Module, name: str) -> dict[str, torch.Tensor] | None:
        """The dense update module ``name`` makes to the backbone's own parameters, keyed by their
        names in the unwrapped backbone (``layers.3.self_attn.q_proj.weight``): adding it to a
        copy of the backbone gives the module's function (tested). ``None`` where the method is
        not an update of existing weights (adapters, prompts, routed experts, DoRA)."""
        return None

    def copy(self, model: nn.Module, src: str, dst: str) -> None:
        """Create (or overwrite) module ``dst`` as a frozen copy of module ``src``."""
        if not any(in_module(n, dst) for n, _ in model.named_parameters()):
            self.add(model, dst)
            self.activate(model, src)
        pairs = module_pairs(model, src, dst)
        for p, target in pairs:
            with torch.no_grad():
                target.copy_(p)
            target.requires_grad_(False)
        if not pairs:
            raise ConfigError(f"pet '{self.name}': module '{src}' has no parameters to copy")

    def count(self, model: nn.Module, name: str) -> int:
        return sum(p.numel() for p in self.parameters(model, name))


@contextlib.contextmanager
def backbone_alone(model: nn.Module) -> Iterator[nn.Module]:
    """A module whose forward pass is the frozen backbone without its PET module (the zero-shot
    teacher): under peft's prompt learning the unwrapped backbone (the prompts live in the
    wrapper's forward only), else peft's ``disable_adapter()``, or, for conpet's own injected
    modules, none active."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        yield model.get_base_model()
    elif hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        active, model.active = model.active, None
        try:
            yield model
        finally:
            model.active = active
