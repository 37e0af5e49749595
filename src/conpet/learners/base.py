"""The learner interface and registry (the shared run context is
:class:`conpet.learners.context.Context`; the one-module base most learners build on is
:class:`conpet.learners.one_module.OneModuleLearner`).

A learner implements:

- ``learn(t)``: learn task ``t`` of the stream (through :func:`conpet.learners.training.train`,
  which calls its fit hooks :meth:`Learner.setup_forward` and :meth:`Learner.after_step`);
- ``logits(indices)``: logits over the classes seen so far, in the stream's label order;
- ``save(t, folder)``: write its modules after task ``t`` (peft adapter + head);
- ``tunable_params()`` and ``close()``; its resume state is the attributes it lists in
  ``state_attrs`` (:mod:`conpet.learners.state`).

What a learner can do is declared once, as class attributes (its *capabilities*): ``generative``,
``needs_lm_head``, ``shards_backbone``, ``module_per_task``, ``routes``, ``requires_pet``,
``exports_lora``. Build, prediction, export and the tests read them, never a learner's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple

import torch

from conpet.config import RunConfig
from conpet.errors import ConfigError, choices_hint
from conpet.generation import perplexity
from conpet.learners.context import Context
from conpet.learners.loop import FitStats
from conpet.learners.options import Option, check_options
from conpet.learners.state import pack, unpack
from conpet.learners.training import Fit

LEARNERS: dict[str, type["Learner"]] = {}
CAPABILITIES = ("generative", "needs_lm_head", "shards_backbone", "module_per_task", "routes", "requires_pet",
                "exports_lora")
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
    exports_lora: ClassVar[bool] = True
    """Whether every answer comes from one saved module alone (each task's, for a learner with
    :attr:`module_per_task`), so that a server of plain LoRA adapters (vLLM) answers as conpet
    does; not for an ensemble of modules or weights merged into the backbone."""
    options: ClassVar[dict[str, Option]] = {}
    """The learner's options (:class:`conpet.learners.options.Option`), declared once."""
    state_attrs: ClassVar[tuple[str, ...]] = ()
    """The attributes that hold the learner's training state beyond its modules and heads: the
    checkpoint saves and restores them (:func:`conpet.learners.state.pack`)."""

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

    # -- fit hooks (:func:`conpet.learners.training.train` calls them) --------------------------------
    def setup_forward(self, fit: Fit) -> None:
        """Set the model up for a fit's forward passes: by default the fit's module alone is active."""
        self.ctx.pet.activate(self.model, fit.module)

    def after_step(self, fit: Fit, step: int) -> None:
        """Run after every optimizer step of a fit (default: nothing)."""

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

    def task_logits(self, indices: list[int], t: int) -> torch.Tensor:
        """Logits of rows answered as task ``t``'s (a client named the task): the learner's own,
        every column outside task ``t``'s set to -inf (a learner with a module per task uses
        task ``t``'s module instead of its route)."""
        return only_task(self.logits(indices), self.ctx.stream.task_columns(t))

    def task_generate(self, indices: list[int], t: int) -> list[str]:
        """Greedy answers to prompts named as task ``t``'s: one module answers every task, so by
        default the learner's own answers (a learner with a module per task uses task ``t``'s)."""
        return self.generate(indices)

    def rows_replaced(self) -> None:
        """The stream's rows were replaced by others (a served batch): forget anything keyed by
        row index (default: nothing is)."""

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

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to continue training (for resume): tensors and JSON-able metadata
        (here the declared :attr:`state_attrs`; learners with modules add those)."""
        tensors, meta = pack(self, "declared/")
        return tensors, {"declared": meta}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`state`; tensors that already exist are overwritten in place (an
        optimizer holding them stays valid)."""
        unpack(self, tensors, meta.get("declared", {}), "declared/")

    def close(self) -> None:
        """Give the backbone back untouched (remove every PET module)."""


def only_task(logits: torch.Tensor, columns: list[int]) -> torch.Tensor:
    """``logits`` with every column outside ``columns`` (a task's) set to -inf."""
    keep = torch.tensor(columns, device=logits.device)
    out = torch.full_like(logits, float("-inf"))
    out[:, keep] = logits[:, keep]
    return out


def get_learner(name: str) -> type[Learner]:
    if name not in LEARNERS:
        raise ConfigError(f"learner: unknown learner '{name}'{choices_hint(name, LEARNERS)}")
    return LEARNERS[name]
