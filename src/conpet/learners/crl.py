"""``crl`` / ``crl*``: consistent representation learning (Zhao et al. 2022, "Consistent
Representation Learning for Continual Relation Extraction"), as ConPET adapts it (official code
Raincleared-Song/ConPET, folder ``CRL/``) - ConPET's third former method.

- **Model.** The cloze feature h (the PET-tuned backbone's hidden state at the slot) and a
  projection ``Linear(d, d) - ReLU - Linear(d, 64)``, its output z L2-normalised. No linear head:
  prediction is the **nearest class prototype** (squared Euclidean distance on h; a prototype is
  the mean h of the class's exemplars under the current module).
- **Supervised contrastive loss against a memory bank** of z (one entry per row of the stage's
  data, refreshed with the batch's z after every step, no momentum): for a batch row i with
  label y_i and the bank entries P_i of the same label,
  ``-1/|P_i| sum_{j in P_i} log(exp(z_i . z_j / tau) / sum_k exp(z_i . z_k / tau))``, tau 0.1,
  averaged over the rows that have a positive. The bank is subsampled to ``sample_k`` entries
  (then one entry of every batch label the sample missed is added; the official code redraws
  until every label is present). One sample per optimizer step, for the whole batch's labels,
  and the batch's z written after the step: the same draws and writes under ``train.grad_accum``
  and several processes as when one process computes the whole batch.
- **Per task.** Stage 1: the bank holds the new task's rows; ``epochs`` passes over them with the
  contrastive loss. Exemplars of the new classes by k-means on h (``memory_per_class``). From the
  second task on, stage 2: the bank holds every exemplar; the contrastive loss plus a **KL
  distillation** on old-class rows: target ``softmax(10 P_old[y] . P_old^T)`` (normalised
  prototypes from the end of the previous task), prediction ``log_softmax(10 z . C^T)`` (C: the
  normalised bank centroids of the old classes in z-space); ``crl`` runs ``epochs`` passes over
  the exemplars, ``crl*`` ConPET's dynamic replay batches (new rows : old rows 1:1, a fixed number
  of steps, the shared replay options). Then the new classes' exemplars are chosen again and the
  prototypes of every seen class recomputed.

Defaults from ``CRL/config.py``: feature dim 64, temperature 0.1, KL temperature 10,
``sample_k`` 1000 (ConPET's summary says 500 sampled negatives; the config file says 1000).
Deviations, named: conpet's AdamW settings and ``train.grad_clip`` (the official code clips at 10);
the projection trains at ``train.head_lr``; no ``+1e-4`` inside the exponent. Classification only:
a prototype classifier has nothing to say about generated text.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conpet import distributed
from conpet.learners.base import register_learner
from conpet.learners.context import Context
from conpet.learners.one_module import OneModuleLearner
from conpet.learners.training import update_memory
from conpet.learners.loop import step_batch
from conpet.learners.options import REPLAY_OPTIONS, Option
from conpet.replay import ExemplarMemory, replay_schedule, split_batch


class Projection(nn.Module):
    """``Linear(d, d) - ReLU - Linear(d, dim)``, output L2-normalised (CRL's ``lora_head``)."""

    def __init__(self, hidden: int, dim: int, device) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)).to(device)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(h.float()), dim=-1)


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, bank_z: torch.Tensor, bank_labels: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """Supervised contrastive loss of batch ``z`` against the bank (positives: same label)."""
    logits = z @ bank_z.T / temperature
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == bank_labels[None, :]).float()
    count = positive.sum(dim=1)
    per_row = -(positive * log_prob).sum(dim=1) / count.clamp(min=1)
    has = count > 0
    return per_row[has].mean() if bool(has.any()) else z.sum() * 0.0


