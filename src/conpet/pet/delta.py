"""Dense updates of chosen weights, the machinery of sparse fine-tuning, HFT and LISA: a
zero-initialised full-size update per targeted linear layer, saved sparsely (only the non-zero
entries, as COO indices (int32) + values), so a module that touched few weights is small on disk;
a matrix whose update is denser than that pays for is saved as the plain matrix."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from conpet.errors import ModelError
from conpet.pet.sites import CONFIG_FILE, WEIGHTS_FILE, InjectedPET


class DeltaPart(nn.Module):
    """``y + x @ delta^T``: a full-size update of one linear layer, zero-initialised."""

    def __init__(self, base: nn.Linear, sparse_density: float | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(base.out_features, base.in_features))
        self.register_buffer("mask", None)
        if sparse_density is not None:
            gen = generator or torch.Generator().manual_seed(0)
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
    non-zero entries, as COO indices + values), so a module that touched few weights is small, or
    as the plain matrix where that is smaller (an update that touched most of its entries)."""

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
            flat = site.parts[name].weight().detach().cpu().reshape(-1)
            idx = flat.nonzero().flatten()
            index_dtype = torch.int32 if flat.numel() < 2 ** 31 else torch.int64
            coo_bytes = idx.numel() * (index_dtype.itemsize + flat.element_size())
            if coo_bytes < flat.numel() * flat.element_size():
                tensors[f"{key}::indices"] = idx.to(index_dtype)
                tensors[f"{key}::values"] = flat[idx].contiguous()
            else:  # denser than COO pays for (CoFiTune's whole matrices): the matrix itself
                tensors[f"{key}::dense"] = flat.contiguous()
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
                if f"{key}::dense" in saved:
                    p.copy_(saved[f"{key}::dense"].to(p.device, p.dtype).view(p.shape))
                elif f"{key}::indices" in saved:
                    p.zero_()
                    idx = saved[f"{key}::indices"].to(p.device, torch.int64)
                    p.view(-1)[idx] = saved[f"{key}::values"].to(p.device, p.dtype)
                else:
                    raise ModelError(f"{folder}: no saved tensor for '{key}' (options or layers differ)")
                part = model.sites[key.split(".parts.")[0].removeprefix("base_model.")].parts[name]
                if part.mask is not None:  # the stored (non-zero) entries are the active ones
                    part.mask.copy_((p != 0).view(part.mask.shape))
