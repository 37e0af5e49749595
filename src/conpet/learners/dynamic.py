"""Dynamic ConPET (Song et al. 2023): one PET module per task and a learned PET module selector.

- **Experts.** Task t gets its own PET module ``expert-<t>`` (a named peft adapter on the one
  shared backbone) and a head over task t's classes. Nothing an expert learned is ever
  overwritten by a later task.
- **Selector.** Its own PET module ``selector`` plus a head over task ids. From the second task
  on it is retrained at each new task with cross-entropy over tasks on ConPET's dynamic replay
  batches (new-task rows + old rows, each old row from a uniformly chosen old task), a fixed
  number of steps. Initialisation (documented choice): at task 2 the selector module is fresh;
  at later tasks it continues from the previous selector (the official code starts it from the
  previous *expert's* LoRA with the previous selector's head, a quirk not copied); its head grows
  by keeping the old rows (copied) and adding one new row for the new task (:mod:`selector`).
- **Prediction.** One selector pass -> top-k tasks -> only those experts run (rows routed with
  peft's per-row ``adapter_names`` in one batch) -> their logits fill their class columns, all
  others -inf -> argmax over seen classes. Cost per input: 1 + k backbone passes, whatever the
  number of tasks (and with ``train.top_layers`` the frozen lower layers are shared by all of them).
- **Expert training** uses teacher forcing (the gold task is always among the k). With k = 1 the
  new expert trains on its own rows only (old rows could not give it a gradient). With k >= 2 it
  trains on the replay batches against the frozen old experts' logits, which are cached by
  (task, row, module version) so that a stale entry can never be read.

- **Generative streams.** The selector reads the prompt (its last token's state, which under
  causal attention never sees the target) and routes it to one expert (``top_k`` 1), which
  generates the whole answer (greedy decoding with peft's per-row ``adapter_names``: one batch,
  each row through its own expert). Each expert trains with the LM loss on its own task's target
  tokens. The reference-text perplexity is measured as the system serves text: each reference
  chunk goes to the expert the selector picks for it.

Options (``learner_options``): ``top_k`` (1); the shared replay options (``steps_per_task``,
ConPET's ``batch_limit``, ``new_ratio``, ``replay_source``, ``memory_per_class``);
``expert_init``: ``fresh`` (default), ``previous`` (copy the last expert) or ``selector`` (the
official code's: the new expert starts from the selector module just trained for this task);
``selector_balance`` (false; see :mod:`conpet.learners.selector`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from conpet.backbone import last_hidden
from conpet.errors import ConfigError
from conpet.generation import lm_loss, perplexity
from conpet.heads import GrowingHead, task_targets
from conpet.inputs import right_padded
from conpet.learners.base import CONPET_PAPER, Route, register_learner
from conpet.learners.context import Context
from conpet.learners.state import write_module_meta
from conpet.learners.training import Fit, dev_scorer, module_features, update_memory
from conpet.learners.options import REPLAY_OPTIONS, Option
from conpet.learners.routing import TaskModulesLearner, load_task_modules, routed_features
from conpet.learners.selector import SELECTOR, ModuleSelector
from conpet.replay import ExemplarMemory, replay_schedule, split_batch
from conpet.runs import adapter_dir


@register_learner("dynamic")
class DynamicConPET(TaskModulesLearner):
    """One PET module per task + a learned PET module selector (Dynamic ConPET, Song et al. 2023)."""

    paper = CONPET_PAPER
    generative = True
    shards_backbone = True  # with top_k 1: every step and prediction is one routed pass on every process
    routes = "selector"
    module_prefix = "expert"
    routing_metric = "selector_accuracy"
    options = {
        "top_k": Option(1, int, minimum=1, help="experts each input runs through"),
        **REPLAY_OPTIONS,
        "expert_init": Option("fresh", str, choices=("fresh", "previous", "selector"),
                              help="a new expert starts fresh, from the last expert, or from the selector"),
        "selector_balance": Option(False, bool, help="task-balanced selector loss"),
    }
    state_attrs = ("n_tasks", "versions", "expert_heads", "selector", "memory", "cache")

    @classmethod
    def validate(cls, cfg, opts) -> None:
        split_batch(cfg.train.batch_size, opts["new_ratio"])
        if cfg.backbone.fsdp and opts["top_k"] != 1:
            raise ConfigError(f"backbone.fsdp: top_k {opts['top_k']} fills old experts' logits for the rows each process "
                              f"misses, a different number of forward passes per process; a sharded backbone needs "
                              f"top_k=1")

    @classmethod
    def validate_domain_incremental(cls, cfg, opts) -> None:
        if opts["top_k"] != 1:
            raise ConfigError(f"learner_options.top_k: {opts['top_k']} experts of tasks that share labels would fill "
                              "the same columns; on a domain-incremental stream each input goes to one expert "
                              "(top_k=1)")

    @classmethod
    def validate_generative(cls, cfg, opts) -> None:
        if opts["top_k"] != 1:
            raise ConfigError(f"learner_options.top_k: {opts['top_k']} experts cannot share one generated answer; "
                              "on a generative stream the selector routes each prompt to one expert (top_k=1)")

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.expert_heads: list[GrowingHead] = []
        self.selector = ModuleSelector(ctx, self.opts["selector_balance"])
        self.memory = ExemplarMemory(self.opts["memory_per_class"])
        self.versions: dict[str, int] = {}
        self.logit_cache: dict[tuple[int, int, int], torch.Tensor] = {}
        self.expert_fit = None
        """The last task's expert fit alone (``last_fit`` adds the selector's)."""
        self.task_target_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def selector_head(self) -> GrowingHead:
        return self.selector.head

    @property
    def cache(self) -> dict[str, torch.Tensor]:
        """The old experts' cached logits as resume state: per task, the (task, row, version) keys and the logits."""
        by_task: dict[int, list] = {}
        for key in sorted(self.logit_cache):
            by_task.setdefault(key[0], []).append(key)
        out = {}
        for task, keys in by_task.items():
            out[f"{task}/keys"] = torch.tensor(keys, dtype=torch.long)
            out[f"{task}/logits"] = torch.stack([self.logit_cache[k] for k in keys])
        return out

    @cache.setter
    def cache(self, saved: dict[str, torch.Tensor]) -> None:
        self.logit_cache = {}
        for name in saved:
            if name.endswith("/keys"):
                keys, logits = saved[name].tolist(), saved[name[:-4] + "logits"]
                self.logit_cache.update({tuple(k): logits[r].to(self.ctx.device, copy=True) for r, k in enumerate(keys)})

    # -- modules ---------------------------------------------------------------------------------
    def _new_module(self, name: str, t: int, copy_from: str | None = None) -> None:
        torch.manual_seed(int(self.ctx.rng.integers(2**31)))
        pet = self.ctx.pet
        if self.model is None:
            self.model = pet.attach(self.ctx.backbone.model, name, self.ctx.calibration(t))
        elif copy_from is not None:
            pet.copy(self.model, copy_from, name)
        elif name not in pet.modules(self.model):
            pet.add(self.model, name, self.ctx.calibration(t))
        self.versions[name] = self.versions.get(name, -1) + 1

    def _features(self, indices: list[int], modules: list[str]) -> torch.Tensor:
        """Features of each row through its own module (one batch, peft's per-row routing)."""
        if self.model.training or len(set(modules)) == 1:
            self.ctx.pet.activate(self.model, modules[0])
            return self.ctx.features(self.model, indices)
        return routed_features(self.ctx, self.model, indices, modules)

    def replay_batches(self, t: int) -> list[list[int]]:
        train = self.ctx.cfg.train
        lengths = self.ctx.encoded.all_lengths if train.length_bucketing else None
        return replay_schedule(self.ctx.stream, t, self.opts, self.memory, train.batch_size, train.epochs,
                               self.ctx.rng, lengths)

    # -- learning ----------------------------------------------------------------------------------
    def learn(self, t: int) -> None:
        stream = self.ctx.stream
        task = stream.tasks[t]
        self.n_tasks = t + 1
        self.routed = {}
        self.selector.head.grow([task.name], self.ctx.torch_gen)
        replay = self.replay_batches(t) if t > 0 else None
        selector_fit = None
        if t > 0:
            self._new_module(SELECTOR, t)
            selector_fit = self.train(self.selector.fit(self.model, replay, f"{task.name} selector", t))
            self.versions[SELECTOR] += 1

        name = expert_name(t)
        copy = {"previous": expert_name(t - 1), "selector": SELECTOR}.get(self.opts["expert_init"]) if t > 0 else None
        self._new_module(name, t, copy_from=copy)
        head = self.ctx.new_head()
        if not self.ctx.generative:  # a generative expert answers through the LM head
            head.grow(list(task.labels), self.ctx.torch_gen)
        self.expert_heads.append(head)
        k = min(self.opts["top_k"], t + 1)
        score = dev_scorer(self.ctx, self.model, [t], lambda idx: head(self.ctx.features(self.model, idx)),
                           lambda idx: self._local_targets(t, idx))
        if k == 1 or t == 0:
            def expert_loss(indices):
                if self.ctx.generative:
                    return lm_loss(self.ctx.engine, self.model, self.ctx.lm_head, indices)
                feats = self.ctx.features(self.model, indices)
                return F.cross_entropy(head(feats), self._local_targets(t, indices))

            self.last_fit = self.train(Fit(t, f"{task.name} expert", self.ctx.epoch_batches(task.train), expert_loss,
                                           name, list(head.parameters()), dev_score=score))
        else:
            self.last_fit = self.train(Fit(t, f"{task.name} expert (k={k})", replay,
                                           lambda idx: self._calibrated_loss(idx, t, k), name,
                                           list(head.parameters()), dev_score=score))
        self.expert_fit = self.last_fit
        if selector_fit is not None:  # the task's training is both fits
            self.last_fit = selector_fit + self.last_fit
        if self.opts["replay_source"] == "memory":
            self.ctx.pet.activate(self.model, name)
            update_memory(self.ctx, self.memory, t, lambda rows: module_features(self.ctx, self.model, rows))

    def _task_targets(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`conpet.heads.task_targets` of task t, built once per task (read every step)."""
        if t not in self.task_target_cache:
            self.task_target_cache[t] = task_targets(self.ctx.stream, t, self.ctx.device)
        return self.task_target_cache[t]

    def _columns(self, t: int) -> torch.Tensor:
        """Task t's columns in the global label order (its expert head's outputs go there)."""
        return self._task_targets(t)[0]

    def _local_targets(self, t: int, indices: list[int]) -> torch.Tensor:
        """Rows' targets as positions among task t's columns (what its expert head predicts)."""
        return self._task_targets(t)[1][self.ctx.targets(indices)]

    @torch.no_grad()
    def select(self, indices: list[int], k: int, gold: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k task ids [B, k] and selector probabilities [B, tasks]; with ``gold`` (teacher
        forcing) the gold task replaces the last pick when missing."""
        if self.n_tasks == 1 or SELECTOR not in (self.ctx.pet.modules(self.model) if self.model else []):
            probs = torch.ones(len(indices), 1, device=self.ctx.device)
        else:
            probs = self.selector.probabilities(self.model, indices)
        k = min(k, probs.shape[1])
        top = probs.topk(k, dim=-1).indices
        if gold is not None:
            missing = ~(top == gold[:, None]).any(dim=1)
            top[missing, -1] = gold[missing]
        return top, probs

    def _old_expert_logits(self, pairs: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Frozen old experts' logits for (task, row) pairs, cached by (task, row, module version);
        every missing pair of a step is computed in one forward pass, each row routed through its
        own expert, so the cost of a step does not grow with the number of old tasks."""
        missing = [(j, i) for j, i in dict.fromkeys(pairs) if (j, i, self.versions[expert_name(j)]) not in self.logit_cache]
        if missing:
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad():
                feats = self._features([i for _, i in missing], [expert_name(j) for j, _ in missing])
                self.ctx.pet.activate(self.model, expert_name(self.n_tasks - 1))
                for r, (j, i) in enumerate(missing):
                    self.logit_cache[(j, i, self.versions[expert_name(j)])] = self.expert_heads[j](feats[r:r + 1]).float()[0]
            self.model.train(was_training)
        return [self.logit_cache[(j, i, self.versions[expert_name(j)])] for j, i in pairs]

    def _calibrated_loss(self, indices: list[int], t: int, k: int) -> torch.Tensor:
        """k >= 2: cross-entropy over all seen classes with the new expert's columns trainable and
        the selected old experts' columns filled from the frozen (cached) experts. The work per
        step depends on the batch's selected tasks only, never on the number of old tasks."""
        stream = self.ctx.stream
        top, _ = self.select(indices, k, self.selector.task_ids(indices))
        n_seen = stream.class_range(t)[1]
        device = self.ctx.device
        logits = torch.full((len(indices), n_seen), float("-inf"), device=device)
        slots = [(r, j) for r, picks in enumerate(top.tolist()) for j in dict.fromkeys(picks) if j != t]
        for (r, j), values in zip(slots, self._old_expert_logits([(j, indices[r]) for r, j in slots])):
            logits[r, self._columns(j)] = values
        rows = (top == t).any(dim=1).nonzero().flatten().tolist()
        self.ctx.pet.activate(self.model, expert_name(t))
        if rows:
            new_logits = self.expert_heads[t](self.ctx.features(self.model, [indices[r] for r in rows])).float()
            logits = logits.index_put((torch.tensor(rows, device=device)[:, None], self._columns(t)[None, :]),
                                      new_logits)
        return F.cross_entropy(logits, self.ctx.targets(indices))

    # -- prediction --------------------------------------------------------------------------------
    @torch.no_grad()
    def logits_and_route(self, indices: list[int]) -> tuple[torch.Tensor, Route]:
        """Logits over the seen classes, each row's filled only at its top-k experts' columns."""
        stream = self.ctx.stream
        k = min(self.opts["top_k"], self.n_tasks)
        top, probs = self.select(indices, k)
        self.routed.update(zip(indices, top[:, 0].tolist()))
        if self.ctx.generative:  # the route alone: a generative expert answers through the LM head
            return torch.empty(len(indices), 0, device=self.ctx.device), Route(top, probs)
        out = torch.full((len(indices), stream.class_range(self.n_tasks - 1)[1]), float("-inf"), device=self.ctx.device)
        for j in range(top.shape[1]):
            modules = [expert_name(int(task)) for task in top[:, j]]
            feats = self._features(indices, modules).float()
            for task in top[:, j].unique().tolist():
                rows = (top[:, j] == task).nonzero().flatten()
                out[rows[:, None], self._columns(task)[None, :]] = self.expert_heads[task](feats[rows]).float()
        return out, Route(top, probs)

    def task_head_logits(self, features: torch.Tensor, t: int) -> torch.Tensor:
        """Task ``t``'s expert head at its columns of the seen classes (-inf elsewhere)."""
        out = torch.full((len(features), self.ctx.stream.class_range(self.n_tasks - 1)[1]), float("-inf"),
                         device=features.device)
        out[:, self._columns(t)] = self.expert_heads[t](features).float()
        return out

    @torch.no_grad()
    def reference_perplexity(self, chunks: list[list[int]]) -> float:
        """Each reference chunk through the expert the selector picks for it (read at the chunk's
        last token, as a prompt's), the perplexity pooled over all tokens."""
        ctx, pet, model = self.ctx, self.ctx.pet, self.model
        model.eval()
        picks = [0] * len(chunks)
        if self.n_tasks > 1:
            pet.activate(model, SELECTOR)
            size = ctx.cfg.train.eval_batch_size
            for start in range(0, len(chunks), size):
                batch = chunks[start:start + size]
                ids, mask = right_padded(batch, ctx.backbone.pad_id, ctx.device)
                with ctx.compute.autocast():
                    hidden = last_hidden(model(input_ids=ids, attention_mask=mask))
                    last = hidden[torch.arange(len(batch), device=ctx.device), mask.sum(1) - 1]
                    picks[start:start + len(batch)] = self.selector.head(last).float().argmax(-1).tolist()
        log_ppl, tokens = 0.0, 0
        for j in sorted(set(picks)):
            group = [c for c, p in zip(chunks, picks) if p == j]
            pet.activate(model, expert_name(j))
            n = sum(max(0, len(c) - 1) for c in group)
            log_ppl += n * math.log(perplexity(model, ctx.lm_head, group, ctx.compute, ctx.cfg.train.eval_batch_size))
            tokens += n
        return math.exp(log_ppl / max(1, tokens))

    # -- saving --------------------------------------------------------------------------------------
    def save(self, t: int, folder: Path) -> None:
        pet = self.ctx.pet
        pet.save(self.model, expert_name(t), folder)
        self.expert_heads[t].save(folder)
        if t > 0:
            (folder / SELECTOR).mkdir()
            pet.save(self.model, SELECTOR, folder / SELECTOR)
            self.selector_head.save(folder / SELECTOR)
        write_module_meta(self.ctx, t, folder, self.name, expert_name(t), self.expert_heads[t].labels,
                          top_k=self.opts["top_k"])

    def restore(self, run_dir: Path, seed: int) -> None:
        """Load every expert and the last selector of seed ``seed`` of run ``run_dir``."""
        pet, tasks = self.ctx.pet, self.ctx.stream.tasks
        self.model = load_task_modules(self.ctx, self.model, run_dir, seed, expert_name)
        for t, task in enumerate(tasks):
            self.expert_heads.append(GrowingHead.load(adapter_dir(run_dir, seed, task.name), self.ctx.device))
            self.versions[expert_name(t)] = 0
        last = adapter_dir(run_dir, seed, tasks[-1].name) / SELECTOR
        if last.is_dir():
            pet.load(self.model, last, SELECTOR)
            self.selector.head = GrowingHead.load(last, self.ctx.device)
        self.n_tasks = len(tasks)
        self.model.eval()

    def tunable_params(self) -> dict[str, int]:
        pet = self.ctx.pet
        per_expert = pet.count(self.model, expert_name(0))
        selector = pet.count(self.model, SELECTOR) if SELECTOR in pet.modules(self.model) else 0
        heads = sum(p.numel() for h in self.expert_heads for p in h.parameters())
        heads += sum(p.numel() for p in self.selector_head.parameters())
        total = per_expert * len(self.expert_heads) + selector + heads
        return {"pet_params": per_expert * len(self.expert_heads) + selector, "head_params": heads,
                "tunable_params": total, "pet_params_per_task": per_expert}


expert_name = DynamicConPET.module_of
"""Task ``t``'s expert module name."""
