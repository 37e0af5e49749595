"""EA-EMR: embedding-aligned episodic memory replay (Wang et al. 2019, "Sentence Embedding
Alignment for Lifelong Relation Extraction"), as adapted by ConPET.

A linear alignment layer (initialised to the identity) sits between the backbone's cloze
feature and the head, in training **and at prediction time** (the official ConPET code trains it
but never applies it on LLaMA; here it is always applied). EMR's memory is kept; after each
task the alignment is refit with MSE so that the *current* features of every memory row map to
that row's stored embedding (old rows: the embedding stored before this task; new rows: their
embedding now), then the stored embeddings are refreshed. Defaults follow the official code:
Adam, lr 1e-4, 20 epochs, batch 32 (``align_lr``, ``align_epochs``, ``align_batch_size``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from conpet.learners.emr import EMR
from conpet.learners.static import register_method


@register_method
class EAEMR(EMR):
    """EMR + a linear embedding alignment applied before the head (Wang et al. 2019)."""

    name = "ea-emr"
    options = {"align_lr": 1e-4, "align_epochs": 20, "align_batch_size": 32, "align_train_with_task": True}

    def __init__(self, learner, options) -> None:
        super().__init__(learner, options)
        hidden = learner.ctx.backbone.hidden_size
        self.align = nn.Linear(hidden, hidden)
        with torch.no_grad():
            self.align.weight.copy_(torch.eye(hidden))
            self.align.bias.zero_()
        self.stored: dict[int, torch.Tensor] = {}

    def needs_memory(self) -> bool:
        return True

    def save(self, folder) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.align.state_dict().items()}, str(folder / "alignment.safetensors"))

    def load(self, folder) -> None:
        from safetensors.torch import load_file

        self.align.load_state_dict(load_file(str(folder / "alignment.safetensors")))

    def state(self):
        rows = sorted(self.stored)
        tensors = {f"align/{k}": v.detach() for k, v in self.align.state_dict().items()}
        if rows:
            tensors["stored"] = torch.stack([self.stored[i] for i in rows])
        return tensors, {"stored_rows": rows}

    def load_state(self, tensors, meta):
        with torch.no_grad():  # in place: an optimizer may hold these tensors
            for k, v in self.align.state_dict(keep_vars=True).items():
                v.copy_(tensors[f"align/{k}"])
        rows = meta["stored_rows"]
        self.stored = {i: tensors["stored"][k].clone() for k, i in enumerate(rows)} if rows else {}

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        return self.align(features.float())

    def param_groups(self) -> list[dict]:
        if not self.opts["align_train_with_task"]:
            return []
        return [{"params": list(self.align.parameters()), "lr": float(self.opts["align_lr"])}]

    def after_task(self, t: int) -> None:
        learner = self.learner
        rows = learner.memory.rows(learner.ctx.stream.seen_labels(t))
        raw = learner.raw_features(rows)
        with torch.no_grad():
            current = self.align(raw)
        targets = torch.stack([self.stored.get(i, current[k]) for k, i in enumerate(rows)])
        opt = torch.optim.Adam(self.align.parameters(), lr=float(self.opts["align_lr"]))
        rng = np.random.default_rng(learner.ctx.seed + 1000 * (t + 1))
        bs = int(self.opts["align_batch_size"])
        for _ in range(int(self.opts["align_epochs"])):
            order = rng.permutation(len(rows))
            for start in range(0, len(rows), bs):
                idx = torch.as_tensor(order[start:start + bs])
                loss = nn.functional.mse_loss(self.align(raw[idx]), targets[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            aligned = self.align(raw)
        self.stored = {i: aligned[k].clone() for k, i in enumerate(rows)}
