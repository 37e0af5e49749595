"""What a learner saves and restores: its *declared* state for resume, its PET modules and heads
as tensors, and the ``conpet.json`` beside each saved module.

A learner (or any object it holds: a memory, a weight ensemble) lists the attributes that make
up its training state in ``state_attrs``; :func:`pack` turns them into tensors + JSON and
:func:`unpack` puts them back, so no learner writes ``state``/``load_state`` by hand. An
attribute may hold a tensor, a list or a string-keyed dict of tensors, a growing head or a list
of them (labels and values; a head of another shape is made anew), a torch module (its
``state_dict``), JSON-able values, ``None`` or an object with its own ``state_attrs`` (packed
under the attribute's name). :func:`write_attrs` / :func:`read_attrs` put such attributes beside
a saved module (what prediction needs besides the module and the head).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from conpet.errors import ConpetError
from conpet.heads import GrowingHead
from conpet.pet.base import PETMethod, in_module

METHOD_FILES = ("method.safetensors", "method.json")
"""Where :func:`write_attrs` puts a learner's saved attributes, beside its module."""


def pack(obj: Any, prefix: str = "", attrs: tuple[str, ...] | None = None
         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The attributes ``attrs`` (default ``obj.state_attrs``) of ``obj``: tensors keyed
    ``<prefix><attr>[/<i>]``, and the JSON description (values, and where each attribute's tensors are)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for attr in getattr(obj, "state_attrs", ()) if attrs is None else attrs:
        value, key = getattr(obj, attr), prefix + attr
        if isinstance(value, GrowingHead):
            tensors.update({f"{key}/{k}": v for k, v in head_tensors(value).items()})
            meta[attr] = {"head": list(value.labels)}
        elif isinstance(value, list) and value and all(isinstance(v, GrowingHead) for v in value):
            for i, head in enumerate(value):
                tensors.update({f"{key}/{i}/{k}": v for k, v in head_tensors(head).items()})
            meta[attr] = {"heads": [list(head.labels) for head in value]}
        elif isinstance(value, torch.nn.Module):
            tensors.update({f"{key}/{k}": v.detach() for k, v in value.state_dict().items()})
            meta[attr] = {"module": True}
        elif isinstance(value, torch.Tensor):
            tensors[key] = value.detach()
            meta[attr] = {"tensor": True}
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            tensors.update({f"{key}/{i}": v.detach() for i, v in enumerate(value)})
            meta[attr] = {"tensors": len(value)}
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            tensors.update({f"{key}/{k}": v.detach() for k, v in value.items()})
            meta[attr] = {"tensor_keys": list(value)}
        elif hasattr(value, "state_attrs"):
            inner, inner_meta = pack(value, key + "/")
            tensors.update(inner)
            meta[attr] = {"object": inner_meta}
        else:
            json.dumps(value)  # anything else must be JSON (a TypeError names a learner's mistake at once)
            meta[attr] = {"value": value}
    return tensors, meta


def unpack(obj: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "",
           attrs: tuple[str, ...] | None = None) -> None:
    """Inverse of :func:`pack`: a tensor that exists with the same shape is overwritten in place
    (an optimizer holding it stays valid); a module or object attribute must already exist (a
    learner's task preamble makes it), or be ``None`` in both."""
    for attr in getattr(obj, "state_attrs", ()) if attrs is None else attrs:
        if attr not in meta:
            raise ConpetError(f"the checkpoint has no '{attr}' of {type(obj).__name__} (written by a development "
                              f"version before it declared its state): run it again")
        entry, key, current = meta[attr], prefix + attr, getattr(obj, attr)
        if "head" in entry:
            setattr(obj, attr, load_head(current, {k: tensors[f"{key}/{k}"] for k in ("weight", "bias")}, entry["head"]))
        elif "heads" in entry:
            saved = {f"expert_head/{k[len(key) + 1:]}": v for k, v in tensors.items() if k.startswith(key + "/")}
            weight = saved["expert_head/0/weight"]
            setattr(obj, attr, load_expert_heads(current if isinstance(current, list) else [], saved, entry["heads"],
                                                 weight.shape[1], weight.device))
        elif "module" in entry:
            current.load_state_dict({k[len(key) + 1:]: v for k, v in tensors.items() if k.startswith(key + "/")})
        elif "tensor" in entry:
            setattr(obj, attr, _into(current, tensors[key]))
        elif "tensors" in entry:
            old = current if isinstance(current, (list, tuple)) and len(current) == entry["tensors"] else None
            setattr(obj, attr, [_into(old[i] if old else None, tensors[f"{key}/{i}"]) for i in range(entry["tensors"])])
        elif "tensor_keys" in entry:
            old = current if isinstance(current, dict) else {}
            setattr(obj, attr, {k: _into(old.get(k), tensors[f"{key}/{k}"]) for k in entry["tensor_keys"]})
        elif "object" in entry:
            if current is None:
                raise RuntimeError(f"state: '{attr}' of {type(obj).__name__} was saved but does not exist now")
            unpack(current, tensors, entry["object"], key + "/")
        else:
            value = entry["value"]
            if isinstance(current, (list, tuple)) and not isinstance(value, list):
                raise RuntimeError(f"state: '{attr}' of {type(obj).__name__} was saved as {value!r}, not a list")
            setattr(obj, attr, value)


def write_attrs(obj: Any, attrs: tuple[str, ...], folder: Path) -> None:
    """Attributes ``attrs`` of ``obj`` as :data:`METHOD_FILES` in ``folder``."""
    tensors, meta = pack(obj, attrs=attrs)
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(folder / METHOD_FILES[0]))
    (folder / METHOD_FILES[1]).write_text(json.dumps(meta, indent=1))


def read_attrs(obj: Any, attrs: tuple[str, ...], folder: Path, device: torch.device | str) -> None:
    """Inverse of :func:`write_attrs`."""
    tensors = load_file(str(folder / METHOD_FILES[0]), device=str(device))
    unpack(obj, tensors, json.loads((folder / METHOD_FILES[1]).read_text()), attrs=attrs)


def _into(current: torch.Tensor | None, saved: torch.Tensor) -> torch.Tensor:
    if isinstance(current, torch.Tensor) and current.shape == saved.shape:
        with torch.no_grad():
            current.copy_(saved)
        return current
    return saved.clone()


# -- PET modules and heads as tensors ---------------------------------------------------------------
def module_tensors(model: torch.nn.Module, modules: list[str]) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the named PET modules, keyed ``pet/<path>``."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {f"pet/{n}": p.detach() for n, p in named if any(in_module(n, m) for m in modules)}


def load_module_tensors(pet: PETMethod, model: torch.nn.Module, modules: list[str],
                        tensors: dict[str, torch.Tensor]) -> None:
    """Create missing modules, then copy saved values into their parameters in place."""
    for name in modules:
        if name not in pet.modules(model):
            pet.add(model, name)
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("pet/"):
                params[key[4:]].copy_(value)


def head_tensors(head: GrowingHead) -> dict[str, torch.Tensor]:
    return {"weight": head.weight.detach(), "bias": head.bias.detach()}


def load_head(head: GrowingHead, tensors: dict[str, torch.Tensor], labels: list[str]) -> GrowingHead:
    """Put saved values into ``head`` in place when its shape matches, else into a new head."""
    if head.weight.shape != tensors["weight"].shape:
        device = head.weight.device
        head = GrowingHead(head.hidden_size, head.init_std, device=device)
        head.weight = torch.nn.Parameter(tensors["weight"].to(device, copy=True))
        head.bias = torch.nn.Parameter(tensors["bias"].to(device, copy=True))
    else:
        with torch.no_grad():
            head.weight.copy_(tensors["weight"])
            head.bias.copy_(tensors["bias"])
    head.labels = list(labels)
    return head


def load_expert_heads(heads: list[GrowingHead], tensors: dict[str, torch.Tensor], labels: list[list[str]],
                      hidden_size: int, device: torch.device | str = "cpu") -> list[GrowingHead]:
    """Per-task heads saved as ``expert_head/<t>/...`` (in place where a head of that shape exists)."""
    out = []
    for t, task_labels in enumerate(labels):
        old = heads[t] if t < len(heads) else GrowingHead(hidden_size, device=device)
        prefix = f"expert_head/{t}/"
        out.append(load_head(old, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                             task_labels))
    return out


def write_module_meta(ctx, t: int, folder: Path, learner: str, module: str, labels: list[str],
                      **extra: Any) -> None:
    """``conpet.json`` beside a saved module: what it is, which task, and the base it is bound to."""
    scope = ctx.pet.scope
    meta = {"learner": learner, "task": ctx.stream.tasks[t].name, "task_index": t, "pet": ctx.pet.name,
            "pet_options": ctx.pet.options, "pet_layers": list(scope.layers) if scope else None,
            "module": module, "model": ctx.cfg.model,
            "backbone_path": str(ctx.backbone.path), "backbone_fingerprint": ctx.backbone.fingerprint,
            "template": ctx.stream.kind, "labels": list(labels), **extra}
    (folder / "conpet.json").write_text(json.dumps(meta, indent=2))
