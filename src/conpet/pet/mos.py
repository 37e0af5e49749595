"""MoS (Wang et al. 2025, "MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with
Mixture of Shards"), as in the official code (``Forence1999/MoS``, ``modules/Tied_LoRA.py``).

LoRA whose low-rank vectors are concatenations of ``shards`` (``l``) shards taken from pools
shared by every layer:

- **one global pool per projection type** (q, k, v, o, gate, up, down...; types never share, their
  sizes differ), of ``P = valid_r x L x l`` shards for A (length ``in / l``) and for B (length
  ``out / l``), ``L`` the number of (PET) layers with that projection: as many parameters as a
  plain LoRA of rank ``valid_r`` in every layer, while each layer uses rank ``r`` (the saving is
  ``r / valid_r``);
- **shard privatization**: the pool's last ``private_r x L x l`` shards are private, layer ``i``
  (its position among the PET layers) owning the block ``[S + i private_r l, S + (i+1) private_r l)``
  with ``S = (valid_r - private_r) L l`` the shared region;
- **subset selection** and **pair dissociation**: each site's A index is ``(r - private_r) l``
  shards drawn without replacement from the shared region followed by its private block; B's is
  drawn separately (same private block). Indices are drawn once, when the module is built, from a
  hash of ``(seed, site path, A|B)``, so every site has its own; they are stored with the module;
- **vector sharding**: rank-vector ``j`` is the concatenation of selected shards ``j l .. j l + l - 1``.

Initialisation as LoRA: pool A ``U(+-1/sqrt(in))`` (kaiming-uniform with ``a = sqrt(5)`` over
fan-in ``in``), pool B zeros, so ``dW = 0`` at the start; scaling ``lora_alpha / r``. The paper's
"MoE-like router" is this fixed index matrix (no learned, input-dependent router), so a module is
an additive update (``delta_weights``). The official code's random scaling vectors are constant
1 there and are left out. Trainable: ``sum over types of valid_r x L x (in + out)``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from conpet.errors import ConfigError
from conpet.families import LINEAR_TARGETS
from conpet.pet.base import check_positive_int, register_pet, seeded_generator
from conpet.pet.sites import InjectedPET, block_paths


def layer_of(path: str) -> int:
    return int(re.search(r"\.(\d+)\.", path).group(1))


def projection_type(path: str) -> str:
    return re.search(r"\.\d+\.(.+)$", path).group(1)


def shard_vectors(pool: torch.Tensor, index: torch.Tensor, shards: int) -> torch.Tensor:
    """``[r, d]`` rank-vectors from ``r l`` selected shards of length ``d / l``: vector ``j`` is
    shards ``j l .. j l + l - 1`` side by side (the official ``transform_chunks``)."""
    mat = pool[index]  # [r l, d / l]
    return torch.cat([mat[i::shards] for i in range(shards)], dim=1)


class MoSPart(nn.Module):
    def __init__(self, a_index: torch.Tensor, b_index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a_index", a_index, persistent=True)  # [r l] into the type's pool
        self.register_buffer("b_index", b_index, persistent=True)


@register_pet("mos")
class MoS(InjectedPET):
    """LoRA from a mixture of shards of global per-type pools (subset selection, pair
    dissociation, vector sharding, shard privatization)."""

    paper = "Wang et al. 2025, MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards"
    defaults: dict[str, Any] = {"r": 8, "lora_alpha": 16, "valid_r": 4, "private_r": 2, "shards": 2, "seed": 0,
                                "target_modules": LINEAR_TARGETS}

    def check_options(self, options):
        options = super().check_options(options)
        for key in ("r", "valid_r", "shards"):
            check_positive_int(key, options[key])
        p = options["private_r"]
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= min(options["r"], options["valid_r"]):
            raise ConfigError(f"pet.options.private_r: an integer between 0 and min(r, valid_r), got {p!r}")
        return options

    def site_pattern(self, model):
        """Also settles, per projection type, its sizes and the PET layers that have it."""
        o = self.options
        r, l, rv, rp = o["r"], o["shards"], o["valid_r"], o["private_r"]
        self._types: dict[str, dict] = {}
        for path in block_paths(model, o["target_modules"], self.layers):
            m = model.get_submodule(path)
            entry = self._types.setdefault(projection_type(path), {"in": m.in_features, "out": m.out_features,
                                                                    "layers": []})
            entry["layers"].append(layer_of(path))
        for kind, entry in self._types.items():
            for d in (entry["in"], entry["out"]):
                if d % l:
                    raise ConfigError(f"pet 'mos': size {d} of {kind} is not divisible by shards={l}")
            entry["layers"] = sorted(set(entry["layers"]))
            n = len(entry["layers"])
            entry["shared"] = (rv - rp) * n * l
            entry["pool"] = rv * n * l
            if (r - rp) * l > entry["shared"]:
                raise ConfigError(f"pet 'mos': {kind} has {n} PET layer(s), whose shared region holds "
                                  f"{entry['shared']} shards; r - private_r = {r - rp} vectors of {l} shards need "
                                  f"{(r - rp) * l}: lower r or raise valid_r")
        return o["target_modules"]

    def build_shared(self):
        pools = nn.Module()
        l = self.options["shards"]
        for kind, e in self._types.items():
            key = kind.replace(".", "_")
            bound = 1 / math.sqrt(e["in"])
            setattr(pools, f"a_{key}", nn.Parameter(torch.empty(e["pool"], e["in"] // l).uniform_(-bound, bound)))
            setattr(pools, f"b_{key}", nn.Parameter(torch.zeros(e["pool"], e["out"] // l)))
        return pools

    def indices(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The site's A and B shard indices: shared shards drawn without replacement, then the
        layer's private block."""
        o = self.options
        r, l, rp = o["r"], o["shards"], o["private_r"]
        e = self._types[projection_type(path)]
        position = e["layers"].index(layer_of(path))
        private = torch.arange(e["shared"] + position * rp * l, e["shared"] + (position + 1) * rp * l)
        out = []
        for which in ("A", "B"):
            gen = seeded_generator(o["seed"], path, which)
            shared = torch.randperm(e["shared"], generator=gen)[: (r - rp) * l]
            out.append(torch.cat([shared, private]))
        return out[0], out[1]

    def build(self, base, path, shared):
        a_index, b_index = self.indices(path)
        part = MoSPart(a_index, b_index)
        key = projection_type(path).replace(".", "_")
        object.__setattr__(part, "pool_a", getattr(shared, f"a_{key}"))
        object.__setattr__(part, "pool_b", getattr(shared, f"b_{key}"))
        return part

    def factors(self, part) -> tuple[torch.Tensor, torch.Tensor]:
        l = self.options["shards"]
        A = shard_vectors(part.pool_a, part.a_index, l)  # [r, in]
        B = shard_vectors(part.pool_b, part.b_index, l).T  # [out, r]
        return A, B

    def apply(self, part, x, y):
        A, B = self.factors(part)
        scaling = float(self.options["lora_alpha"]) / self.options["r"]
        return y + (scaling * (x.to(A.dtype) @ A.T @ B.T)).to(y.dtype)

    def site_delta(self, part):
        A, B = self.factors(part)
        return float(self.options["lora_alpha"]) / self.options["r"] * B @ A

    @property
    def rank(self) -> int:
        return self.options["r"]

    def expected_count(self, model):
        rv = self.options["valid_r"]
        return sum(rv * len(e["layers"]) * (e["in"] + e["out"]) for e in self._types.values())
