"""Learners as small plugins: a registry, the learner interface and the one-module base (the shared
run context is :class:`conpet.learners.context.Context`).

A learner implements:

- ``learn(t)``: learn task ``t`` of the stream (through :func:`conpet.learners.loop.fit`);
- ``logits(indices)``: logits over the classes seen so far, in the stream's label order;
- ``save(t, folder)``: write its modules after task ``t`` (peft adapter + head);
- ``tunable_params()`` and ``close()``.

What a learner can do is declared once, as class attributes (its *capabilities*): ``generative``,
``needs_lm_head``, ``shards_backbone``, ``module_per_task``, ``routes``, ``requires_pet``. Build,
prediction, export and the tests read them, never a learner's name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from conpet.config import RunConfig
from conpet.device import shrink_on_oom
from conpet.errors import ConfigError, choices_hint
from conpet.generation import perplexity, target_tokens, token_logits
from conpet.heads import GrowingHead, task_targets
from conpet.inputs import sorted_batches
from conpet.learners.context import Context
from conpet.learners.loop import FitStats, fit, pet_training, predict
from conpet.learners.options import Option, check_options
from conpet.pet.base import PETMethod, in_module
from conpet.replay import ExemplarMemory
from conpet.runs import adapter_dir

LEARNERS: dict[str, type["Learner"]] = {}
CAPABILITIES = ("generative", "needs_lm_head", "shards_backbone", "module_per_task", "routes", "requires_pet")
"""The class attributes that declare what a learner can do (``learner.json`` of a run records them)."""
CONPET_PAPER = "Song et al. 2023, ConPET: Continual Parameter-Efficient Tuning for Large Language Models (arXiv 2309.14763)"
"""ConPET's paper: Static and Dynamic ConPET, and the lower and upper bounds it measures against."""
ROUTES = ("selector", "prototype")
"""How a learner with a module per task can choose the module of a row (:attr:`Learner.routes`)."""


class Route(NamedTuple):
    """Where a routing learner sent each row: ``tasks`` [rows, k], the tasks whose modules answered
    (best first), and ``confidence`` [rows, tasks seen], the router's probability of every task."""

    tasks: torch.Tensor
    confidence: torch.Tensor


def register_learner(name: str) -> Callable[[type["Learner"]], type["Learner"]]:
    def wrap(cls: type["Learner"]) -> type["Learner"]:
        cls.name = name
        LEARNERS[name] = cls
        return cls

    return wrap


