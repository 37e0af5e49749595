"""The machinery of the PET methods peft does not have, injected into the backbone by conpet.

Each method (its own file: ``adapter.py``, ``mola.py``, ``hft.py``...) says which submodules of a
transformer block it attaches to (its *sites*) and what it computes there; this module does the
rest, mirroring what learners need from peft:

- several named modules on one backbone (``expert-000``, ``selector``...), one active at a time
  or routed per row in one batch (``model(..., adapter_names=[...])``, as peft does);
- parameter paths contain ``.<module name>.`` (like peft), so :func:`conpet.pet.base.in_module`
  and :meth:`PETMethod.copy` work unchanged;
- ``unload()`` puts the original submodules back and returns the untouched backbone.

Saved format (our own, documented): a folder with ``pet_model.safetensors`` (the module's
tensors, keyed by parameter path with the module name removed) and ``pet_config.json``
(``{"conpet_pet": method, "options": {...}, "sites": [paths]}``). Only safetensors and JSON.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conpet.errors import ConfigError, ModelError
from conpet.pet.base import Calibration, PETMethod, in_module
from conpet.runs import check_safe_folder

CONFIG_FILE = "pet_config.json"
WEIGHTS_FILE = "pet_model.safetensors"


class Site(nn.Module):
    """Wraps one submodule of the backbone; holds one part per named PET module."""

    def __init__(self, base: nn.Module, method: "InjectedPET", path: str) -> None:
        super().__init__()
        self.base = base
        self.parts = nn.ModuleDict()
        self.path = path
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "owner", None)

    def forward(self, x, *args, **kwargs):
        y = self.base(x, *args, **kwargs)
        owner = self.owner
        routes = owner.routes if owner is not None else None
        if routes is None:
            name = owner.active if owner is not None else None
            if name is None or name not in self.parts:
                return y
            return self.method.apply(self.parts[name], x, y)
        out = y.clone()
        for name in dict.fromkeys(routes):
            if name not in self.parts:
                continue
            rows = torch.tensor([i for i, n in enumerate(routes) if n == name], device=x.device)
            out[rows] = self.method.apply(self.parts[name], x[rows], y[rows]).to(out.dtype)
        return out


class InjectedModel(nn.Module):
    """The backbone with sites; quacks like the bits of peft's ``PeftModel`` conpet uses."""

    def __init__(self, base_model: nn.Module, method: "InjectedPET", sites: dict[str, Site]) -> None:
        super().__init__()
        self.base_model = base_model
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "method", method)
        self.peft_config: dict[str, dict] = {}
        self.shared = nn.ModuleDict()
        """tensors one named module shares across all its sites (Compacter's slow weights)"""
        self.active: str | None = None
        self.routes: list[str] | None = None
        for site in sites.values():
            object.__setattr__(site, "owner", self)

    @property
    def config(self):
        return self.base_model.config

    def get_base_model(self) -> nn.Module:
        """The backbone under the sites (as peft's): its ``forward`` signature names the arguments
        it takes (``cache`` or ``past_key_values``, :func:`conpet.families.cache_argument`)."""
        return self.base_model

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        self.routes = adapter_names
        try:
            return self.base_model(*args, **kwargs)
        finally:
            self.routes = None

    def add_adapter(self, name: str) -> None:
        if name in self.peft_config:
            raise ValueError(f"module '{name}' exists already")
        # parts are built (and initialised) on the CPU, then moved next to their base module's
        # weights: the same seed gives the same module on every device
        device = next(self.base_model.parameters()).device
        shared = self.method.build_shared()
        if shared is not None:
            self.shared[name] = shared.to(device)
        for path, site in self.sites.items():
            site_device = next(site.base.parameters(), torch.empty(0, device=device)).device
            site.parts[name] = self.method.build(site.base, path, shared).to(site_device)
        self.peft_config[name] = dict(self.method.options)

    def set_adapter(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"no module '{name}'")
        self.active = name
        for n, p in self.named_parameters():
            if any(in_module(n, m) for m in self.peft_config):
                p.requires_grad_(in_module(n, name))

    def delete_adapter(self, name: str) -> None:
        for site in self.sites.values():
            del site.parts[name]
        if name in self.shared:
            del self.shared[name]
        del self.peft_config[name]
        if self.active == name:
            self.active = next(iter(self.peft_config), None)

    def unload(self) -> nn.Module:
        for path, site in self.sites.items():
            parent_path, _, attr = path.rpartition(".")
            parent = self.base_model.get_submodule(parent_path) if parent_path else self.base_model
            setattr(parent, attr, site.base)
        return self.base_model


def block_paths(model: nn.Module, pattern: str, layers: list[int] | None = None) -> list[str]:
    """Paths of submodules inside the transformer blocks (``...layers.<i>.`` / ``...layer.<i>.``)
    whose path matches ``pattern`` (a regex searched in the path after the block index)."""
    out = []
    for path, _ in model.named_modules():
        m = re.search(r"\.(\d+)\.(.+)$", path)
        if not m or not re.search(pattern, m.group(2)):
            continue
        if layers is not None and int(m.group(1)) not in layers:
            continue
        out.append(path)
    return out


