"""PET methods peft does not have, injected into the backbone by conpet itself.

Each method says which submodules of a transformer block it attaches to (its *sites*) and what it
computes there; this file does the rest, mirroring what learners need from peft:

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
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conpet.errors import ConfigError, ModelError
from conpet.pet.base import PETMethod, check_safe_folder, in_module, register_pet

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
            rows = torch.tensor([i for i, n in enumerate(routes) if n == name])
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

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        self.routes = adapter_names
        try:
            return self.base_model(*args, **kwargs)
        finally:
            self.routes = None

    def add_adapter(self, name: str) -> None:
        if name in self.peft_config:
            raise ValueError(f"module '{name}' exists already")
        shared = self.method.build_shared()
        if shared is not None:
            self.shared[name] = shared
        for path, site in self.sites.items():
            site.parts[name] = self.method.build(site.base, path, shared)
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
    """Base of the methods in this file: ``sites(model)`` and ``build``/``apply`` per site."""

    defaults: dict[str, Any] = {}

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        self.layers = options.pop("layers_to_transform", None)
        options.pop("layers_pattern", None)
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ConfigError(f"pet.options: unknown option '{unknown[0]}' for '{self.name}' "
                              f"(known: {', '.join(sorted(self.defaults)) or 'none'})")
        super().__init__({**self.defaults, **options})

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
    def attach(self, model: nn.Module, name: str) -> nn.Module:
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

    def add(self, model: nn.Module, name: str) -> None:
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
        tensors = {n.replace(f".{name}.", "."): p.detach().contiguous() for n, p in self.tensors(model, name).items()}
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


# -- the methods -----------------------------------------------------------------------------------
def _is_llama_like(model: nn.Module) -> bool:
    return any(name.endswith("mlp.down_proj") for name, _ in model.named_modules())


class Bottleneck(nn.Module):
    """``up(act(down(h)))`` with ``up`` zero-initialised (the module starts as the identity)."""

    def __init__(self, d_in: int, d_out: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, bottleneck)
        self.up = nn.Linear(bottleneck, d_out)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.relu(self.down(h)))


def _out_features(base: nn.Module) -> int:
    if isinstance(base, nn.Linear):
        return base.out_features
    for m in reversed(list(base.modules())):
        if isinstance(m, nn.Linear):
            return m.out_features
    raise ConfigError(f"cannot tell the output size of {type(base).__name__}")


def _in_features(base: nn.Module) -> int:
    if isinstance(base, nn.Linear):
        return base.in_features
    for m in base.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise ConfigError(f"cannot tell the input size of {type(base).__name__}")


@register_pet("adapter")
class SeriesAdapter(InjectedPET):
    """Bottleneck adapters in series (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning
    for NLP"): ``h <- h + up(relu(down(h)))`` on the output of the attention output projection and
    of the feed-forward output projection (before the residual add), ``up`` zero-initialised.
    ``placement: pfeiffer`` keeps only the feed-forward one (Pfeiffer et al. 2021, AdapterFusion).
    Trainable per adapter: ``2 * d * b + b + d`` (``d`` hidden size, ``b`` = ``bottleneck``)."""

    paper = "Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP (placement: pfeiffer = Pfeiffer et al. 2021)"
    defaults = {"bottleneck": 64, "placement": "houlsby"}

    def site_pattern(self, model):
        if self.options["placement"] not in ("houlsby", "pfeiffer"):
            raise ConfigError("pet.options.placement: must be 'houlsby' or 'pfeiffer'")
        if _is_llama_like(model):
            ffn, attn = r"^mlp\.down_proj$", r"^self_attn\.o_proj$"
        else:
            ffn, attn = r"^output\.dense$", r"^attention\.output\.dense$"
        return ffn if self.options["placement"] == "pfeiffer" else f"{ffn}|{attn}"

    def build(self, base, path, shared):
        d = _out_features(base)
        return Bottleneck(d, d, int(self.options["bottleneck"]))

    def apply(self, part, x, y):
        return y + part(y).to(y.dtype)

    def expected_count(self, model):
        n = len(model.sites)
        b, d = int(self.options["bottleneck"]), _out_features(next(iter(model.sites.values())).base)
        return n * (2 * d * b + b + d)


@register_pet("parallel_adapter")
class ParallelAdapter(InjectedPET):
    """A parallel adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
    Learning"): ``y <- FFN(x) + s * up(relu(down(x)))`` beside the feed-forward block, ``s`` =
    ``scaling`` (4 in the paper). Named deviation: on BERT-like encoders, whose feed-forward block
    is split across modules, it sits beside the feed-forward output projection instead."""

    paper = "He et al. 2022, Towards a Unified View of Parameter-Efficient Transfer Learning"
    defaults = {"bottleneck": 64, "scaling": 4.0}

    def site_pattern(self, model):
        return r"^mlp$" if _is_llama_like(model) else r"^output\.dense$"

    def build(self, base, path, shared):
        return Bottleneck(_in_features(base), _out_features(base), int(self.options["bottleneck"]))

    def apply(self, part, x, y):
        return y + float(self.options["scaling"]) * part(x).to(y.dtype)

    def expected_count(self, model):
        b = int(self.options["bottleneck"])
        return sum(_in_features(s.base) * b + b + b * _out_features(s.base) + _out_features(s.base)
                   for s in model.sites.values())


class BiasDelta(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(d))


@register_pet("bitfit")
class BitFit(InjectedPET):
    """BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
    Transformer-based Masked Language-models"): only bias terms train. Implemented as a trainable
    bias added to the output of every linear layer in the transformer blocks, zero-initialised:
    for a layer that has a bias this is the same as training that bias from its pretrained value;
    for bias-free layers (Llama) it adds the bias BitFit would train (named deviation). Several
    named modules can then share one backbone. Trainable: the sum of the linear layers' output
    sizes. LayerNorm biases are not included (named deviation)."""

    paper = "Ben Zaken et al. 2022, BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based MLMs"
    defaults: dict[str, Any] = {}

    def site_pattern(self, model):
        return r"(^|\.)(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|query|key|value|dense)$"

    def build(self, base, path, shared):
        return BiasDelta(_out_features(base))

    def apply(self, part, x, y):
        return y + part.bias.to(y.dtype)

    def expected_count(self, model):
        return sum(_out_features(s.base) for s in model.sites.values())


class PHMLinear(nn.Module):
    """A parameterized hypercomplex multiplication layer with rank-1 ``B_i = s_i t_i^T``:
    ``W = sum_i A_i (x) (s_i t_i^T)``; ``A`` (the slow weights, ``[n, n, n]``) is shared."""

    def __init__(self, d_in: int, d_out: int, n: int, shared: nn.Parameter, zero: bool = False) -> None:
        super().__init__()
        if d_in % n or d_out % n:
            raise ConfigError(f"compacter: sizes {d_in} and {d_out} must be divisible by phm_dim n={n}")
        self.n = n
        object.__setattr__(self, "shared", shared)
        self.s = nn.Parameter(torch.randn(n, d_in // n, 1) * (0.0 if zero else 0.02))
        self.t = nn.Parameter(torch.randn(n, 1, d_out // n) * 0.02)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def weight(self) -> torch.Tensor:
        b = self.s @ self.t  # [n, d_in/n, d_out/n]
        return torch.stack([torch.kron(self.shared[i], b[i]) for i in range(self.n)]).sum(0)  # [d_in, d_out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight().to(x.dtype) + self.bias.to(x.dtype)


class CompacterPart(nn.Module):
    def __init__(self, d: int, b: int, n: int, shared_down: nn.Parameter, shared_up: nn.Parameter) -> None:
        super().__init__()
        self.down = PHMLinear(d, b, n, shared_down)
        self.up = PHMLinear(b, d, n, shared_up, zero=True)

    def forward(self, h):
        return self.up(nn.functional.gelu(self.down(h)))


@register_pet("compacter")
class Compacter(SeriesAdapter):
    """Compacter (Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter
    Layers"): Houlsby-placed adapters whose down and up projections are PHM layers, ``W = sum_i
    A_i (x) B_i`` with ``B_i = s_i t_i^T`` rank one and the ``A_i`` ("slow weights", ``n`` of size
    ``n x n``) shared by every adapter of the model (one set for down-, one for up-projections).
    Trainable: ``2 n^3`` shared + per adapter ``(d + b) + b`` (down) + ``(b + d) + d`` (up).
    The shared slow weights belong to each named module (every module has its own set)."""

    paper = "Mahabadi et al. 2021, Compacter: Efficient Low-Rank Hypercomplex Adapter Layers"
    defaults = {"bottleneck": 32, "phm_dim": 4, "placement": "houlsby"}

    def build_shared(self):
        n = int(self.options["phm_dim"])
        shared = nn.Module()
        shared.down = nn.Parameter(torch.randn(n, n, n) / n)
        shared.up = nn.Parameter(torch.randn(n, n, n) / n)
        return shared

    def build(self, base, path, shared):
        n, d, b = int(self.options["phm_dim"]), _out_features(base), int(self.options["bottleneck"])
        return CompacterPart(d, b, n, shared.down, shared.up)

    def apply(self, part, x, y):
        return y + part(y).to(y.dtype)

    def expected_count(self, model):
        n, b = int(self.options["phm_dim"]), int(self.options["bottleneck"])
        d = _out_features(next(iter(model.sites.values())).base)
        return 2 * n**3 + len(model.sites) * ((d + b) + b + (b + d) + d)


LINEAR_TARGETS = r"(^|\.)(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|query|key|value|dense)$"


def _kaiming_a(r: int, d_in: int) -> torch.Tensor:
    a = torch.empty(r, d_in)
    nn.init.kaiming_uniform_(a, a=5 ** 0.5)  # peft's LoRA A initialisation
    return a


class MoLAPart(nn.Module):
    def __init__(self, d_in: int, d_out: int, experts: int, r: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.stack([_kaiming_a(r, d_in) for _ in range(experts)]))  # [E, r, in]
        self.B = nn.Parameter(torch.zeros(experts, d_out, r))  # [E, out, r]
        self.router = nn.Linear(d_in, experts, bias=False)


@register_pet("mola")
class MoLA(InjectedPET):
    """MoLA (Gao et al. 2024, "Higher Layers Need More LoRA Experts"): every targeted projection
    gets E_l LoRA experts (rank ``r``, ``lora_alpha``) and a router ``Linear(d_in -> E_l)``
    without bias; softmax -> top-``top_k`` (2) -> renormalised weights ->
    ``y + sum_e w_e B_e A_e x * alpha / r``. ``experts`` gives E_l per block of layers from the
    bottom (MoLA-triangle-down ``[2, 4, 6, 8]``, the paper's best: higher layers get more); the
    layers are split into ``len(experts)`` equal blocks. Trainable per site: ``E (r (in + out)) +
    in E``. Named deviation: the optional Switch-style balance loss is not added."""

    paper = "Gao et al. 2024, Higher Layers Need More LoRA Experts"
    defaults = {"r": 8, "lora_alpha": 16, "experts": [2, 4, 6, 8], "top_k": 2, "target_modules": LINEAR_TARGETS}

    def site_pattern(self, model):
        self._n_layers = getattr(model.config, "num_hidden_layers", None)
        return self.options["target_modules"]

    def experts_at(self, path: str) -> int:
        layer = int(re.search(r"\.(\d+)\.", path).group(1))
        blocks = list(self.options["experts"])
        n = self._n_layers or (layer + 1)
        return int(blocks[min(len(blocks) - 1, layer * len(blocks) // n)])

    def build(self, base, path, shared):
        return MoLAPart(base.in_features, base.out_features, self.experts_at(path), int(self.options["r"]))

    def apply(self, part, x, y):
        scaling = float(self.options["lora_alpha"]) / int(self.options["r"])
        xf = x.to(part.A.dtype)
        probs = torch.softmax(part.router(xf), dim=-1)  # [..., E]
        k = min(int(self.options["top_k"]), probs.shape[-1])
        top, idx = probs.topk(k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        h = torch.einsum("...i,eri->...er", xf, part.A)  # [..., E, r]
        out = torch.einsum("...er,eor->...eo", h, part.B)  # [..., E, out]
        return y + (scaling * (weights.unsqueeze(-1) * out).sum(-2)).to(y.dtype)

    def expected_count(self, model):
        r = int(self.options["r"])
        return sum(self.experts_at(p) * (r * (s.base.in_features + s.base.out_features) + s.base.in_features)
                   for p, s in model.sites.items())


class MoSPart(nn.Module):
    def __init__(self, a_index: torch.Tensor, b_index: torch.Tensor, private_a: int, private_b: int,
                 a_len: int, b_len: int) -> None:
        super().__init__()
        self.register_buffer("a_index", a_index, persistent=True)  # [r, l] into [shared pool ; private]
        self.register_buffer("b_index", b_index, persistent=True)
        self.private_a = nn.Parameter(torch.empty(private_a, a_len).uniform_(-a_len ** -0.5, a_len ** -0.5))
        self.private_b = nn.Parameter(torch.zeros(private_b, b_len))


@register_pet("mos")
class MoS(InjectedPET):
    """MoS (Wang et al. 2025, "MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with
    Mixture of Shards"): LoRA whose low-rank vectors are concatenations of ``shards`` shards
    drawn from pools shared by all layers (one pool per vector length), with the paper's
    differentiation strategies: *subset selection* (each layer indexes its own random subset of
    the pool), *pair dissociation* (A and B vectors are indexed independently), *vector sharding*
    (a vector = ``shards`` shards) and *shard privatization* (``private`` of each layer's shards
    are its own). Named deviation: the per-layer selection is a fixed random index matrix (seeded
    at attach time), not a learned router, so the module stays mergeable into a plain LoRA; pool
    sizes are ``pool`` shards per vector length (the paper's values are unverified here).
    Trainable: the pools (``pool x len/shards`` per distinct length) + private shards."""

    paper = "Wang et al. 2025, MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards"
    defaults = {"r": 8, "lora_alpha": 16, "shards": 2, "pool": 64, "private": 0.25, "target_modules": LINEAR_TARGETS}

    def site_pattern(self, model):
        lengths = set()
        for path in block_paths(model, self.options["target_modules"], self.layers):
            m = model.get_submodule(path)
            lengths |= {m.in_features, m.out_features}
        for d in lengths:
            if d % int(self.options["shards"]):
                raise ConfigError(f"mos: size {d} is not divisible by shards={self.options['shards']}")
        self._lengths = sorted(lengths)
        self._seed = 0
        return self.options["target_modules"]

    def build_shared(self):
        pools = nn.Module()
        l, p = int(self.options["shards"]), int(self.options["pool"])
        for d in self._lengths:  # A-shards (init like LoRA's A) and B-shards (zero) of length d / l
            setattr(pools, f"a{d}", nn.Parameter(torch.empty(p, d // l).uniform_(-(d ** -0.5), d ** -0.5)))
            setattr(pools, f"b{d}", nn.Parameter(torch.zeros(p, d // l)))
        return pools

    def build(self, base, path, shared):
        r, l, p = int(self.options["r"]), int(self.options["shards"]), int(self.options["pool"])
        n_private = round(float(self.options["private"]) * r * l)
        gen = torch.Generator().manual_seed(sum(map(ord, path)))  # fixed per layer: subset selection
        a_index = torch.randint(0, p + n_private, (r, l), generator=gen)
        b_index = torch.randint(0, p + n_private, (r, l), generator=gen)  # pair dissociation
        part = MoSPart(a_index, b_index, n_private, n_private, base.in_features // l, base.out_features // l)
        object.__setattr__(part, "pool_a", getattr(shared, f"a{base.in_features}"))
        object.__setattr__(part, "pool_b", getattr(shared, f"b{base.out_features}"))
        return part

    @staticmethod
    def factors(part) -> tuple[torch.Tensor, torch.Tensor]:
        a_all = torch.cat([part.pool_a, part.private_a])
        b_all = torch.cat([part.pool_b, part.private_b])
        A = a_all[part.a_index].reshape(part.a_index.shape[0], -1)  # [r, in]
        B = b_all[part.b_index].reshape(part.b_index.shape[0], -1).T  # [out, r]
        return A, B

    def apply(self, part, x, y):
        A, B = self.factors(part)
        scaling = float(self.options["lora_alpha"]) / int(self.options["r"])
        return y + (scaling * (x.to(A.dtype) @ A.T @ B.T)).to(y.dtype)

    def site_delta(self, part):
        A, B = self.factors(part)
        return float(self.options["lora_alpha"]) / int(self.options["r"]) * B @ A

    def expected_count(self, model):
        l, p = int(self.options["shards"]), int(self.options["pool"])
        n_private = round(float(self.options["private"]) * int(self.options["r"]) * l)
        pools = sum(2 * p * d // l for d in self._lengths)
        private = sum(n_private * (s.base.in_features + s.base.out_features) // l for s in model.sites.values())
        return pools + private


# -- dense deltas on chosen weights: sparse fine-tuning, HFT, LISA ---------------------------------
class DeltaPart(nn.Module):
    """``y + x @ delta^T``: a full-size update of one linear layer, zero-initialised."""

    def __init__(self, base: nn.Linear, sparse_density: float | None = None, seed: int = 0) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(base.out_features, base.in_features))
        self.register_buffer("mask", None)
        if sparse_density is not None:
            gen = torch.Generator().manual_seed(seed)
            n = self.delta.numel()
            k = max(1, round(sparse_density * n))
            mask = torch.zeros(n, dtype=torch.bool)
            mask[torch.randperm(n, generator=gen)[:k]] = True
            self.register_buffer("mask", mask.view_as(self.delta))
            self.register_buffer("grad_acc", torch.zeros_like(self.delta))

    def weight(self) -> torch.Tensor:
        """The update in effect: ``delta`` (masked for sparse fine-tuning). For a sparse part
        the gradient of the *whole* update is accumulated outside the mask (for regrowth)."""
        if self.mask is None:
            return self.delta
        w = self.delta * self.mask
        if w.requires_grad:
            w.register_hook(self._accumulate)
        return w

    def _accumulate(self, grad: torch.Tensor) -> None:
        self.grad_acc.add_(grad.detach().abs() * (~self.mask))


class DeltaPET(InjectedPET):
    """Shared machinery: a dense update per targeted linear layer; saved sparsely (only the
    non-zero entries, as COO indices + values), so a module that touched few weights is small."""

    def site_pattern(self, model):
        return self.options["target_modules"]

    def site_delta(self, part):
        return part.weight()

    def apply(self, part, x, y):
        w = part.weight()
        return y + (x.to(w.dtype) @ w.T).to(y.dtype)

    def save(self, model, name, folder):
        tensors, shapes = {}, {}
        for n, p in self.tensors(model, name).items():
            key = n.replace(f".{name}.", ".")
            site = model.sites[key.split(".parts.")[0].removeprefix("base_model.")]
            flat = site.parts[name].weight().detach().reshape(-1)
            idx = flat.nonzero().flatten()
            tensors[f"{key}::indices"] = idx.to(torch.int64)
            tensors[f"{key}::values"] = flat[idx].contiguous()
            shapes[key] = list(p.shape)
        save_file(tensors, str(Path(folder) / WEIGHTS_FILE))
        (Path(folder) / CONFIG_FILE).write_text(json.dumps(
            {"conpet_pet": self.name, "options": self.options, "layers_to_transform": self.layers,
             "sites": list(model.sites), "format": "coo", "shapes": shapes}, indent=2))

    def load_into(self, model, folder, name):
        saved = self.read_saved(folder)
        with torch.no_grad():
            for n, p in self.tensors(model, name).items():
                key = n.replace(f".{name}.", ".")
                if f"{key}::indices" not in saved:
                    raise ModelError(f"{folder}: no saved tensor for '{key}' (options or layers differ)")
                p.zero_()
                p.view(-1)[saved[f"{key}::indices"]] = saved[f"{key}::values"].to(p.dtype)
                part = model.sites[key.split(".parts.")[0].removeprefix("base_model.")].parts[name]
                if part.mask is not None:  # the stored entries are the active ones
                    part.mask.zero_()
                    part.mask.view(-1)[saved[f"{key}::indices"]] = True


@register_pet("sparse_ft")
class SparseFT(DeltaPET):
    """Sparse fine-tuning (Ansell et al. 2024, "Scaling Sparse Fine-Tuning to Large Language
    Models", SpIEL): a fixed-density update of the chosen weights. Each targeted linear layer
    trains ``density`` of its entries (a random initial set); every ``regrow_every`` steps the
    ``regrow_fraction`` of active entries with the smallest ``|delta|`` are pruned (set to 0) and
    as many inactive entries with the largest accumulated ``|gradient|`` since the last update are
    regrown (SpIEL-AG). Named deviation: the optimizer moments of regrown entries are not reset.
    Trainable (and stored): ``round(density x out x in)`` entries per layer."""

    paper = "Ansell et al. 2024, Scaling Sparse Fine-Tuning to Large Language Models"
    defaults = {"density": 0.01, "regrow_every": 20, "regrow_fraction": 0.2, "target_modules": LINEAR_TARGETS}

    def build(self, base, path, shared):
        return DeltaPart(base, float(self.options["density"]), seed=sum(map(ord, path)))

    def count(self, model, name):
        return sum(int(site.parts[name].mask.sum()) for site in model.sites.values())

    def expected_count(self, model):
        return sum(max(1, round(float(self.options["density"]) * s.base.weight.numel())) for s in model.sites.values())

    def step_hook(self, model, name, total_steps=None):
        every, fraction = int(self.options["regrow_every"]), float(self.options["regrow_fraction"])

        def regrow(step: int) -> None:
            if (step + 1) % every:
                return
            with torch.no_grad():
                for site in model.sites.values():
                    part = site.parts[name]
                    active = part.mask.view(-1).nonzero().flatten()
                    k = int(fraction * len(active))
                    if k == 0:
                        continue
                    flat, acc = part.delta.view(-1), part.grad_acc.view(-1)
                    drop = active[flat[active].abs().argsort()[:k]]
                    part.mask.view(-1)[drop] = False
                    flat[drop] = 0.0
                    candidates = acc.masked_fill(part.mask.view(-1), -1.0)
                    candidates[drop] = -1.0  # not straight back
                    grow = candidates.topk(k).indices
                    part.mask.view(-1)[grow] = True
                    part.grad_acc.zero_()

        return regrow


@register_pet("hft")
class HFT(DeltaPET):
    """HFT (Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language Models"): each round (here:
    each named module, i.e. each task) a random half of the targeted weight matrices of every
    transformer block is updated and the other half stays frozen at its pretrained value, which
    keeps part of the old knowledge intact. Updates are stored sparsely (the untouched half costs
    nothing). Trainable: half of the targeted matrices' entries."""

    paper = "Hui et al. 2024, HFT: Half Fine-Tuning for Large Language Models"
    defaults = {"target_modules": LINEAR_TARGETS, "seed": 0}

    def chosen(self, model, name) -> list[str]:
        """The half of the sites module ``name`` updates (fixed per module name and seed)."""
        by_block: dict[str, list[str]] = {}
        for path in model.sites:
            by_block.setdefault(re.search(r"^(.*\.\d+)\.", path).group(1), []).append(path)
        gen = torch.Generator().manual_seed(int(self.options["seed"]) + sum(map(ord, name)))
        out = []
        for paths in by_block.values():
            order = torch.randperm(len(paths), generator=gen).tolist()
            out += [paths[i] for i in order[: (len(paths) + 1) // 2]]
        return out

    def build(self, base, path, shared):
        return DeltaPart(base)

    def parameters(self, model, name):
        chosen = set(self.chosen(model, name))
        out = []
        for path, site in model.sites.items():
            p = site.parts[name].delta
            p.requires_grad_(path in chosen)
            if path in chosen:
                out.append(p)
        return out

    def count(self, model, name):
        return sum(model.sites[p].parts[name].delta.numel() for p in self.chosen(model, name))

    def expected_count(self, model):
        return self.count(model, next(iter(model.peft_config)))


@register_pet("lisa")
class LISA(DeltaPET):
    """LISA (Pan et al. 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large
    Language Model Fine-Tuning"): every ``interval`` steps, ``active_layers`` transformer layers
    are sampled uniformly and only their weights train (the others are frozen until the next
    draw). Named deviation: LISA also always trains the embeddings and the LM head; conpet runs
    no LM head and keeps the embeddings frozen. Trainable: every targeted weight can change
    (over the draws); stored sparsely."""

    paper = "Pan et al. 2024, LISA: Layerwise Importance Sampling for Memory-Efficient LLM Fine-Tuning"
    defaults = {"target_modules": LINEAR_TARGETS, "active_layers": 2, "interval": 20, "seed": 0}

    def build(self, base, path, shared):
        return DeltaPart(base)

    def expected_count(self, model):
        return sum(s.base.weight.numel() for s in model.sites.values())

    def _layer_of(self, path):
        return int(re.search(r"\.(\d+)\.", path).group(1))

    def _draw(self, model, name, draw: int) -> None:
        layers = sorted({self._layer_of(p) for p in model.sites})
        gen = torch.Generator().manual_seed(int(self.options["seed"]) + 1000 * draw + sum(map(ord, name)))
        k = min(int(self.options["active_layers"]), len(layers))
        active = {layers[i] for i in torch.randperm(len(layers), generator=gen)[:k].tolist()}
        for path, site in model.sites.items():
            site.parts[name].delta.requires_grad_(self._layer_of(path) in active)

    def parameters(self, model, name):
        params = [site.parts[name].delta for site in model.sites.values()]
        self._draw(model, name, 0)
        return params

    def step_hook(self, model, name, total_steps=None):
        interval = int(self.options["interval"])

        def resample(step: int) -> None:
            if (step + 1) % interval == 0:
                self._draw(model, name, (step + 1) // interval)

        return resample