class Learner:
    name: ClassVar[str] = "?"
    paper: ClassVar[str] = ""
    """The method's paper (``conpet learners`` prints it)."""
    generative: ClassVar[bool] = False
    """Whether the learner trains and evaluates generative (prompt -> target) streams."""
    needs_lm_head: ClassVar[bool] = False
    """Whether the learner reads the backbone's next-token distributions on classification
    streams too (ZSCL's distillation): it then needs a causal LM, checked before anything is written."""
    shards_backbone: ClassVar[bool] = False
    """Whether the learner runs with ``backbone.fsdp`` (a sharded backbone): every forward pass it
    makes must run on every process in the same order (they are collectives), and it is tested so."""
    module_per_task: ClassVar[bool] = False
    """Whether the learner keeps one PET module per task, every one of them used at prediction
    (export writes each), rather than one module that answers every input."""
    routes: ClassVar[str | None] = None
    """How a prediction picks the module of each row, for a learner with :attr:`module_per_task`:
    ``"selector"`` (a learned PET module selector), ``"prototype"`` (retrieval by class prototypes);
    ``None``: no routing. A routing learner returns its :class:`Route` from
    :meth:`logits_and_route` and :meth:`generate_and_route`."""
    requires_pet: ClassVar[str | None] = None
    """The PET method the learner is built around (``pet.method`` must name it), or ``None``."""
    options: ClassVar[dict[str, Option]] = {}
    """The learner's options (:class:`conpet.learners.options.Option`), declared once."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.opts = ctx.options
        self.last_fit: FitStats | None = None

    @classmethod
    def check_options(cls, cfg: RunConfig) -> dict[str, Any]:
        """``cfg.learner_options`` checked, converted and completed with defaults."""
        opts = check_options(cls.name, cls.options, cfg.learner_options)
        cls.validate(cfg, opts)
        return opts

    @classmethod
    def validate(cls, cfg: RunConfig, opts: dict[str, Any]) -> None:
        """Checks that involve several options or the rest of the config (default: none)."""

    @classmethod
    def validate_generative(cls, cfg: RunConfig, opts: dict[str, Any]) -> None:
        """Checks a generative (prompt -> target) stream adds to :meth:`validate` (default: none)."""

    @classmethod
    def validate_domain_incremental(cls, cfg: RunConfig, opts: dict[str, Any]) -> None:
        """Checks a domain-incremental stream (tasks that share labels) adds (default: none)."""

    def learn(self, t: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def logits(self, indices: list[int]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def logits_and_route(self, indices: list[int]) -> tuple[torch.Tensor, Route | None]:
        """:meth:`logits` and, for a learner that :attr:`routes`, where each row went."""
        return self.logits(indices), None

    def generate(self, indices: list[int]) -> list[str]:  # pragma: no cover - abstract
        """Greedy answers to the prompts of rows ``indices`` (generative streams)."""
        raise NotImplementedError

    def generate_and_route(self, indices: list[int]) -> tuple[list[str], Route | None]:
        """:meth:`generate` and, for a learner that :attr:`routes`, the module each prompt went to."""
        return self.generate(indices), None

    def save(self, t: int, folder: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def tunable_params(self) -> dict[str, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def eval_extra(self, t: int) -> dict[str, list[float]]:
        """Extra per-task metrics after task ``t`` (one value per seen task), e.g. selector accuracy."""
        return {}

    def reference_model(self) -> torch.nn.Module:  # pragma: no cover - abstract
        """The backbone with the module that answers general text (generative streams)."""
        raise NotImplementedError

    def reference_perplexity(self, chunks: list[list[int]]) -> float:
        """Perplexity of the reference text (token ``chunks``) as the learner serves it: through
        :meth:`reference_model` (a learner that routes inputs overrides this)."""
        ctx = self.ctx
        return perplexity(self.reference_model(), ctx.lm_head, chunks, ctx.compute, ctx.cfg.train.eval_batch_size)

    def restore(self, run_dir: Path, seed: int) -> None:  # pragma: no cover - abstract
        """Load the learner's state after the last task of seed ``seed`` of run ``run_dir`` (for prediction)."""
        raise NotImplementedError

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # pragma: no cover - abstract
        """Everything needed to continue training (for resume): tensors and JSON-able metadata."""
        raise NotImplementedError

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:  # pragma: no cover
        """Inverse of :meth:`state`; tensors that already exist are overwritten in place (an
        optimizer holding them stays valid)."""
        raise NotImplementedError

    def close(self) -> None:
        """Give the backbone back untouched (remove every PET module)."""