class MomentBank:
    """z of every row of a stage's data, refreshed with each batch's z (CRL's ``Moment``)."""

    state_attrs = ("rows", "z", "labels")

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.z = torch.zeros(0)
        self.labels = torch.zeros(0, dtype=torch.long)

    def fill(self, rows: list[int], z: torch.Tensor, labels: torch.Tensor) -> None:
        self.rows = list(rows)
        self.z, self.labels = z.detach().clone(), labels.clone()

    def update(self, rows: list[int], z: torch.Tensor) -> None:
        position = {i: k for k, i in enumerate(self.rows)}
        keep = [(r, position[i]) for r, i in enumerate(rows) if i in position]
        if keep:  # out of place: this step's loss still reads the old bank in its backward pass
            batch, slots = zip(*keep)
            fresh = self.z.clone()
            fresh[list(slots)] = z.detach()[list(batch)].to(self.z.dtype)
            self.z = fresh

    def sample(self, k: int, needed: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """At most ``k`` random entries, plus one of every ``needed`` label the draw missed."""
        n = len(self.labels)
        if n <= k:
            return self.z, self.labels
        chosen = set(rng.choice(n, size=k, replace=False).tolist())
        present = set(self.labels[sorted(chosen)].tolist())
        for label in needed.unique().tolist():
            if label not in present:
                where = (self.labels == label).nonzero().flatten().tolist()
                if where:
                    chosen.add(int(rng.choice(where)))
        idx = torch.tensor(sorted(chosen), device=self.z.device)
        return self.z[idx], self.labels[idx]

    def centroids(self, n_classes: int) -> torch.Tensor:
        """Normalised mean z of each of the first ``n_classes`` classes (zeros if absent)."""
        out = torch.zeros(n_classes, self.z.shape[1], device=self.z.device)
        for c in range(n_classes):
            mask = self.labels == c
            if bool(mask.any()):
                out[c] = self.z[mask].mean(dim=0)
        return F.normalize(out, dim=-1)


class CRL(OneModuleLearner):
    """CRL as ConPET adapts it: supervised contrastive learning + prototype distillation (Zhao et al. 2022)."""

    paper = "Zhao et al. 2022, Consistent Representation Learning for Continual Relation Extraction"
    dynamic: ClassVar[bool] = False
    shards_backbone = True  # the bank's rows are gathered from every process (_write_bank)
    state_attrs = ("memory", "projection", "prototypes", "old_prototypes", "bank")
    saved_attrs = ("projection", "prototypes")

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.projection = Projection(ctx.backbone.hidden_size, self.opts["feature_dim"], ctx.device)
        self.memory = ExemplarMemory(self.opts["memory_per_class"])
        self.bank = MomentBank()
        self.prototypes: torch.Tensor | None = None
        """[seen classes, hidden]: the mean h of each class's exemplars (prediction)."""
        self.old_prototypes: torch.Tensor | None = None
        self._step: tuple[list[int], torch.Tensor, torch.Tensor] | None = None
        """The running optimizer step's global rows and the bank rows sampled for their labels."""
        self._written: list[tuple[list[int], torch.Tensor]] = []
        """This process's rows of the running step and their (detached) z, for the bank after the step."""

    @classmethod
    def validate(cls, cfg, opts) -> None:
        if cls.dynamic:
            split_batch(cfg.train.batch_size, opts["new_ratio"])

    # -- learning ------------------------------------------------------------------------------------
    def before_task(self, t: int) -> None:
        self._fill_bank(list(self.ctx.stream.tasks[t].train))

    def fits(self, t: int):
        """Stage 1 on the task's rows, the new classes' exemplars, then (from the second task) stage 2."""
        ctx, stream, task = self.ctx, self.ctx.stream, self.ctx.stream.tasks[t]
        projection = list(self.projection.parameters())  # the projection replaces the head (its columns unused)
        yield self.fit_on(t, ctx.epoch_batches(task.train), loss=self.contrastive_loss, params=projection,
                          dev_score=None)
        update_memory(ctx, self.memory, t, self.raw_features)
        if t > 0:
            self.old_prototypes = F.normalize(self.prototypes.float(), dim=-1)
            exemplars = self.memory.rows(stream.memory_keys_through(t))
            if self.dynamic:
                train = ctx.cfg.train
                lengths = ctx.encoded.all_lengths if train.length_bucketing else None
                batches = replay_schedule(stream, t, self.opts, self.memory, train.batch_size, train.epochs,
                                          ctx.rng, lengths)
                self._fill_bank(sorted(set(exemplars) | set(task.train)))
            else:
                batches = ctx.epoch_batches(exemplars)
                self._fill_bank(exemplars)
            yield self.fit_on(t, batches, desc=f"{task.name} crl memory", loss=self.distilled_loss, params=projection,
                              dev_score=None)

    def after_task(self, t: int) -> None:
        """The new classes' exemplars chosen again after stage 2, and every seen class's prototype."""
        if t > 0:
            update_memory(self.ctx, self.memory, t, self.raw_features)
        self._compute_prototypes(t)

    def after_step(self, fit, step: int) -> None:
        self._write_bank(step)

    def _fill_bank(self, rows: list[int]) -> None:
        with torch.no_grad():
            z = self.projection(self.raw_features(rows))
        self.bank.fill(rows, z, self.ctx.targets(rows))

    def _step_bank(self, indices: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """The running step's global batch and the bank rows sampled for its labels, drawn at the
        step's first loss call: one draw per optimizer step on every process, however the batch is
        cut into shares and micro-batches, as one process computing the whole batch draws."""
        if self._step is None:
            rows = step_batch()
            if rows is None:  # the cache would outlive the call: no after-step hook clears it
                raise RuntimeError("CRL's losses run inside conpet.learners.loop.fit's optimizer steps")
            bank_z, bank_labels = self.bank.sample(self.opts["sample_k"], self.ctx.targets(rows), self.ctx.rng)
            self._step = (rows, bank_z, bank_labels)
        return self._step

    def _write_bank(self, step: int) -> None:
        """After each optimizer step: every row of the step's batch goes into the bank with its z,
        gathered from every process in rank order (the batch's order: shares are contiguous)."""
        mine, self._written, self._step = self._written, [], None
        if distributed.active():
            parts = distributed.gather_objects([(rows, z.cpu()) for rows, z in mine])
            mine = [(rows, z.to(self.ctx.device)) for part in parts for rows, z in part]
        if mine:
            self.bank.update([i for rows, _ in mine for i in rows], torch.cat([z for _, z in mine]))

    def contrastive_loss(self, indices: list[int]) -> torch.Tensor:
        """Stage 1: the supervised contrastive loss against the bank."""
        return self._bank_loss(indices, distil=False)

    def distilled_loss(self, indices: list[int]) -> torch.Tensor:
        """Stage 2: the contrastive loss plus the KL to the previous task's prototypes (old classes)."""
        return self._bank_loss(indices, distil=True)

    def _bank_loss(self, indices: list[int], distil: bool) -> torch.Tensor:
        z = self.projection(self.ctx.features(self.model, indices))
        labels = self.ctx.targets(indices)
        rows, bank_z, bank_labels = self._step_bank(indices)
        loss = supcon_loss(z, labels, bank_z, bank_labels, self.opts["temperature"])
        n_old = self.old_prototypes.shape[0] if distil else 0
        old = labels < n_old
        if bool(old.any()):
            kl_t = self.opts["kl_temperature"]
            centroids = self.bank.centroids(n_old)
            prediction = F.log_softmax(kl_t * z[old] @ centroids.T, dim=-1)
            target = F.softmax(kl_t * self.old_prototypes[labels[old]] @ self.old_prototypes.T, dim=-1)
            # the mean over the whole batch's old rows; the loop weights this micro-batch's or share's
            # loss by len(indices) / len(rows) (per process), which the last factor undoes for this term
            n_old_rows = int((self.ctx.targets(rows) < n_old).sum())
            kl = F.kl_div(prediction, target, reduction="sum")
            loss = loss + kl / n_old_rows * len(rows) / len(indices)
        if not distributed.in_placeholder_pass():
            self._written.append((list(indices), z.detach()))
        return loss

    @torch.no_grad()
    def _compute_prototypes(self, t: int) -> None:
        stream = self.ctx.stream
        labels = stream.seen_labels(t)
        rows = self.memory.rows(stream.memory_keys_through(t))
        feats = self.raw_features(rows)
        targets = self.ctx.targets(rows)
        protos = torch.zeros(len(labels), feats.shape[1], device=feats.device)
        for c in range(len(labels)):
            mask = targets == c
            if bool(mask.any()):
                protos[c] = feats[mask].mean(dim=0)
        self.prototypes = protos

    # -- prediction ----------------------------------------------------------------------------------
    def logits(self, indices: list[int]) -> torch.Tensor:
        """Minus the squared Euclidean distance of h to every seen class's prototype."""
        h = self.ctx.features(self.model, indices).float()
        return -torch.cdist(h, self.prototypes.float()) ** 2

    def tunable_params(self) -> dict[str, int]:
        out = super().tunable_params()
        projection = sum(p.numel() for p in self.projection.parameters())
        out["head_params"] = projection
        out["tunable_params"] = out["pet_params"] + projection
        return out


CRL_OPTIONS = {
    "feature_dim": Option(64, int, minimum=1, help="dimension of the projection z"),
    "temperature": Option(0.1, float, minimum=1e-6, help="contrastive temperature"),
    "kl_temperature": Option(10.0, float, minimum=1e-6, help="prototype-similarity distillation temperature"),
    "sample_k": Option(1000, int, minimum=1, help="bank entries each contrastive loss reads"),
}

for _dynamic in (False, True):
    _name = "crl*" if _dynamic else "crl"
    register_learner(_name)(type(f"CRL{'Star' if _dynamic else ''}", (CRL,), {
        "dynamic": _dynamic, "options": {**REPLAY_OPTIONS, **CRL_OPTIONS}, "__module__": __name__,
        "__doc__": f"{CRL.__doc__} ({'dynamic replay' if _dynamic else 'original schedule'})"}))
