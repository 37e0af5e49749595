"""EA-EMR: embedding-aligned episodic memory replay (Wang et al. 2019, "Sentence Embedding
Alignment for Lifelong Relation Extraction"), as adapted by ConPET.

A linear alignment layer (initialised to the identity) sits between the backbone's cloze
feature and the head, in training **and at prediction time** (the official ConPET code trains it
but never applies it on LLaMA; here it is always applied). EMR's memory is kept; after each
task the alignment is refit with MSE so that the *current* features of every memory row map to
that row's stored embedding (old rows: the embedding stored before this task; new rows: their
embedding now), then the stored embeddings are refreshed. Defaults follow the official code:
Adam, lr 1e-4, 20 epochs, batch 32 (``align_lr``, ``align_epochs``, ``align_batch_size``).

Cost: ``ea-emr`` refits on the whole memory, whose size grows with the classes seen. ``ea-emr*``
keeps ConPET's promise that task 10 costs what task 2 costs: its refit uses the new task's
memory rows plus as many old memory rows, drawn uniformly (seeded), the same 1:1 mix as its
replay batches, for ``align_epochs`` passes over them; only those rows' stored embeddings are
refreshed (the others keep theirs, which is what the alignment is fit to anyway).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from conpet.learners.emr import EMR
from conpet.learners.options import Option
from conpet.learners.static import register_method


@register_method
class EAEMR(EMR):
    """EMR + a linear embedding alignment applied before the head (Wang et al. 2019)."""

    name = "ea-emr"
    paper = "Wang et al. 2019, Sentence Embedding Alignment for Lifelong Relation Extraction (NAACL)"
    generative = False  # the alignment maps features before a classification head
    shards_backbone = False  # not tried with backbone.fsdp
    options = {"align_lr": Option(1e-4, float, minimum=0.0, help="Adam learning rate of the alignment refit"),
               "align_epochs": Option(20, int, minimum=1, help="passes of the alignment refit"),
               "align_batch_size": Option(32, int, minimum=1, help="batch size of the alignment refit"),
               "align_train_with_task": Option(True, bool, help="also train the alignment with the task's loss")}
    state_attrs = (*EMR.state_attrs, "align", "stored")

    def __init__(self, learner, options) -> None:
        super().__init__(learner, options)
        hidden = learner.ctx.backbone.hidden_size
        self.align = nn.Linear(hidden, hidden, device=learner.ctx.device)
        with torch.no_grad():
            self.align.weight.copy_(torch.eye(hidden))
            self.align.bias.zero_()
        self.stored: dict[int, torch.Tensor] = {}
        self.refit_sizes: list[tuple[int, int]] = []
        """(rows, steps) of each task's alignment refit (constant for ``ea-emr*``)."""

    def needs_memory(self) -> bool:
        return True

    def save(self, folder) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.align.state_dict().items()},
                  str(folder / "alignment.safetensors"))

    def load(self, folder) -> None:
        from safetensors.torch import load_file

        self.align.load_state_dict(load_file(str(folder / "alignment.safetensors")))  # copied onto align's device

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        return self.align(features.float())

    def param_groups(self) -> list[dict]:
        if not self.opts["align_train_with_task"]:
            return []
        return [{"params": list(self.align.parameters()), "lr": self.opts["align_lr"]}]

    def refit_rows(self, t: int, rng: np.random.Generator) -> list[int]:
        """The memory rows the alignment is refit on after task ``t``: all of them (``ea-emr``),
        or the new task's plus as many old ones drawn uniformly (``ea-emr*``: a constant cost)."""
        memory, stream = self.learner.memory, self.learner.ctx.stream
        if not self.learner.dynamic:
            return memory.rows(stream.memory_keys_through(t))
        new = memory.rows(stream.memory_keys(t))
        old = memory.rows(stream.memory_keys_through(t - 1))
        if len(old) > len(new):
            old = [old[k] for k in sorted(rng.choice(len(old), size=len(new), replace=False))]
        return new + old

    def after_task(self, t: int) -> None:
        learner = self.learner
        rng = np.random.default_rng(learner.ctx.seed + 1000 * (t + 1))
        rows = self.refit_rows(t, rng)
        self.refit_sizes.append((len(rows), self.opts["align_epochs"] * -(-len(rows) // self.opts["align_batch_size"])))
        raw = learner.raw_features(rows)
        with torch.no_grad():
            current = self.align(raw)
        targets = torch.stack([self.stored.get(i, current[k]) for k, i in enumerate(rows)])
        opt = torch.optim.Adam(self.align.parameters(), lr=self.opts["align_lr"])
        bs = self.opts["align_batch_size"]
        for _ in range(self.opts["align_epochs"]):
            order = rng.permutation(len(rows))
            for start in range(0, len(rows), bs):
                idx = torch.as_tensor(order[start:start + bs], device=raw.device)
                loss = nn.functional.mse_loss(self.align(raw[idx]), targets[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            aligned = self.align(raw)
        self.stored.update({i: aligned[k].clone() for k, i in enumerate(rows)})