class OneModuleLearner(Learner):
    """One PET module + one growing head, trained with cross-entropy over all seen classes."""

    module_name = "default"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.model = None
        self.head = ctx.new_head()

    def new_module(self, t: int | None = None) -> None:
        """(Re)create a freshly initialised PET module (data-aware methods calibrate on task
        ``t``'s rows) and an empty head."""
        if self.model is not None:
            self.ctx.backbone.model = self.ctx.pet.detach(self.model)
        torch.manual_seed(int(self.ctx.rng.integers(2**31)))
        calibration = self.ctx.calibration(t) if t is not None else None
        self.model = self.ctx.pet.attach(self.ctx.backbone.model, self.module_name, calibration)
        self.head = self.ctx.new_head()

    plugins: tuple = ()
    """Method plugins (see :class:`conpet.learners.static.Plugin`); none for sequential/joint."""

    def features(self, indices: list[int]) -> torch.Tensor:
        """Cloze features of rows, after any plugin's feature transform (EA-EMR's alignment)."""
        features = self.ctx.features(self.model, indices)
        for plugin in self.plugins:
            features = plugin.transform(features)
        return features

    def logits(self, indices: list[int]) -> torch.Tensor:
        return self.head(self.features(indices))

    def objective_loss(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The task loss of a batch and the logits it came from: cross-entropy over the seen
        classes, or (generative streams) the LM loss on the target tokens, with the next-token
        logits [target tokens of the batch, vocabulary] (prompt tokens are never counted)."""
        if self.ctx.generative:
            logits = token_logits(self.ctx.engine, self.model, self.ctx.lm_head, indices)
            return F.cross_entropy(logits, target_tokens(self.ctx.engine, indices)), logits
        logits = self.logits(indices)
        return F.cross_entropy(logits, self.ctx.targets(indices)), logits

    def loss(self, indices: list[int]) -> torch.Tensor:
        loss, logits = self.objective_loss(indices)
        for plugin in self.plugins:
            loss = loss + plugin.extra_loss(indices, logits)
        return loss

    def begin_task(self, t: int):
        """The start every one-module learner shares: the module made at the first task, head
        columns for task ``t``'s labels; returns the task."""
        if self.model is None:
            self.new_module(t)
        task = self.ctx.stream.tasks[t]
        self.grow_head(list(task.labels))
        return task

    def grow_head(self, labels: list[str]) -> None:
        """Add head columns for ``labels`` (classification; a generative stream answers through the LM head)."""
        if not self.ctx.generative:  # a label an earlier task brought (domain-incremental) keeps its column
            self.head.grow(labels, self.ctx.torch_gen)

    def generate(self, indices: list[int]) -> list[str]:
        """Greedy answers to the prompts of rows ``indices`` (generative streams)."""
        self.ctx.pet.activate(self.model, self.module_name)
        return self.ctx.generate(self.model, indices)

    def reference_model(self) -> torch.nn.Module:
        """The backbone with the module that answers, for the reference-text perplexity."""
        self.ctx.pet.activate(self.model, self.module_name)
        self.model.eval()
        return self.model

    def pet_parameters(self) -> list[torch.nn.Parameter]:
        return self.ctx.pet.parameters(self.model, self.module_name)

    def train_on(self, indices: list[int], desc: str, task: int, batches: list[list[int]] | None = None) -> FitStats:
        """Train on ``batches`` (default: ``epochs`` length-bucketed passes over ``indices``) for task ``task``."""
        batches = batches if batches is not None else self.ctx.epoch_batches(indices)
        extra = list(self.head.parameters()), [g for plugin in self.plugins for g in plugin.param_groups()]
        score = dev_scorer(self.ctx, self.model, list(range(task + 1)), self.logits, self.ctx.targets)
        self.last_fit = train_module(self.ctx, self.model, self.module_name, self.loss, batches, desc, task, *extra,
                                     dev_score=score)
        return self.last_fit

    def raw_features(self, indices: list[int]) -> torch.Tensor:
        """Backbone + PET cloze features (no plugin transform), in fp32, for memories and fits."""
        return module_features(self.ctx, self.model, indices)

    def save(self, t: int, folder: Path) -> None:
        self.ctx.pet.save(self.model, self.module_name, folder)
        self.head.save(folder)
        for plugin in self.plugins:
            plugin.save(folder)
        write_module_meta(self.ctx, t, folder, self.name, self.module_name, self.head.labels)

    def restore(self, run_dir: Path, seed: int) -> None:
        """Load the state after the stream's last task of seed ``seed`` of run ``run_dir``."""
        folder = adapter_dir(run_dir, seed, self.ctx.stream.tasks[-1].name)
        self.model = self.ctx.pet.attach_from(self.ctx.backbone.model, folder, self.module_name)
        self.model.eval()
        self.head = GrowingHead.load(folder, self.ctx.device)
        for plugin in self.plugins:
            plugin.load(folder)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"modules": []}
        if self.model is not None:
            meta["modules"] = self.ctx.pet.modules(self.model)
            tensors.update(module_tensors(self.model, meta["modules"]))
        tensors.update({f"head/{k}": v for k, v in head_tensors(self.head).items()})
        meta["head_labels"] = list(self.head.labels)
        if getattr(self, "memory", None) is not None:
            meta["memory"] = self.memory.rows_by_class
        for k, plugin in enumerate(self.plugins):
            t, m = plugin.state()
            tensors.update({f"plugin{k}/{name}": v for name, v in t.items()})
            meta[f"plugin{k}"] = m
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta["modules"]:
            if self.model is None:
                self.new_module()
            load_module_tensors(self.ctx.pet, self.model, meta["modules"], tensors)
            self.ctx.pet.activate(self.model, self.module_name)
        self.head = load_head(self.head, {k[5:]: v for k, v in tensors.items() if k.startswith("head/")},
                              meta["head_labels"])
        if "memory" in meta:
            self.memory.rows_by_class = {k: list(v) for k, v in meta["memory"].items()}
        for k, plugin in enumerate(self.plugins):
            prefix = f"plugin{k}/"
            plugin.load_state({n[len(prefix):]: v for n, v in tensors.items() if n.startswith(prefix)},
                              meta[f"plugin{k}"])

    def tunable_params(self) -> dict[str, int]:
        pet = self.ctx.pet.count(self.model, self.module_name)
        head = sum(p.numel() for p in self.head.parameters())
        method = sum(p.numel() for plugin in self.plugins for g in plugin.param_groups() for p in g["params"])
        return {"pet_params": pet, "head_params": head, "method_params": method, "tunable_params": pet + head + method}

    def close(self) -> None:
        if self.model is not None:
            self.ctx.backbone.model = self.ctx.pet.detach(self.model)
            self.model = None


