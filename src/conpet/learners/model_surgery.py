"""``model-surgery``: MOS, Model Surgery (Sun et al., AAAI 2025, "MOS: Model Surgery for
Pre-Trained Model-Based Class-Incremental Learning", official code sun-hailong/AAAI25-MOS). Not
the ``mos`` PET method (Mixture of Shards, a different paper).

Task t trains its own module, warm-started from task t-1's, on its classes with ``reg * L_orth``
(``CE(M M^T / 0.8, I)`` over the old class means and the batch's features), pulled after every
step towards the mean of the finished modules (``adapter_momentum``); then each class gets a
Gaussian (its module) and a prototype (module 0), and from task 2 the head is re-aligned on
pseudo-features (SGD, ``align_epochs``). Prediction retrieves a module per row: the prototype
classifier guesses a task, that module's head prediction refines it (``max_refine`` passes), and
the prediction is the ensemble of both softmaxes. docs/learners.md has the costs and the
generative case (a task is one "class").

Deviations, named: conpet's PET method (default LoRA) and cloze features in place of AdaptFormer
and the ViT class token; AdamW for the task fit (the alignment keeps the official SGD, in its own
loop without in-task checkpoints); the merge once per optimizer step on the training module only
(the official code also moves stored adapters at evaluation); retrieval batched, computing a
(row, module) feature only when reached; one-row classes get covariance 1e-4 I (official: NaN);
no ``multi-centroid``; class-disjoint tasks only.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from conpet.device import full_precision
from conpet.errors import ConfigError
from conpet.generation import target_positions
from conpet.heads import task_targets
from conpet.learners.base import Route, register_learner
from conpet.learners.context import Context
from conpet.learners.options import Option
from conpet.learners.routing import TaskModulesLearner, routed_features
from conpet.learners.training import Fit, dev_scorer, module_features
from conpet.pet.base import counterpart, in_module

ORTH_TEMPERATURE = 0.8
"""The official ``orth_loss`` divides ``M M^T`` by 0.8."""
COVARIANCE_RIDGE = 1e-4


def module_params(model: torch.nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    """Module ``name``'s parameters keyed by their path with the module name replaced by ``*``
    (the same key names the same place in every module)."""
    return {counterpart(n, name, "*"): p for n, p in model.named_parameters() if in_module(n, name)}


def orth_loss(means: torch.Tensor | None, features: torch.Tensor,
              temperature: float = ORTH_TEMPERATURE) -> torch.Tensor:
    """``CE(M M^T / temperature, I)`` over ``M`` = [``means``; ``features``] (unnormalised, fp32):
    each row is pushed away from every other row."""
    with full_precision(features.device):
        m = features.float() if means is None else torch.cat([means.float(), features.float()])
        return F.cross_entropy(m @ m.T / temperature, torch.arange(len(m), device=m.device))


def refine(initial: torch.Tensor, class_task: torch.Tensor,
           logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], max_iter: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """MOS's self-refined retrieval, batched. ``initial``: each row's first task guess;
    ``logits_of(rows, tasks)``: head logits of ``rows`` through the modules of ``tasks``. A row
    stops when its logits point to a class of the task whose module gave them, or after
    ``max_iter`` passes. Returns the last logits of every row and the task that gave them."""
    task = initial.clone()
    active = torch.arange(len(task), device=task.device)
    final = None
    for it in range(max_iter):
        logits = logits_of(active, task[active])
        final = logits.new_empty(len(task), logits.shape[-1]) if final is None else final
        final[active] = logits
        moved = class_task[logits.argmax(-1)]
        again = moved != task[active]
        if it == max_iter - 1 or not bool(again.any()):
            break
        task[active[again]] = moved[again]
        active = active[again]
    return final, task


def class_spread(x: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """Covariance (or its diagonal) of the rows of ``x`` plus ``COVARIANCE_RIDGE`` (unbiased; a
    single row gives the ridge alone)."""
    centered = x - x.mean(0)
    scale = 1.0 / max(1, len(x) - 1)
    if diagonal:
        return (centered * centered).sum(0) * scale + COVARIANCE_RIDGE
    return centered.T @ centered * scale + COVARIANCE_RIDGE * torch.eye(x.shape[1], device=x.device)


@register_learner("model-surgery")
class ModelSurgery(TaskModulesLearner):
    """MOS (Model Surgery, Sun et al. 2025): merged per-task modules, self-refined module retrieval."""

    paper = ("Sun et al. 2025 (AAAI), MOS: Model Surgery for Pre-Trained Model-Based Class-Incremental Learning "
             "(arXiv 2412.09441)")
    generative = True
    routes = "prototype"
    module_prefix = "surgery"
    routing_metric = "retrieval_accuracy"
    saved_attrs = ("protos",)
    state_attrs = ("prefix", "means", "spreads", "protos", "n_tasks")
    options = {
        "adapter_momentum": Option(0.1, float, minimum=0.0, maximum=1.0,
                                   help="pull m of the new module towards the old modules' mean"),
        "reg": Option(0.1, float, minimum=0.0, help="weight of L_orth"),
        "covariance": Option("full", str, choices=("full", "diagonal"), help="per-class Gaussian covariance kept"),
        "align_epochs": Option(30, int, minimum=0, help="classifier-alignment epochs per task (0: none)"),
        "align_lr": Option(0.005, float, minimum=0.0, help="classifier-alignment SGD learning rate"),
        "align_weight_decay": Option(0.005, float, minimum=0.0, help="classifier-alignment SGD weight decay"),
        "align_samples": Option(5, int, minimum=1,
                                help="pseudo-features per class per alignment epoch, x train.batch_size"),
        "max_refine": Option(4, int, minimum=1, help="retrieval passes at most"),
        "ensemble": Option(True, bool, help="add the prototype classifier's softmax (x tasks) to the prediction"),
    }

    @classmethod
    def validate(cls, cfg, opts) -> None:
        if opts["align_lr"] == 0.0 and opts["align_epochs"]:
            raise ConfigError("learner_options.align_lr: must be > 0 (or set align_epochs=0 to skip the alignment)")

    @classmethod
    def validate_domain_incremental(cls, cfg, opts) -> None:
        raise ConfigError("learner 'model-surgery': MOS retrieves a module through the task of the predicted "
                          "class, so each label must belong to one task; this stream's tasks share labels "
                          "(domain-incremental)")

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.prefix: dict[str, torch.Tensor] = {}
        """Running sum of the finished modules' parameters (fp32), keyed by :func:`module_params`."""
        self.merge_pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.means: torch.Tensor | None = None
        """[seen classes, hidden]: class means through each class's own task module (fp32)."""
        self.spreads: torch.Tensor | None = None
        """[seen classes, hidden, hidden] covariances, or [seen classes, hidden] variances."""
        self.protos: torch.Tensor | None = None
        """[seen classes, hidden]: class means through module 0 (the prototype classifier)."""
        self.align_seed = 0

    # -- a task: a warm-started module, merged towards the old ones at every step ----------------------
    def begin_task(self, t: int):
        ctx, pet = self.ctx, self.ctx.pet
        task = ctx.stream.tasks[t]
        self.routed = {}
        torch.manual_seed(int(ctx.rng.integers(2**31)))
        if t == 0:
            self.model = pet.attach(ctx.backbone.model, self.module_of(t), ctx.calibration(t))
        else:  # warm start: the previous task's module, copied
            pet.copy(self.model, self.module_of(t - 1), self.module_of(t))
        self.head.grow(list(task.labels), ctx.torch_gen)
        self.n_tasks = t + 1
        self.align_seed = int(ctx.rng.integers(2**31))
        params = module_params(self.model, self.module_of(t))
        self.merge_pairs = [(p, self.prefix[k]) for k, p in params.items()] if t else []
        return task

    def fits(self, t: int) -> list[Fit]:
        ctx = self.ctx
        columns, local = task_targets(ctx.stream, t, ctx.device)

        def masked_logits(indices: list[int]) -> torch.Tensor:
            logits = self.head(ctx.features(self.model, indices))
            return torch.full_like(logits, float("-inf")).index_copy(1, columns, logits[:, columns])

        return [self.fit_on(t, ctx.epoch_batches(ctx.stream.tasks[t].train), loss=lambda idx: self.task_loss(
            idx, columns, local), module=self.module_of(t), dev_score=dev_scorer(ctx, self.model, [t], masked_logits,
                                                                                   ctx.targets))]

    def task_loss(self, indices: list[int], columns: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """The new task's loss (cross-entropy over its classes, or the LM loss on the target
        tokens) + ``reg * L_orth`` on the batch's features."""
        ctx = self.ctx
        if ctx.generative:  # one forward: target positions for the LM loss, the prompt's last token for L_orth
            states = ctx.engine.states(self.model, indices)
            rows, pos, nxt = target_positions(ctx.engine, indices)
            task_loss = F.cross_entropy(ctx.lm_head(states[rows, pos]).float(), nxt)
            cloze = torch.tensor([ctx.encoded.cloze_pos[i] for i in indices], device=ctx.device)
            features = states[torch.arange(len(indices), device=ctx.device), cloze]
        else:
            features = ctx.features(self.model, indices)
            task_loss = F.cross_entropy(self.head(features)[:, columns], local[ctx.targets(indices)])
        return task_loss + self.opts["reg"] * orth_loss(self.means, features)

    @torch.no_grad()
    def after_step(self, fit, step: int) -> None:
        """``theta_t <- (1 - m) theta_t + m (sum of the finished modules) / t``, once per step (from the second task)."""
        if not (fit.task and self.opts["adapter_momentum"]):
            return
        m, n_old = self.opts["adapter_momentum"], self.n_tasks - 1
        for p, total in self.merge_pairs:
            p.mul_(1.0 - m).add_(total.to(p.dtype), alpha=m / n_old)

    def after_task(self, t: int) -> None:
        """Freeze the module and add it to the running sum; class statistics; classifier alignment."""
        with torch.no_grad():
            for key, p in module_params(self.model, self.module_of(t)).items():
                p.requires_grad_(False)
                if key in self.prefix:
                    self.prefix[key].add_(p.float())
                else:
                    self.prefix[key] = p.detach().float().clone()
        self.store_statistics(t)
        if t and self.opts["align_epochs"]:
            self.align(self.align_seed)

    @torch.no_grad()
    def store_statistics(self, t: int) -> None:
        """Gaussian (through module t) and prototype (through module 0) of each class of task t."""
        ctx, pet = self.ctx, self.ctx.pet
        rows = list(ctx.stream.tasks[t].train)
        pet.activate(self.model, self.module_of(t))
        own = module_features(ctx, self.model, rows)
        if t:
            pet.activate(self.model, self.module_of(0))
        base = module_features(ctx, self.model, rows) if t else own
        targets = ctx.targets(rows)
        diagonal = self.opts["covariance"] == "diagonal"
        with full_precision(ctx.device):
            picks = [targets == c for c in ctx.stream.task_columns(t)]
            means = torch.stack([own[p].mean(0) for p in picks])
            spreads = torch.stack([class_spread(own[p], diagonal) for p in picks])
            protos = torch.stack([base[p].mean(0) for p in picks])
        self.means, self.spreads, self.protos = (new if old is None else torch.cat([old, new]) for old, new in
                                                 ((self.means, means), (self.spreads, spreads), (self.protos, protos)))
        pet.activate(self.model, self.module_of(t))

    def align(self, seed: int) -> None:
        """Classifier alignment: the head alone, SGD on pseudo-features from every class's Gaussian."""
        ctx, opts = self.ctx, self.opts
        gen = torch.Generator().manual_seed(seed)
        n = opts["align_samples"] * ctx.cfg.train.batch_size
        classes, hidden = self.means.shape
        if opts["covariance"] == "diagonal":
            factors = self.spreads.sqrt()
        else:  # Cholesky factors in fp64 (features of large norm), one class at a time
            factors = torch.stack([torch.linalg.cholesky(s.double()).float() for s in self.spreads])
        labels = torch.arange(classes, device=ctx.device).repeat_interleave(n)
        optimizer = torch.optim.SGD(self.head.parameters(), lr=opts["align_lr"], momentum=0.9,
                                    weight_decay=opts["align_weight_decay"])
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=opts["align_epochs"])
        with full_precision(ctx.device):
            for _ in range(opts["align_epochs"]):
                noise = torch.randn(classes, n, hidden, generator=gen).to(ctx.device)
                noise = noise * factors[:, None] if factors.dim() == 2 else noise @ factors.transpose(1, 2)
                samples = (self.means[:, None] + noise).reshape(classes * n, hidden)
                order = torch.randperm(classes * n, generator=gen).to(ctx.device)
                samples, targets = samples[order], labels[order]
                for k in range(classes):
                    loss = F.cross_entropy(self.head(samples[k * n:(k + 1) * n]), targets[k * n:(k + 1) * n])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                schedule.step()

    # -- retrieval and prediction ------------------------------------------------------------------------
    def class_task(self) -> torch.Tensor:
        stream = self.ctx.stream
        return torch.tensor([stream.task_of_label[label] for label in self.head.labels], device=self.ctx.device)

    @torch.no_grad()
    def retrieve(self, indices: list[int]) -> tuple[torch.Tensor, Route]:
        """Class probabilities [rows, seen classes] (the ensemble, or the refined head's alone) and
        the route: the retrieved task of each row (the task of its most probable class) and the
        probability mass of each task's classes."""
        ctx, model = self.ctx, self.model
        model.eval()
        class_task = self.class_task()
        cache: dict[tuple[int, int], torch.Tensor] = {}

        def features(rows: list[int], tasks: list[int]) -> torch.Tensor:
            missing = [(r, j) for r, j in dict.fromkeys(zip(rows, tasks)) if (r, j) not in cache]
            if missing:
                feats = routed_features(ctx, model, [indices[r] for r, _ in missing],
                                        [self.module_of(j) for _, j in missing])
                cache.update(zip(missing, feats.float()))
            return torch.stack([cache[(r, j)] for r, j in zip(rows, tasks)])

        def head_logits(rows: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
            feats = features(rows.tolist(), tasks.tolist())
            with full_precision(ctx.device):
                return self.head(feats)

        base = features(list(range(len(indices))), [0] * len(indices))
        with full_precision(ctx.device):
            proto = F.normalize(base, dim=-1) @ F.normalize(self.protos, dim=-1).T
        final, _ = refine(class_task[proto.argmax(-1)], class_task, head_logits, self.opts["max_refine"])
        with full_precision(ctx.device):
            probs = F.softmax(final, dim=-1)
            if self.opts["ensemble"]:
                probs = (probs + F.softmax(proto * self.n_tasks, dim=-1)) / 2
        retrieved = class_task[probs.argmax(-1)]
        per_task = probs.new_zeros(len(indices), self.n_tasks).index_add_(1, class_task, probs)
        self.routed.update(zip(indices, retrieved.tolist()))
        ctx.pet.activate(model, self.module_name)
        return probs, Route(retrieved[:, None], per_task)

    def logits_and_route(self, indices: list[int]) -> tuple[torch.Tensor, Route]:
        """log of the retrieval's class probabilities (the official ensemble, halved), and the route."""
        probs, route = self.retrieve(indices)
        return torch.log(probs), route

    def tunable_params(self) -> dict[str, int]:
        per_module = self.ctx.pet.count(self.model, self.module_of(0))
        head = sum(p.numel() for p in self.head.parameters())
        stats = sum(x.numel() for x in (self.means, self.spreads, self.protos) if x is not None)
        return {"pet_params": per_module * self.n_tasks, "pet_params_per_task": per_module, "head_params": head,
                "tunable_params": per_module + head,
                "stored_params": per_module * (self.n_tasks + 1) + head + stats}


module_name = ModelSurgery.module_of
"""Task ``t``'s module name."""
