"""``zscl``: ZSCL, Zero-Shot Continual Learning (Zheng et al. 2023, "Preventing Zero-Shot Transfer
Degradation in Continual Learning of Vision-Language Models", ICCV; official code Thunderbeee/ZSCL
``mtil/src/models/finetune.py``, settings ``mtil/scripts/ZSCL.sh``), for language models.

One PET module learns task after task with, at every step,
``L = CE_ls(task) + kd_weight * tau^2 KL(p_base^tau || p_module^tau) + l2 * sum (theta - theta_start)^2``:
label-smoothed cross-entropy over the new task's classes (the LM loss on generative streams); the
distillation of the frozen base model's next-token distributions (the backbone with the module
switched off, no second model held) on ``ref_batch_size`` chunks of a reference text disjoint
from the tasks, tau 2, optionally over the teacher's top ``kd_top_k`` tokens; the L2 pull of
:mod:`conpet.learners.l2` towards the task's start. A **weight ensemble** (after step 0, every
``we_interval`` steps and the last) replaces the module and the head at the task's end; for LoRA
it averages the update ``s B A`` exactly (factor stacks side by side) and refits it to the
module's rank by a truncated SVD, reporting the relative error (``we_truncation_error``).

Deviations, named (details in docs/learners.md): the KD is ``KL(p_T || p_S)`` (the official
``CE(s / T, softmax(t / T)) T^2`` minus the teacher's entropy, the same gradient); one token-level
KD term (a language model has no second tower); a fresh random reference batch per step; the WE
also snapshots the last step; label smoothing defaults to 0 on generative streams (0.2 on
classification, the official value); conpet's PET and AdamW instead of full fine-tuning of CLIP
ViT-B/16; the L2 covers the PET parameters, not the head; for PET methods whose update is not
linear in their parameters the WE averages parameters; ``train.select_on_dev`` is refused. The
backbone needs its LM head (``needs_lm_head``): an encoder is refused before anything is written.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conpet.data.load import reference_text
from conpet.errors import ConfigError
from conpet.generation import target_tokens, token_logits
from conpet.heads import task_targets
from conpet.inputs import text_chunks
from conpet.learners.base import register_learner
from conpet.learners.context import Context
from conpet.learners.l2 import l2_pull
from conpet.learners.one_module import OneModuleLearner
from conpet.learners.options import Option
from conpet.pet.base import backbone_alone


def token_kd(teacher: torch.Tensor, student: torch.Tensor, temperature: float, top_k: int | None = None) -> torch.Tensor:
    """``tau^2 KL(softmax(teacher / tau) || softmax(student / tau))``, mean over the rows (tokens).

    ``top_k``: over each row's ``top_k`` tokens of the teacher only, both distributions renormalised
    over them (the reference's "optionally over the teacher's top-k vocabulary")."""
    if top_k is not None and top_k < teacher.shape[-1]:
        keep = teacher.topk(top_k, dim=-1).indices
        teacher, student = teacher.gather(-1, keep), student.gather(-1, keep)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def refit(b_stack: torch.Tensor, a_stack: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``b_stack @ a_stack`` ([out, R] x [R, in]) as ``B' A'`` of rank ``rank`` (truncated SVD via QR
    of both stacks, never the dense product): ``A'`` the orthonormal right singular vectors, ``B'``
    the rest; also the squared Frobenius norms of the discarded part and of the whole."""
    qb, rb = torch.linalg.qr(b_stack)
    qa, ra = torch.linalg.qr(a_stack.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, s.shape[0])
    b_new = torch.zeros(b_stack.shape[0], rank, dtype=b_stack.dtype, device=b_stack.device)
    a_new = torch.zeros(rank, a_stack.shape[1], dtype=a_stack.dtype, device=a_stack.device)
    b_new[:, :k] = qb @ (u[:, :k] * s[:k])
    a_new[:k] = vh[:k] @ qa.T
    return b_new, a_new, float((s[k:] ** 2).sum()), float((s ** 2).sum())


class WeightEnsemble:
    """The running average ``theta_hat`` of one task: of ``s B A`` per LoRA layer (kept as side-by-side
    factor stacks, exact) and of every other tensor (``dense``: other PET tensors and the head)."""

    state_attrs = ("n", "b_sum", "a_sum", "mean")

    def __init__(self, lora: list[tuple[nn.Parameter, nn.Parameter, float]], dense: list[nn.Parameter]) -> None:
        self.lora, self.dense = lora, dense
        self.n = 1
        """Weights averaged so far (the task-start weights count as the first)."""
        self.b_sum = [float(s) * b.detach().float().clone() for a, b, s in lora]
        self.a_sum = [a.detach().float().clone() for a, b, s in lora]
        self.mean = [p.detach().clone() for p in dense]

    @torch.no_grad()
    def add(self) -> None:
        """``theta_hat <- (n theta_hat + theta) / (n + 1)`` for the current weights."""
        for k, (a, b, s) in enumerate(self.lora):
            b_sum = torch.cat([self.b_sum[k], float(s) * b.detach().float()], dim=1)
            a_sum = torch.cat([self.a_sum[k], a.detach().float()])
            if a_sum.shape[0] > min(a_sum.shape[1], b_sum.shape[0]):  # past full rank: recompress, exactly
                b_sum, a_sum, _, _ = refit(b_sum, a_sum, min(a_sum.shape[1], b_sum.shape[0]))
            self.b_sum[k], self.a_sum[k] = b_sum, a_sum
        for m, p in zip(self.mean, self.dense):
            m.mul_(self.n / (self.n + 1)).add_(p.detach(), alpha=1.0 / (self.n + 1))
        self.n += 1

    @torch.no_grad()
    def write(self) -> float:
        """Put ``theta_hat`` into the module and head; the relative Frobenius error of refitting the
        averaged LoRA updates to the module's rank (0 without LoRA layers)."""
        dropped = total = 0.0
        for k, (a, b, s) in enumerate(self.lora):
            b_new, a_new, d, w = refit(self.b_sum[k] / self.n, self.a_sum[k], a.shape[0])
            a.copy_(a_new)
            b.copy_(b_new / float(s))
            dropped, total = dropped + d, total + w
        for m, p in zip(self.mean, self.dense):
            p.copy_(m)
        return (dropped / total) ** 0.5 if total > 0 else 0.0


@register_learner("zscl")
class ZSCL(OneModuleLearner):
    """ZSCL: KD from the frozen base on reference text, L2 to the task start, weight ensemble (Zheng et al. 2023)."""

    paper = "Zheng et al. 2023, Preventing Zero-Shot Transfer Degradation in Continual Learning of Vision-Language Models"
    shards_backbone = True
    generative = True
    needs_lm_head = True
    """:func:`conpet.build.prepare` loads the LM head on classification streams too (an encoder is refused)."""
    options = {
        "kd_weight": Option(1.0, float, minimum=0.0, help="weight of the distillation from the frozen base"),
        "temperature": Option(2.0, float, minimum=1e-6, help="distillation temperature tau"),
        "l2": Option(1.0, float, minimum=0.0, help="weight of sum (theta - theta_task_start)^2 over the PET"),
        "we_interval": Option(100, int, minimum=1, help="steps between weight-ensemble snapshots"),
        "ref_batch_size": Option(None, int, minimum=1, nullable=True,
                                 help="reference chunks distilled per step; default train.batch_size"),
        "label_smoothing": Option(None, float, minimum=0.0, nullable=True,
                                  help="of the task loss; default 0.2 on classification, 0 on generative streams"),
        "kd_top_k": Option(None, int, minimum=1, nullable=True,
                           help="distil over the teacher's top-k tokens of each position only (renormalised); "
                                "default: the whole vocabulary"),
    }

    @classmethod
    def validate(cls, cfg, opts) -> None:
        if opts["label_smoothing"] is not None and opts["label_smoothing"] >= 1.0:
            raise ConfigError(f"learner_options.label_smoothing: must be below 1, got {opts['label_smoothing']}")
        if cfg.train.select_on_dev:
            raise ConfigError("train.select_on_dev: zscl keeps the weight ensemble of each task, not a dev-selected "
                              "epoch; leave it off")

    state_attrs = ("task", "step", "last_step", "errors", "anchor", "ensemble")

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.chunks: list[list[int]] | None = None
        self.anchor: list[torch.Tensor] = []
        self.params: list[nn.Parameter] = []
        self.ensemble: WeightEnsemble | None = None
        self.task = 0
        self.step = 0
        """The fit's next step (it picks the step's reference batch)."""
        self.last_step = 0
        self.errors: list[float] = []
        """The WE's LoRA refit error of each finished task."""
        self._targets: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def smoothing(self) -> float:
        given = self.opts["label_smoothing"]
        return given if given is not None else (0.0 if self.ctx.generative else 0.2)

    # -- learning --------------------------------------------------------------------------------------
    def before_task(self, t: int) -> None:
        """The task's anchor (its start weights) and a weight ensemble starting there."""
        self.task, self.step = t, 0
        self._targets = None if self.ctx.generative else task_targets(self.ctx.stream, t, self.ctx.device)
        self.params = self.pet_parameters()
        self.anchor = [p.detach().clone() for p in self.params]
        self.ensemble = self.new_ensemble()

    def fits(self, t: int):
        batches = self.ctx.epoch_batches(self.ctx.stream.tasks[t].train)
        self.last_step = len(batches) - 1
        return [self.fit_on(t, batches, dev_score=None)]

    def after_task(self, t: int) -> None:
        """The ensemble becomes the module (and the head)."""
        self.errors.append(self.ensemble.write())
        self.ensemble = None

    def new_ensemble(self) -> WeightEnsemble:
        """A WE over the module (LoRA layers as ``s B A``) and the head, starting at their current weights."""
        pet, name = self.ctx.pet, self.module_name
        lora = []
        if pet.lora_mergeable and not pet.options.get("use_dora"):
            lora = [(layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
                    for _, layer in pet.tuner_layers(self.model, name) if name in getattr(layer, "lora_A", {})]
        factors = {id(p) for a, b, _ in lora for p in (a, b)}
        dense = [p for p in self.params if id(p) not in factors] + list(self.head.parameters())
        return WeightEnsemble(lora, dense)

    def after_step(self, fit, step: int) -> None:
        """A weight-ensemble snapshot after step 0, every ``we_interval`` steps and the last one."""
        self.step = step + 1
        if step % self.opts["we_interval"] == 0 or step == self.last_step:
            self.ensemble.add()

    def loss(self, indices: list[int]) -> torch.Tensor:
        loss = self.task_loss(indices)
        if self.opts["kd_weight"]:
            loss = loss + self.opts["kd_weight"] * self.kd_loss(self.reference_batch(self.task, self.step))
        if self.opts["l2"]:
            loss = loss + self.opts["l2"] * l2_pull(self.params, self.anchor)
        return loss

    def task_loss(self, indices: list[int]) -> torch.Tensor:
        """Label-smoothed cross-entropy over task ``t``'s classes (LM loss on a generative stream)."""
        ctx = self.ctx
        if ctx.generative:
            logits = token_logits(ctx.engine, self.model, ctx.lm_head, indices)
            return F.cross_entropy(logits, target_tokens(ctx.engine, indices), label_smoothing=self.smoothing)
        columns, local = self._targets
        return F.cross_entropy(self.logits(indices)[:, columns], local[ctx.targets(indices)],
                               label_smoothing=self.smoothing)

    # -- distillation on the reference text ------------------------------------------------------------
    def reference_chunks(self) -> list[list[int]]:
        """The reference text as token chunks of at most ``train.max_length`` (those of the runner's
        reference perplexity), tokenized once."""
        if self.chunks is None:
            ctx = self.ctx
            self.chunks = text_chunks(ctx.backbone.tokenizer, reference_text(ctx.cfg.data.reference_text),
                                      ctx.cfg.train.max_length)
        return self.chunks

    def reference_batch(self, t: int, step: int) -> list[int]:
        """The reference chunk numbers of step ``step`` of task ``t``: a draw without replacement, a
        function of (seed, task, step) alone (a resumed fit draws the same)."""
        chunks = self.reference_chunks()
        size = min(len(chunks), self.opts["ref_batch_size"] or self.ctx.cfg.train.batch_size)
        rng = np.random.default_rng([self.ctx.seed, t, step])
        return sorted(int(i) for i in rng.choice(len(chunks), size=size, replace=False))

    def kd_loss(self, numbers: list[int]) -> torch.Tensor:
        """``tau^2 KL(p_base || p_module)`` at every next-token position of reference chunks ``numbers``."""
        teacher, student = self.reference_logits(numbers)
        return token_kd(teacher, student, self.opts["temperature"], self.opts["kd_top_k"])

    def reference_logits(self, numbers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits [tokens, vocabulary] of the bare backbone (no gradient) and of the
        backbone with the module, at every predicted position of reference chunks ``numbers``;
        the frozen layers below the PET (``train.top_layers``) run once per chunk and run."""
        ctx = self.ctx
        chunks = self.reference_chunks()
        seqs, keys = [chunks[i] for i in numbers], [("zscl-reference", i) for i in numbers]
        lengths = torch.tensor([len(s) for s in seqs], device=ctx.device)
        width = int(lengths.max())
        follows = (torch.arange(1, width, device=ctx.device)[None] < lengths[:, None])  # position k predicts k + 1

        def logits(model: nn.Module) -> torch.Tensor:
            hidden = ctx.engine.sequence_states(model, seqs, keys)
            return ctx.lm_head(hidden[:, : width - 1][follows])

        with torch.no_grad(), backbone_alone(self.model) as bare:
            teacher = logits(bare)
        return teacher, logits(self.model)

    # -- state -----------------------------------------------------------------------------------------
    def eval_extra(self, t: int) -> dict[str, list[float]]:
        return {"we_truncation_error": list(self.errors[: t + 1])}