def train_module(ctx: Context, model: torch.nn.Module, module: str, loss_fn, batches: list[list[int]], desc: str,
                 task: int, head_params: list[torch.nn.Parameter], extra_groups: list[dict] = (),
                 dev_score: Callable[[], float] | None = None,
                 activate: Callable[[], None] | None = None, after_step: Sequence[Callable[[int], None]] = (),
                 pet_frozen: bool = False, epochs: int | None = None) -> FitStats:
    """One fit of PET module ``module`` (+ a head, + a method's own tensors) through the loop,
    with the PET method's own groups, regulariser and step hook; the model is left in eval mode.
    ``dev_score`` (:func:`dev_scorer`): keep the best epoch on dev rows. ``activate``: how the
    forward pass is set up (default: ``module`` alone active; O-LoRA stacks its frozen history).
    ``after_step``: hooks run after every optimizer step (LAE's EMA). ``pet_frozen``: the module
    does not train, only the head and extra groups (LAE's warm-up). ``epochs``: how many epochs
    ``batches`` hold (default ``train.epochs``; where ``dev_score`` looks)."""
    if activate is None:
        ctx.pet.activate(model, module)
    else:
        activate()
    model.train()
    train = ctx.cfg.train
    if pet_frozen:
        for p in ctx.pet.parameters(model, module):
            p.requires_grad_(False)
        groups, hooks = [], []
    else:
        groups, loss_fn, hooks = pet_training(ctx.pet, model, module, train.lr, loss_fn, len(batches), task)
    groups.append({"params": list(head_params), "lr": train.head_lr})
    groups.extend(extra_groups)
    for group in extra_groups:  # a method's own tensors train, even those of a frozen module (FPF)
        for p in group["params"]:
            p.requires_grad_(True)
    stats = fit(loss_fn, groups, batches, train, ctx.compute, desc=desc, progress=ctx.progress,
                after_step=[*hooks, *after_step], checkpointer=ctx.checkpointer, dev_score=dev_score,
                epochs=epochs or train.epochs)
    model.eval()
    return stats


def new_task_loss(ctx: Context, t: int, logits: Callable[[list[int]], torch.Tensor],
                  lm_loss_fn: Callable[[list[int]], torch.Tensor]) -> Callable[[list[int]], torch.Tensor]:
    """Cross-entropy over task ``t``'s classes only (the per-task head of LAE and InfLoRA: the
    columns of its labels in ``logits(rows)``); ``lm_loss_fn`` on a generative stream."""
    columns, local = task_targets(ctx.stream, t, ctx.device)

    def loss(indices: list[int]) -> torch.Tensor:
        if ctx.generative:
            return lm_loss_fn(indices)
        return F.cross_entropy(logits(indices)[:, columns], local[ctx.targets(indices)])

    return loss


