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
  by keeping the old rows (copied) and adding one new row for the new task.
- **Prediction.** One selector pass -> top-k tasks -> only those experts run (rows routed with
  peft's per-row ``adapter_names`` in one batch) -> their logits fill their class columns, all
  others -inf -> argmax over seen classes. Cost per input: 1 + k backbone passes, whatever the
  number of tasks (and with ``train.top_layers`` the frozen lower layers are shared by all of them).
- **Expert training** uses teacher forcing (the gold task is always among the k). With k = 1 the
  new expert trains on its own rows only (old rows could not give it a gradient). With k >= 2 it
  trains on the replay batches against the frozen old experts' logits, which are cached by
  (task, row, module version) so that a stale entry can never be read.

Options (``learner_options``): ``top_k`` (1), ``steps_per_task`` (default ``epochs *
ceil(|new rows| / n_new)``), ``new_ratio`` (1.0), ``replay_source`` (``history`` | ``memory``),
``memory_per_class`` (16), ``expert_init`` (``fresh`` | ``previous``: copy the last expert),
``selector_balance`` (false; true: the selector's loss is the mean over the tasks in the batch of
each task's mean cross-entropy, so the newest task, half of every replay batch, no longer
outweighs each old one; a conpet option, not in the paper).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from conpet.errors import ConfigError
from conpet.heads import GrowingHead
from conpet.learners.base import (Context, Learner, head_tensors, load_expert_heads, load_head,
                                  load_module_tensors, module_tensors, register_learner)
from conpet.learners.loop import fit, pet_training
from conpet.learners.static import replay_schedule
from conpet.replay import ExemplarMemory, split_batch

SELECTOR = "selector"
OPTIONS = {"top_k": 1, "steps_per_task": None, "new_ratio": 1.0, "replay_source": "history",
           "memory_per_class": 16, "expert_init": "fresh", "selector_balance": False}


def task_balanced_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the targets present in the batch of each target's mean cross-entropy (every task
    weighs the same, however many of its rows the batch holds)."""
    losses = F.cross_entropy(logits, targets, reduction="none")
    counts = torch.bincount(targets, minlength=logits.shape[-1])[targets].to(losses.dtype)
    return (losses / counts).sum() / (counts.reciprocal().sum())


def expert_name(t: int) -> str:
    return f"expert-{t:03d}"


@register_learner("dynamic")
class DynamicConPET(Learner):
    """One PET module per task + a learned PET module selector (Dynamic ConPET, Song et al. 2023)."""

    @classmethod
    def check_options(cls, cfg) -> dict:
        unknown = sorted(set(cfg.learner_options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"learner_options: unknown option '{unknown[0]}' for learner 'dynamic' "
                              f"(known: {', '.join(sorted(OPTIONS))})")
        opts = {**OPTIONS, **cfg.learner_options}
        if int(opts["top_k"]) < 1:
            raise ConfigError("learner_options.top_k: must be >= 1")
        if not isinstance(opts["selector_balance"], bool):
            raise ConfigError(f"learner_options.selector_balance: true or false, got {opts['selector_balance']!r}")
        if opts["expert_init"] not in ("fresh", "previous"):
            raise ConfigError("learner_options.expert_init: must be 'fresh' or 'previous'")
        split_batch(cfg.train.batch_size, float(opts["new_ratio"]))
        return opts

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.opts = self.check_options(ctx.cfg)
        self.model = None
        self.expert_heads: list[GrowingHead] = []
        self.selector_head = GrowingHead(ctx.backbone.hidden_size)
        self.memory = ExemplarMemory(int(self.opts["memory_per_class"]))
        self.versions: dict[str, int] = {}
        self.logit_cache: dict[tuple[int, int, int], torch.Tensor] = {}
        self.n_tasks = 0
        self.last_selection: tuple[torch.Tensor, torch.Tensor] | None = None
        self.routed: dict[int, int] = {}
        """Top-1 task chosen for each row by the current selector (reused by eval_extra)."""

    # -- modules ---------------------------------------------------------------------------------
    def _new_module(self, name: str, copy_from: str | None = None) -> None:
        torch.manual_seed(int(self.ctx.rng.integers(2**31)))
        pet = self.ctx.pet
        if self.model is None:
            self.model = pet.attach(self.ctx.backbone.model, name)
        elif copy_from is not None:
            pet.copy(self.model, copy_from, name)
        elif name not in pet.modules(self.model):
            pet.add(self.model, name)
        self.versions[name] = self.versions.get(name, -1) + 1

    def _train(self, module: str, head: GrowingHead, loss_fn, batches, desc: str):
        self.ctx.pet.activate(self.model, module)
        self.model.train()
        train = self.ctx.cfg.train
        groups, loss_fn, hooks = pet_training(self.ctx.pet, self.model, module, train.lr, loss_fn, len(batches))
        groups.append({"params": list(head.parameters()), "lr": train.head_lr})
        stats = fit(loss_fn, groups, batches, train, self.ctx.precision, desc=desc, progress=self.ctx.progress,
                    after_step=hooks, checkpointer=self.ctx.checkpointer)
        self.model.eval()
        return stats

    def _features(self, indices: list[int], modules: list[str]) -> torch.Tensor:
        """Features of each row through its own module (one batch, peft's per-row routing)."""
        if self.model.training or len(set(modules)) == 1:
            self.ctx.pet.activate(self.model, modules[0])
            return self.ctx.features(self.model, indices)
        if self.ctx.pet.routes_per_row:
            return self.ctx.features(self.model, indices, adapter_names=modules)
        out = None  # one pass per module over its rows (same total cost per row)
        for name in dict.fromkeys(modules):
            rows = [r for r, m in enumerate(modules) if m == name]
            self.ctx.pet.activate(self.model, name)
            feats = self.ctx.features(self.model, [indices[r] for r in rows])
            if out is None:
                out = feats.new_zeros(len(indices), feats.shape[-1])
            out[rows] = feats
        return out

    # -- schedules ---------------------------------------------------------------------------------
    def replay_batches(self, t: int) -> list[list[int]]:
        return replay_schedule(self.ctx, t, self.opts, self.memory)

    def task_ids(self, indices: list[int]) -> torch.Tensor:
        stream = self.ctx.stream
        return torch.tensor([stream.task_of_label[stream.rows[i].label] for i in indices])

    # -- learning ----------------------------------------------------------------------------------
    def learn(self, t: int) -> None:
        stream = self.ctx.stream
        task = stream.tasks[t]
        self.n_tasks = t + 1
        self.routed = {}
        self.selector_head.grow([task.name], self.ctx.torch_gen)
        replay = self.replay_batches(t) if t > 0 else None
        if t > 0:
            self._new_module(SELECTOR)

            balance = bool(self.opts["selector_balance"])

            def selector_loss(indices):
                feats = self.ctx.features(self.model, indices)
                logits, targets = self.selector_head(feats), self.task_ids(indices)
                return task_balanced_cross_entropy(logits, targets) if balance else F.cross_entropy(logits, targets)

            self._train(SELECTOR, self.selector_head, selector_loss, replay, f"{task.name} selector")
            self.versions[SELECTOR] += 1

        name = expert_name(t)
        copy = expert_name(t - 1) if t > 0 and self.opts["expert_init"] == "previous" else None
        self._new_module(name, copy_from=copy)
        head = GrowingHead(self.ctx.backbone.hidden_size)
        head.grow(list(task.labels), self.ctx.torch_gen)
        self.expert_heads.append(head)
        k = min(int(self.opts["top_k"]), t + 1)
        if k == 1 or t == 0:
            start = stream.class_range(t)[0]

            def expert_loss(indices):
                feats = self.ctx.features(self.model, indices)
                return F.cross_entropy(head(feats), self.ctx.targets(indices) - start)

            self.last_fit = self._train(name, head, expert_loss, self.ctx.epoch_batches(task.train),
                                        f"{task.name} expert")
        else:
            self.last_fit = self._train(name, head, lambda idx: self._calibrated_loss(idx, t, k), replay,
                                        f"{task.name} expert (k={k})")
        if self.opts["replay_source"] == "memory":
            self._update_memory(t)

    def _update_memory(self, t: int) -> None:
        stream = self.ctx.stream
        self.ctx.pet.activate(self.model, expert_name(t))
        for label in stream.tasks[t].labels:
            rows = [i for i in stream.tasks[t].train if stream.rows[i].label == label]
            with torch.no_grad():
                feats = self.ctx.features(self.model, rows).float().numpy()
            self.memory.add_class(label, rows, feats, seed=self.ctx.seed)

    @torch.no_grad()
    def select(self, indices: list[int], k: int, gold: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k task ids [B, k] and selector probabilities [B, tasks]; with ``gold`` (teacher
        forcing) the gold task replaces the last pick when missing."""
        if self.n_tasks == 1 or SELECTOR not in (self.ctx.pet.modules(self.model) if self.model else []):
            probs = torch.ones(len(indices), 1)
        else:
            was_training = self.model.training
            self.model.eval()
            feats = self._features(indices, [SELECTOR] * len(indices))
            self.model.train(was_training)
            probs = F.softmax(self.selector_head(feats).float(), dim=-1)
        k = min(k, probs.shape[1])
        top = probs.topk(k, dim=-1).indices
        if gold is not None:
            missing = ~(top == gold[:, None]).any(dim=1)
            top[missing, -1] = gold[missing]
        return top, probs

    def _old_expert_logits(self, task: int, indices: list[int]) -> torch.Tensor:
        """Frozen old expert's logits for rows, cached by (task, row, module version)."""
        name = expert_name(task)
        version = self.versions[name]
        missing = [i for i in indices if (task, i, version) not in self.logit_cache]
        if missing:
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad():
                feats = self._features(missing, [name] * len(missing))
                self.ctx.pet.activate(self.model, expert_name(self.n_tasks - 1))
                logits = self.expert_heads[task](feats).float()
            self.model.train(was_training)
            for r, i in enumerate(missing):
                self.logit_cache[(task, i, version)] = logits[r]
        return torch.stack([self.logit_cache[(task, i, version)] for i in indices])

    def _calibrated_loss(self, indices: list[int], t: int, k: int) -> torch.Tensor:
        """k >= 2: cross-entropy over all seen classes with the new expert's columns trainable and
        the selected old experts' columns filled from the frozen (cached) experts."""
        stream = self.ctx.stream
        gold = self.task_ids(indices)
        top, _ = self.select(indices, k, gold)
        n_seen = stream.class_range(t)[1]
        logits = torch.full((len(indices), n_seen), float("-inf"))
        for j in range(t):
            rows = (top == j).any(dim=1).nonzero().flatten().tolist()
            if rows:
                lo, hi = stream.class_range(j)
                logits[rows, lo:hi] = self._old_expert_logits(j, [indices[r] for r in rows])
        rows = (top == t).any(dim=1).nonzero().flatten().tolist()
        self.ctx.pet.activate(self.model, expert_name(t))
        lo, hi = stream.class_range(t)
        if rows:
            new_logits = self.expert_heads[t](self.ctx.features(self.model, [indices[r] for r in rows])).float()
            logits = logits.index_put((torch.tensor(rows)[:, None], torch.arange(lo, hi)[None, :]), new_logits)
        return F.cross_entropy(logits, self.ctx.targets(indices))

    # -- prediction --------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, indices: list[int]) -> torch.Tensor:
        stream = self.ctx.stream
        k = min(int(self.opts["top_k"]), self.n_tasks)
        top, probs = self.select(indices, k)
        self.last_selection = (top, probs)
        self.routed.update(zip(indices, top[:, 0].tolist()))
        out = torch.full((len(indices), stream.class_range(self.n_tasks - 1)[1]), float("-inf"))
        for j in range(top.shape[1]):
            modules = [expert_name(int(task)) for task in top[:, j]]
            feats = self._features(indices, modules).float()
            for task in top[:, j].unique().tolist():
                rows = (top[:, j] == task).nonzero().flatten()
                lo, hi = stream.class_range(task)
                out[rows, lo:hi] = self.expert_heads[task](feats[rows]).float()
        return out

    def eval_extra(self, t: int) -> dict[str, list[float]]:
        """Selector accuracy (top-1 task id) on each seen task's test rows."""
        accs = []
        for j in range(t + 1):
            rows = self.ctx.stream.tasks[j].test
            missing = [i for i in rows if i not in self.routed]
            for start in range(0, len(missing), self.ctx.cfg.train.eval_batch_size):
                batch = missing[start:start + self.ctx.cfg.train.eval_batch_size]
                self.routed.update(zip(batch, self.select(batch, 1)[0][:, 0].tolist()))
            accs.append(sum(self.routed[i] == j for i in rows) / len(rows))
        return {"selector_accuracy": accs}

    # -- saving --------------------------------------------------------------------------------------
    def save(self, t: int, folder: Path) -> None:
        import json

        pet = self.ctx.pet
        pet.save(self.model, expert_name(t), folder)
        self.expert_heads[t].save(folder)
        if t > 0:
            (folder / SELECTOR).mkdir()
            pet.save(self.model, SELECTOR, folder / SELECTOR)
            self.selector_head.save(folder / SELECTOR)
        meta = {"learner": self.name, "task": self.ctx.stream.tasks[t].name, "task_index": t,
                "pet": pet.name, "pet_options": pet.options, "module": expert_name(t),
                "model": self.ctx.cfg.model, "backbone_path": str(self.ctx.backbone.path),
                "backbone_fingerprint": self.ctx.backbone.fingerprint, "template": self.ctx.stream.kind,
                "labels": self.expert_heads[t].labels, "top_k": int(self.opts["top_k"])}
        (folder / "conpet.json").write_text(json.dumps(meta, indent=2))

    def restore(self, seed_folder: Path) -> None:
        """Load every expert and the last selector from a run's ``seed-<s>`` folder."""
        pet, tasks = self.ctx.pet, self.ctx.stream.tasks
        for t, task in enumerate(tasks):
            folder = seed_folder / "adapters" / task.name
            if self.model is None:
                self.model = pet.attach_from(self.ctx.backbone.model, folder, expert_name(t))
            else:
                pet.load(self.model, folder, expert_name(t))
            self.expert_heads.append(GrowingHead.load(folder))
            self.versions[expert_name(t)] = 0
        last = seed_folder / "adapters" / tasks[-1].name / SELECTOR
        if last.is_dir():
            pet.load(self.model, last, SELECTOR)
            self.selector_head = GrowingHead.load(last)
        self.n_tasks = len(tasks)
        self.model.eval()

    # -- resume ----------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors: dict[str, torch.Tensor] = {}
        modules = self.ctx.pet.modules(self.model) if self.model is not None else []
        if modules:
            tensors.update(module_tensors(self.model, modules))
        for t, head in enumerate(self.expert_heads):
            tensors.update({f"expert_head/{t}/{k}": v for k, v in head_tensors(head).items()})
        tensors.update({f"selector_head/{k}": v for k, v in head_tensors(self.selector_head).items()})
        keys = sorted(self.logit_cache)
        by_task: dict[int, list] = {}
        for key in keys:
            by_task.setdefault(key[0], []).append(key)
        for task, task_keys in by_task.items():
            tensors[f"cache/{task}/keys"] = torch.tensor(task_keys, dtype=torch.long)
            tensors[f"cache/{task}/logits"] = torch.stack([self.logit_cache[k] for k in task_keys])
        meta = {"modules": modules, "expert_labels": [h.labels for h in self.expert_heads],
                "selector_labels": self.selector_head.labels, "versions": self.versions,
                "n_tasks": self.n_tasks, "memory": self.memory.rows_by_class, "cache_tasks": sorted(by_task)}
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        pet = self.ctx.pet
        if meta["modules"]:
            if self.model is None:
                self.model = pet.attach(self.ctx.backbone.model, meta["modules"][0])
            load_module_tensors(pet, self.model, meta["modules"], tensors)
        self.expert_heads = load_expert_heads(self.expert_heads, tensors, meta["expert_labels"],
                                              self.ctx.backbone.hidden_size)
        self.selector_head = load_head(self.selector_head, {k[14:]: v for k, v in tensors.items()
                                                            if k.startswith("selector_head/")}, meta["selector_labels"])
        self.versions = dict(meta["versions"])
        self.n_tasks = meta["n_tasks"]
        self.memory.rows_by_class = {k: list(v) for k, v in meta["memory"].items()}
        self.logit_cache = {}
        for task in meta["cache_tasks"]:
            keys, logits = tensors[f"cache/{task}/keys"].tolist(), tensors[f"cache/{task}/logits"]
            self.logit_cache.update({tuple(k): logits[r].clone() for r, k in enumerate(keys)})

    def tunable_params(self) -> dict[str, int]:
        pet = self.ctx.pet
        per_expert = pet.count(self.model, expert_name(0))
        selector = pet.count(self.model, SELECTOR) if SELECTOR in pet.modules(self.model) else 0
        heads = sum(p.numel() for h in self.expert_heads for p in h.parameters())
        heads += sum(p.numel() for p in self.selector_head.parameters())
        total = per_expert * len(self.expert_heads) + selector + heads
        return {"pet_params": per_expert * len(self.expert_heads) + selector, "head_params": heads,
                "tunable_params": total, "pet_params_per_task": per_expert}

    def close(self) -> None:
        if self.model is not None:
            self.ctx.backbone.model = self.ctx.pet.detach(self.model)
            self.model = None