class InjectedPET(PETMethod):
    """Base of conpet's own methods: ``sites(model)`` and ``build``/``apply`` per site."""

    @property
    def layers(self) -> list[int] | None:
        """The layer indices sites may sit in (the scope's), ``None`` = every layer."""
        return list(self.scope.layers) if self.scope is not None else None

    # -- what a method defines ---------------------------------------------------------------------
    def site_pattern(self, model: nn.Module) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def build(self, base: nn.Module, path: str, shared: nn.Module | None) -> nn.Module:  # pragma: no cover
        """A fresh part (the trainable tensors) for the site wrapping ``base``; ``shared`` is what
        :meth:`build_shared` made for this named module."""
        raise NotImplementedError

    def build_shared(self) -> nn.Module | None:
        """Tensors shared by all sites of one named module (default: none)."""
        return None

    def apply(self, part: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """The site's output given its input ``x`` and the base output ``y``."""
        raise NotImplementedError

    def expected_count(self, model: nn.Module) -> int:  # pragma: no cover - abstract
        """Trainable parameters of one module, from the method's formula (tested)."""
        raise NotImplementedError

    def site_delta(self, part: nn.Module) -> torch.Tensor | None:
        """The dense update of the site's weight, for methods that are one (default: none)."""
        return None

    def delta_weights(self, model: nn.Module, name: str) -> dict[str, torch.Tensor] | None:
        out = {}
        with torch.no_grad():
            for path, site in model.sites.items():
                delta = self.site_delta(site.parts[name])
                if delta is None:
                    return None
                out[f"{path}.weight"] = delta.detach().clone()
        return out or None  # no site (DePT works at the input): no weight update

    # -- the PET interface -------------------------------------------------------------------------
    def attach(self, model: nn.Module, name: str, calibration: Calibration | None = None) -> nn.Module:
        paths = block_paths(model, self.site_pattern(model), self.layers)
        if not paths:
            raise ConfigError(f"pet '{self.name}': no site matches '{self.site_pattern(model)}' in "
                              f"{type(model).__name__}")
        sites = {}
        for path in paths:
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            site = Site(getattr(parent, attr), self, path)
            setattr(parent, attr, site)
            sites[path] = site
        wrapped = InjectedModel(model, self, sites)
        wrapped.add_adapter(name)
        wrapped.set_adapter(name)
        return wrapped

    def attach_from(self, model: nn.Module, folder: Path, name: str) -> nn.Module:
        wrapped = self.attach(model, name)
        self.load_into(wrapped, folder, name)
        wrapped.set_adapter(name)
        return wrapped

    def add(self, model: nn.Module, name: str, calibration: Calibration | None = None) -> None:
        model.add_adapter(name)

    def activate(self, model: nn.Module, name: str) -> None:
        model.set_adapter(name)

    def modules(self, model: nn.Module) -> list[str]:
        return list(getattr(model, "peft_config", {}))

    def tensors(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if in_module(n, name)}

    def parameters(self, model: nn.Module, name: str) -> list[nn.Parameter]:
        params = list(self.tensors(model, name).values())
        for p in params:
            p.requires_grad_(True)
        return params

    def count(self, model: nn.Module, name: str) -> int:
        return sum(p.numel() for p in self.tensors(model, name).values())

    def save(self, model: nn.Module, name: str, folder: Path) -> None:
        tensors = {n.replace(f".{name}.", "."): p.detach().cpu().contiguous() for n, p in self.tensors(model, name).items()}
        save_file(tensors, str(Path(folder) / WEIGHTS_FILE))
        (Path(folder) / CONFIG_FILE).write_text(json.dumps(
            {"conpet_pet": self.name, "options": self.options, "layers_to_transform": self.layers,
             "sites": list(model.sites)}, indent=2))

    def load(self, model: nn.Module, folder: Path, name: str) -> None:
        if name not in model.peft_config:
            model.add_adapter(name)
        self.load_into(model, folder, name)

    def read_saved(self, folder: Path) -> dict[str, torch.Tensor]:
        """The tensors of a saved module of this method (safetensors only; the config is checked)."""
        folder = Path(folder)
        check_safe_folder(folder)
        config = json.loads((folder / CONFIG_FILE).read_text())
        if config.get("conpet_pet") != self.name:
            raise ModelError(f"{folder}: a '{config.get('conpet_pet')}' module, not '{self.name}'")
        return load_file(str(folder / WEIGHTS_FILE))

    def load_into(self, model: nn.Module, folder: Path, name: str) -> None:
        saved = self.read_saved(folder)
        params = self.tensors(model, name)
        by_plain = {n.replace(f".{name}.", "."): p for n, p in params.items()}
        missing = sorted(set(by_plain) - set(saved))
        if missing:
            raise ModelError(f"{folder}: no saved tensor for '{missing[0]}' (options or layers differ)")
        with torch.no_grad():
            for key, p in by_plain.items():
                p.copy_(saved[key])

    def remove(self, model: nn.Module, name: str) -> None:
        model.delete_adapter(name)

    def detach(self, model: nn.Module) -> nn.Module:
        return model.unload()


def out_features(base: nn.Module) -> int:
    if isinstance(base, nn.Linear):
        return base.out_features
    for m in reversed(list(base.modules())):
        if isinstance(m, nn.Linear):
            return m.out_features
    raise ConfigError(f"cannot tell the output size of {type(base).__name__}")


def in_features(base: nn.Module) -> int:
    if isinstance(base, nn.Linear):
        return base.in_features
    for m in base.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise ConfigError(f"cannot tell the input size of {type(base).__name__}")