def dev_scorer(ctx: Context, model: torch.nn.Module, tasks: list[int], logits: Callable[[list[int]], torch.Tensor],
               targets: Callable[[list[int]], torch.Tensor]) -> Callable[[], float] | None:
    """With ``train.select_on_dev``: a function giving the mean over ``tasks`` of the accuracy of
    ``argmax logits(rows)`` against ``targets(rows)`` on each task's **dev** rows (test rows are
    never looked at); ``None`` otherwise."""
    if not ctx.cfg.train.select_on_dev:
        return None
    groups = [ctx.stream.tasks[j].dev for j in tasks if ctx.stream.tasks[j].dev]
    if not groups:
        raise ConfigError("train.select_on_dev: the tasks seen so far have no dev rows (give rows with split: dev, "
                          "or leave split out so that 10% of each class becomes dev)")

    def score() -> float:
        was_training = model.training
        model.eval()
        accs = []
        for rows in groups:
            preds = predict(logits, sorted_batches(rows, ctx.encoded.lengths(rows), ctx.cfg.train.eval_batch_size),
                            ctx.compute)
            accs.append(sum(preds[i] == int(gold) for i, gold in zip(rows, targets(rows))) / len(rows))
        model.train(was_training)
        return float(np.mean(accs))

    return score


@torch.no_grad()
def module_features(ctx: Context, model: torch.nn.Module, indices: list[int]) -> torch.Tensor:
    """Cloze features [len(indices), hidden] in fp32 through the model's active module, in
    length-sorted batches under the run's autocast (memories, fits, Fisher-free passes)."""
    model.eval()
    out = torch.zeros(len(indices), ctx.backbone.hidden_size, device=ctx.device)
    position = {i: k for k, i in enumerate(indices)}

    def features(rows: list[int]) -> torch.Tensor:
        with ctx.compute.autocast():
            return ctx.features(model, rows).float()

    for batch in sorted_batches(indices, ctx.encoded.lengths(indices), ctx.cfg.train.eval_batch_size):
        out[[position[i] for i in batch]] = shrink_on_oom(features, batch, join=torch.cat,
                                                          on_shrink=ctx.compute.empty_cache)
    return out


def update_memory(ctx: Context, memory: ExemplarMemory, t: int, features) -> None:
    """Add exemplars of task ``t``'s classes to ``memory``, chosen on ``features(rows)`` (k-means
    nearest-to-centroid, :func:`conpet.replay.select_exemplars`); one batched pass over the task."""
    stream = ctx.stream
    rows = list(stream.tasks[t].train)
    feats = features(rows).cpu().numpy()
    position = {i: k for k, i in enumerate(rows)}
    for label in stream.tasks[t].labels:
        own = [i for i in rows if stream.rows[i].label == label]
        memory.add_class(stream.memory_key(t, label), own, feats[[position[i] for i in own]], seed=ctx.seed)


def write_module_meta(ctx: Context, t: int, folder: Path, learner: str, module: str, labels: list[str],
                      **extra: Any) -> None:
    """``conpet.json`` beside a saved module: what it is, which task, and the base it is bound to."""
    scope = ctx.pet.scope
    meta = {"learner": learner, "task": ctx.stream.tasks[t].name, "task_index": t, "pet": ctx.pet.name,
            "pet_options": ctx.pet.options, "pet_layers": list(scope.layers) if scope else None,
            "module": module, "model": ctx.cfg.model,
            "backbone_path": str(ctx.backbone.path), "backbone_fingerprint": ctx.backbone.fingerprint,
            "template": ctx.stream.kind, "labels": list(labels), **extra}
    (folder / "conpet.json").write_text(json.dumps(meta, indent=2))


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


def get_learner(name: str) -> type[Learner]:
    if name not in LEARNERS:
        raise ConfigError(f"learner: unknown learner '{name}'{choices_hint(name, LEARNERS)}")
    return LEARNERS[name]
