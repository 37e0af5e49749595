"""``model-surgery``: MOS, Model Surgery (Sun et al., AAAI 2025, "MOS: Model Surgery for
Pre-Trained Model-Based Class-Incremental Learning", official code sun-hailong/AAAI25-MOS). Not
the ``mos`` PET method (Mixture of Shards, a different paper).

- **One module per task, warm-started.** Task t trains its own PET module ``surgery-<t>``, made at
  the start of the task as a copy of task t-1's module (the official adapter is never
  re-initialised). Loss: cross-entropy over the new task's classes (old-class logits at -inf) plus
  ``reg * L_orth``, where ``L_orth = CE(M M^T / 0.8, I)`` over ``M`` = [stored class means of the
  old classes; the batch's unnormalised features] (the batch alone at the first task).
- **Adapter merging.** After every optimizer step from the second task on,
  ``theta_t <- (1 - m) theta_t + m mean(theta_0 .. theta_{t-1})`` (``m`` = ``adapter_momentum``),
  parameter by parameter; the mean comes from one running sum of the finished modules, so its
  cost does not grow with the number of tasks.
- **After each task.** The module is frozen and stored; each new class gets a Gaussian of its
  training features through that module (mean + covariance + 1e-4 I, fp32) and a prototype (its
  mean feature through module 0). From the second task on, **classifier alignment**: the head
  alone trains ``align_epochs`` epochs of SGD (momentum 0.9, cosine schedule) on pseudo-features
  drawn from every class's Gaussian (``align_samples x batch`` per class per epoch, in batches of
  that size), seeded.
- **Self-refined retrieval.** The prototype classifier (cosine to the prototypes, module 0's
  features) guesses a class, hence a task; that task's module's features go through the head,
  giving a class and a task; repeated until the task is stable or ``max_refine`` passes have run.
  Prediction: ``softmax(head logits of the last pass) + softmax(proto logits x T)`` (T tasks seen;
  ``ensemble``); :meth:`logits` returns the log of half that sum.

Cost per task: one fit of one module, two feature passes over the task's rows (its module and
module 0), and ``align_epochs x classes`` head steps. What grows with the tasks: one stored module
per task, and per class a mean, a prototype and a covariance (``hidden^2`` floats; ``hidden`` with
``covariance: diagonal``). Inference: up to 1 + ``max_refine`` module passes per input, whatever
the number of tasks (rows routed per row in one batch); the official code runs all T + 1 up front.

Generative streams: each task is one "class" (its name), so the same machinery retrieves a task
from the prompt (features at the prompt's last token, which never sees the target): prototypes and
Gaussians per task, a head over tasks trained only by the alignment (a task's cross-entropy over
its own single column is constant, so it is left out), ``L_orth`` on the prompt features beside
the LM loss on the target tokens; the module of the task the ensemble picks generates the answer.
The reference-text perplexity is measured through the last task's module.

Deviations, named:

- conpet's PET method (default LoRA) in place of the AdaptFormer adapter (closest:
  ``--pet parallel_adapter --set pet.options.bottleneck=16 --set pet.options.scaling=0.1``, without
  its 0.1 dropout); features are conpet's cloze features, not the ViT's class token.
- conpet's optimizer for the task fit (AdamW, ``train.lr``, ``train.head_lr``, ``train.epochs``,
  no schedule) where the official code runs SGD (lr 0.05, momentum 0.9, weight decay 0.005,
  cosine, head at 0.1x the lr); the alignment keeps the official SGD, in its own loop (not
  :func:`~conpet.learners.loop.fit`, so no in-task checkpoint inside it: a run killed there resumes
  from the fit's last checkpoint and redoes it, to the same result).
- The merge runs once per optimizer step, on the training module only. The official
  ``reweight_adapter`` writes ``.data`` in place inside every block's forward pass (12 pulls per
  forward, plus one per step) and also on stored adapters at evaluation, so they drift towards
  the prefix mean on every test batch; here stored modules never change (tested bit for bit), and
  the Gaussians are taken through the module as its task ended.
- Retrieval is batched and computes a (row, module) feature only when the loop reaches it (same
  predictions as the official per-row loop over all T + 1 features, tested).
- ``covariance: diagonal`` is the official ``variance``; ``multi-centroid`` is not offered. A
  class with one training row gets covariance 1e-4 I (the official ``torch.cov`` gives NaN there).
- Tasks must be class-disjoint (retrieval maps a class to its task): a domain-incremental stream
  is a ConfigError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conpet.device import full_precision
from conpet.errors import ConfigError
from conpet.generation import target_positions
from conpet.heads import GrowingHead, task_targets
from conpet.learners.base import Learner, Route, register_learner
from conpet.learners.context import Context
from conpet.learners.state import head_tensors, load_head, load_module_tensors, module_tensors, write_module_meta
from conpet.learners.training import Fit, dev_scorer, module_features, train
from conpet.learners.options import Option
from conpet.learners.routing import load_task_modules, routed_features, routed_generate
from conpet.pet.base import counterpart, in_module
from conpet.runs import adapter_dir

ORTH_TEMPERATURE = 0.8
"""The official ``orth_loss`` divides ``M M^T`` by 0.8."""
COVARIANCE_RIDGE = 1e-4
PROTOTYPES = "prototypes.safetensors"


def module_name(t: int) -> str:
    return f"surgery-{t:03d}"


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
class ModelSurgery(Learner):
    """MOS (Model Surgery, Sun et al. 2025): merged per-task modules, self-refined module retrieval."""

    paper = ("Sun et al. 2025 (AAAI), MOS: Model Surgery for Pre-Trained Model-Based Class-Incremental Learning "
             "(arXiv 2412.09441)")
    generative = True
    module_per_task = True
    routes = "prototype"
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
        self.model = None
        self.head = ctx.new_head()
        self.n_tasks = 0
        self.prefix: dict[str, torch.Tensor] = {}
        """Running sum of the finished modules' parameters (fp32), keyed by :func:`module_params`."""
        self.merge_pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.means: torch.Tensor | None = None
        """[seen classes, hidden]: class means through each class's own task module (fp32)."""
        self.spreads: torch.Tensor | None = None
        """[seen classes, hidden, hidden] covariances, or [seen classes, hidden] variances."""
        self.protos: torch.Tensor | None = None
        """[seen classes, hidden]: class means through module 0 (the prototype classifier)."""
        self.routed: dict[int, int] = {}
        """Retrieved task of each evaluated row (for :meth:`eval_extra`)."""

    # -- learning --------------------------------------------------------------------------------------
    def learn(self, t: int) -> None:
        ctx, pet = self.ctx, self.ctx.pet
        task = ctx.stream.tasks[t]
        name = module_name(t)
        self.routed = {}
        torch.manual_seed(int(ctx.rng.integers(2**31)))
        if t == 0:
            self.model = pet.attach(ctx.backbone.model, name, ctx.calibration(t))
        else:  # warm start: the previous task's module, copied
            pet.copy(self.model, module_name(t - 1), name)
        self.head.grow(list(task.labels), ctx.torch_gen)
        self.n_tasks = t + 1
        align_seed = int(ctx.rng.integers(2**31))
        columns, local = task_targets(ctx.stream, t, ctx.device)

        def masked_logits(indices: list[int]) -> torch.Tensor:
            logits = self.head(ctx.features(self.model, indices))
            return torch.full_like(logits, float("-inf")).index_copy(1, columns, logits[:, columns])

        params = module_params(self.model, name)
        self.merge_pairs = [(p, self.prefix[k]) for k, p in params.items()] if t else []
        score = dev_scorer(ctx, self.model, [t], masked_logits, ctx.targets)
        self.last_fit = train(ctx, self.model, Fit(t, f"{task.name} model-surgery", ctx.epoch_batches(task.train),
                                                   lambda idx: self.loss(idx, columns, local), name,
                                                   list(self.head.parameters()), dev_score=score), self)
        with torch.no_grad():
            for key, p in params.items():
                p.requires_grad_(False)
                if key in self.prefix:
                    self.prefix[key].add_(p.float())
                else:
                    self.prefix[key] = p.detach().float().clone()
        self.store_statistics(t)
        if t and self.opts["align_epochs"]:
            self.align(align_seed)

    def loss(self, indices: list[int], columns: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
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

    @torch.no_grad()
    def store_statistics(self, t: int) -> None:
        """Gaussian (through module t) and prototype (through module 0) of each class of task t."""
        ctx, pet = self.ctx, self.ctx.pet
        rows = list(ctx.stream.tasks[t].train)
        pet.activate(self.model, module_name(t))
        own = module_features(ctx, self.model, rows)
        if t:
            pet.activate(self.model, module_name(0))
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
        pet.activate(self.model, module_name(t))

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
                                        [module_name(j) for _, j in missing])
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
        ctx.pet.activate(model, module_name(self.n_tasks - 1))
        return probs, Route(retrieved[:, None], per_task)

    def logits(self, indices: list[int]) -> torch.Tensor:
        return self.logits_and_route(indices)[0]

    def logits_and_route(self, indices: list[int]) -> tuple[torch.Tensor, Route]:
        """log of the retrieval's class probabilities (the official ensemble, halved), and the route."""
        probs, route = self.retrieve(indices)
        return torch.log(probs), route

    def generate(self, indices: list[int]) -> list[str]:
        return self.generate_and_route(indices)[0]

    @torch.no_grad()
    def generate_and_route(self, indices: list[int]) -> tuple[list[str], Route]:
        """Greedy answers, each prompt generated by the module of the task retrieval picks for it."""
        ctx = self.ctx
        with ctx.compute.autocast():  # generation calls it outside the evaluation's autocast
            route = self.retrieve(indices)[1]
        modules = [module_name(int(j)) for j in route.tasks[:, 0].tolist()]
        return routed_generate(ctx, self.model, indices, modules), route

    def reference_model(self) -> torch.nn.Module:
        """The last task's module (general text has no task to retrieve)."""
        self.ctx.pet.activate(self.model, module_name(self.n_tasks - 1))
        self.model.eval()
        return self.model

    def eval_extra(self, t: int) -> dict[str, list[float]]:
        """Retrieval accuracy (the retrieved task is the row's task) on each seen task's evaluation rows."""
        ctx = self.ctx
        accs = []
        for j in range(t + 1):
            rows = ctx.stream.tasks[j].split(ctx.cfg.data.eval_split)
            missing = [i for i in rows if i not in self.routed]
            size = ctx.cfg.train.eval_batch_size
            for start in range(0, len(missing), size):
                with ctx.compute.autocast():
                    self.retrieve(missing[start:start + size])
            accs.append(sum(self.routed[i] == j for i in rows) / max(1, len(rows)))
        return {"retrieval_accuracy": accs}

    # -- saving, restoring, resuming -----------------------------------------------------------------------
    def save(self, t: int, folder: Path) -> None:
        self.ctx.pet.save(self.model, module_name(t), folder)
        self.head.save(folder)
        save_file({"prototypes": self.protos.detach().cpu().contiguous()}, str(folder / PROTOTYPES))
        write_module_meta(self.ctx, t, folder, self.name, module_name(t), self.head.labels)

    def restore(self, run_dir: Path, seed: int) -> None:
        """Every task's module, and the head and prototypes after the last task."""
        tasks = self.ctx.stream.tasks
        self.model = load_task_modules(self.ctx, self.model, run_dir, seed, module_name)
        folder = adapter_dir(run_dir, seed, tasks[-1].name)
        self.head = GrowingHead.load(folder, self.ctx.device)
        self.protos = load_file(str(folder / PROTOTYPES))["prototypes"].to(self.ctx.device)
        self.n_tasks = len(tasks)
        self.model.eval()

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        modules = self.ctx.pet.modules(self.model) if self.model is not None else []
        tensors = dict(module_tensors(self.model, modules)) if modules else {}
        tensors.update({f"head/{k}": v for k, v in head_tensors(self.head).items()})
        tensors.update({f"prefix/{k}": v for k, v in self.prefix.items()})
        for key in ("means", "spreads", "protos"):
            if getattr(self, key) is not None:
                tensors[f"stats/{key}"] = getattr(self, key)
        return tensors, {"modules": modules, "head_labels": list(self.head.labels), "n_tasks": self.n_tasks,
                         "prefix": sorted(self.prefix)}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        pet = self.ctx.pet
        if meta["modules"]:
            if self.model is None:
                self.model = pet.attach(self.ctx.backbone.model, meta["modules"][0])
            load_module_tensors(pet, self.model, meta["modules"], tensors)
            pet.activate(self.model, meta["modules"][-1])
        self.head = load_head(self.head, {k[5:]: v for k, v in tensors.items() if k.startswith("head/")},
                              meta["head_labels"])
        for key in meta["prefix"]:  # in place: the merge step holds these tensors
            value = tensors[f"prefix/{key}"]
            if key in self.prefix and self.prefix[key].shape == value.shape:
                self.prefix[key].copy_(value)
            else:
                self.prefix[key] = value.to(self.ctx.device, copy=True)
        for key in ("means", "spreads", "protos"):
            value = tensors.get(f"stats/{key}")
            setattr(self, key, None if value is None else value.to(self.ctx.device, copy=True))
        self.n_tasks = meta["n_tasks"]

    def tunable_params(self) -> dict[str, int]:
        per_module = self.ctx.pet.count(self.model, module_name(0))
        head = sum(p.numel() for p in self.head.parameters())
        stats = sum(x.numel() for x in (self.means, self.spreads, self.protos) if x is not None)
        return {"pet_params": per_module * self.n_tasks, "pet_params_per_task": per_module, "head_params": head,
                "tunable_params": per_module + head,
                "stored_params": per_module * (self.n_tasks + 1) + head + stats}

    def close(self) -> None:
        if self.model is not None:
            self.ctx.backbone.model = self.ctx.pet.detach(self.model)
            self.model = None
