"""A linear classification head over the classes seen so far, growing as tasks arrive."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conpet.data.stream import Stream


class GrowingHead(nn.Module):
    """``logits = features @ weight.T + bias`` over the labels added so far (in arrival order).

    Unseen classes have no column, so they can never be predicted.
    """

    def __init__(self, hidden_size: int, init_std: float = 0.02, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.init_std = init_std
        self.labels: list[str] = []
        self.weight = nn.Parameter(torch.zeros(0, hidden_size, device=device))
        self.bias = nn.Parameter(torch.zeros(0, device=device))

    def grow(self, labels: list[str], generator: torch.Generator | None = None) -> None:
        """Append a column for each new label; existing columns keep their values. The new rows are
        drawn on the CPU (``generator`` is a CPU generator), so the same seed gives the same head on
        every device."""
        new = [label for label in labels if label not in self.labels]
        if not new:
            return
        rows = torch.randn(len(new), self.hidden_size, generator=generator) * self.init_std
        self.weight = nn.Parameter(torch.cat([self.weight.data, rows.to(self.weight.device)]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, torch.zeros(len(new), device=self.bias.device)]))
        self.labels.extend(new)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(features.float(), self.weight, self.bias)

    def save(self, folder: Path) -> None:
        save_file({"weight": self.weight.detach().cpu().contiguous(), "bias": self.bias.detach().cpu().contiguous()},
                  str(folder / "head.safetensors"))
        (folder / "head.json").write_text(json.dumps({"labels": self.labels, "hidden_size": self.hidden_size}, indent=2))

    @classmethod
    def load(cls, folder: Path, device: torch.device | str = "cpu") -> "GrowingHead":
        meta = json.loads((folder / "head.json").read_text())
        head = cls(meta["hidden_size"])
        tensors = {k: v.to(device) for k, v in load_file(str(folder / "head.safetensors")).items()}
        head.weight = nn.Parameter(tensors["weight"])
        head.bias = nn.Parameter(tensors["bias"])
        head.labels = list(meta["labels"])
        return head


def concat_heads(heads: list[GrowingHead], hidden_size: int) -> GrowingHead:
    """One head over every class: the experts' heads stacked in task order."""
    out = GrowingHead(hidden_size, device=heads[0].weight.device if heads else "cpu")
    out.weight = torch.nn.Parameter(torch.cat([h.weight.detach() for h in heads]))
    out.bias = torch.nn.Parameter(torch.cat([h.bias.detach() for h in heads]))
    out.labels = [label for h in heads for label in h.labels]
    return out


def task_targets(stream: Stream, t: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Task ``t``'s columns in ``stream``'s global label order, and the lookup from a global target
    to its position among them (-1 for the other classes): what a head over task ``t``'s classes
    predicts (a per-task head of Dynamic ConPET, LAE, InfLoRA)."""
    columns = torch.tensor(stream.task_columns(t), device=device)
    local = torch.full((len(stream.labels),), -1, dtype=torch.long, device=device)
    local[columns] = torch.arange(len(columns), device=device)
    return columns, local
