"""``i-lora``: I-LoRA, interpolation-based LoRA (Ren et al. 2024, "Analyzing and Reducing
Catastrophic Forgetting in Parameter Efficient Tuning", arXiv 2402.18865; official code
which47/LLMCL ``method/ILORA.py``).

A fast module trains on each batch and, from the second task, on as many rows drawn from a
reservoir of training rows (``buffer_size``), with
``L = 1/2 (CE_fast(batch) + CE_fast(b)) + reg_weight * mean (h_fast(b) - max(h_fast(b), h_slow(b)))^2``
over every hidden state of the replayed rows b; a slow module (a fresh module of the same config,
never trained) follows the fast one after every step,
``theta_s <- alpha theta_s + (1 - alpha) theta_f``, ``alpha = min(1 - 1/(step + 1), ema_alpha)``.
The fast module answers (``eval_module=slow``: the slow one); both are saved. The reservoir and
every step's replay rows are laid out from the run's seeded generator before each fit, so
micro-batches and processes replay their share and ``--resume`` is exact.

Deviations, named: the official code's defects are fixed, not copied (its EMA rewrites the fast
weights with themselves; it calls a missing ``load_ema_model``; it never passes the attention
mask: here padding is masked and left out of the consistency mean); with ``train.top_layers`` the
cached lower layers carry no PET and their zero terms are counted without being computed;
``step`` counts over the whole stream (the official one restarts each task: the same alpha while
``ema_alpha <= 0.5``); buffer rows are row indices; conpet's PET method, confinement and AdamW
(official: LoRA r 8, alpha 32 on q/k/v/o of LLaMA-2-7B, lr 1e-5, 3 epochs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conpet import distributed as dist
from conpet.backbone import token_states
from conpet.engine import find_layers
from conpet.errors import ConfigError
from conpet.generation import target_positions
from conpet.learners.base import register_learner
from conpet.learners.context import Context
from conpet.learners.one_module import OneModuleLearner
from conpet.learners.training import dev_scorer, ema_update
from conpet.learners.options import Option
from conpet.pet.base import module_pairs

SLOW = "i-lora-slow"
"""The slow (interpolated) module."""


def consistency(fast: list[torch.Tensor], slow: list[torch.Tensor], mask: torch.Tensor, n_states: int) -> torch.Tensor:
    """``mean (f - max(f, s))^2`` over ``n_states`` hidden states [rows, tokens, hidden] of which
    ``fast`` / ``slow`` are those that can differ (the others count as zeros), over the tokens
    where ``mask`` [rows, tokens] is true; ``slow`` gets no gradient."""
    keep = mask[..., None].to(torch.float32)
    total = sum(((f.float() - torch.maximum(f.float(), s.detach().float())) ** 2 * keep).sum()
                for f, s in zip(fast, slow))
    return total / (n_states * keep.sum() * fast[-1].shape[-1])


@register_learner("i-lora")
class ILoRA(OneModuleLearner):
    """I-LoRA: a fast LoRA trained with replay and a consistency loss towards its EMA (Ren et al. 2024)."""

    paper = "Ren et al. 2024, Analyzing and Reducing Catastrophic Forgetting in Parameter Efficient Tuning"
    shards_backbone = True
    generative = True
    exports_lora = False  # the answering module is an option (slow or fast); its export is not built yet
    options = {"buffer_size": Option(500, int, minimum=1, help="reservoir buffer size (training rows)"),
               "reg_weight": Option(1.0, float, minimum=0.0, help="weight of the hidden-state consistency loss"),
               "ema_alpha": Option(0.25, float, minimum=0.0, maximum=1.0,
                                   help="cap of the slow module's EMA weight alpha = min(1 - 1/(step+1), ema_alpha)"),
               "eval_module": Option("fast", str, choices=("fast", "slow"), help="the module that answers")}
    saved_modules = (SLOW,)
    state_attrs = ("buffer", "seen", "global_step")

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        try:
            self.layers = list(find_layers(ctx.backbone.model)[2])
        except ConfigError as e:
            raise ConfigError(f"learner 'i-lora' reads every layer's hidden states: {e}") from e
        self.buffer: list[int] = []
        """The reservoir: training row indices (a row may be kept twice, from two epochs)."""
        self.seen = 0
        """Rows offered to the reservoir so far."""
        self.global_step = 0
        """Optimizer steps done over the whole stream (the EMA's ``step``)."""
        self.fit_start = 0
        self.batches: list[list[int]] = []
        self.replay: list[list[int]] = []
        """The current fit's batches and each one's buffer rows."""
        self.ema_pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []

    @property
    def answer_module(self) -> str:
        return SLOW if self.opts["eval_module"] == "slow" else self.module_name

    # -- learning --------------------------------------------------------------------------------------
    def learn(self, t: int) -> None:
        ctx = self.ctx
        task = self.begin_task(t)
        if SLOW not in ctx.pet.modules(self.model):  # a fresh module of the same config
            torch.manual_seed(int(ctx.rng.integers(2**31)))
            ctx.pet.add(self.model, SLOW, ctx.calibration(t))
            ctx.pet.activate(self.model, self.module_name)
        self.ema_pairs = module_pairs(self.model, self.module_name, SLOW)
        self.batches = ctx.epoch_batches(task.train)
        self.replay = self.plan(self.batches, replay=t > 0)
        self.fit_start = self.global_step
        score = dev_scorer(ctx, self.model, list(range(t + 1)), lambda rows: self.logits_of(self.module_name, rows),
                           ctx.targets)
        self.last_fit = self.train(self.fit_on(t, self.batches, dev_score=score))

    def plan(self, batches: list[list[int]], replay: bool) -> list[list[int]]:
        """Feed each batch's rows to the reservoir (official ``reservoir``: row number n >= size
        replaces slot j ~ U{0..n} when j < size), then draw that step's buffer rows (none
        without ``replay``); returns the buffer rows of every batch."""
        rng, size = self.ctx.rng, self.opts["buffer_size"]
        out = []
        for batch in batches:
            for row in batch:
                if self.seen < size:
                    self.buffer.append(row)
                else:
                    j = int(rng.integers(0, self.seen + 1))
                    if j < size:
                        self.buffer[j] = row
                self.seen += 1
            picks = rng.choice(len(self.buffer), size=min(len(batch), len(self.buffer)), replace=False) \
                if replay else []
            out.append([self.buffer[int(k)] for k in picks])
        return out

    def replay_part(self, micro: list[int]) -> list[int]:
        """This micro-batch's share of its step's buffer rows (the same cut as the loop's)."""
        step = self.global_step - self.fit_start
        batch, buffer = self.batches[step], self.replay[step]
        accum, rank, world = self.ctx.cfg.train.grad_accum, dist.rank(), dist.world_size()
        share, own = dist.shard(batch, world, rank), dist.shard(buffer, world, rank)
        for k in range(accum):
            if dist.shard(share, accum, k) == micro:
                return dist.shard(own, accum, k)
        return []  # the zero-weight pass of a process without rows this step

    def loss(self, indices: list[int]) -> torch.Tensor:
        ctx, pet = self.ctx, self.ctx.pet
        current = self.ce(indices, ctx.engine.states(self.model, indices))
        rows = self.replay_part(indices)
        if not rows:
            return current
        fast = self.hidden_states(rows)
        pet.activate(self.model, SLOW)
        with torch.no_grad():
            slow = self.hidden_states(rows)
        pet.activate(self.model, self.module_name)
        width = fast[-1].shape[1]
        lengths = torch.tensor([len(ctx.encoded.ids[i]) for i in rows], device=ctx.device)
        mask = torch.arange(width, device=ctx.device)[None] < lengths[:, None]
        cons = consistency(fast, slow, mask, len(self.layers) + 1)
        return 0.5 * (current + self.ce(rows, fast[-1])) + self.opts["reg_weight"] * cons

    def ce(self, rows: list[int], states: torch.Tensor) -> torch.Tensor:
        """The task loss of ``rows`` from their last hidden states [rows, tokens, hidden]."""
        ctx = self.ctx
        if ctx.generative:
            r, p, nxt = target_positions(ctx.engine, rows)
            return F.cross_entropy(ctx.lm_head(states[r, p]).float(), nxt)
        return F.cross_entropy(self.head(ctx.engine.pool(states, rows)), ctx.targets(rows))

    def hidden_states(self, rows: list[int]) -> list[torch.Tensor]:
        """HF's ``hidden_states`` of ``rows`` through the active module that can differ between
        modules: the output of every layer the engine runs (the upper ones with
        ``train.top_layers``), the last one as the engine returns it (after the final norm)."""
        captured: list[torch.Tensor] = []

        def keep(module, args, output) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)

        handles = [layer.register_forward_hook(keep) for layer in self.layers]
        try:
            final = self.ctx.engine.states(self.model, rows)
        finally:
            for handle in handles:
                handle.remove()
        ran = len(self.layers) - (self.ctx.engine.split or 0)
        if len(captured) != ran:
            raise RuntimeError(f"i-lora: {len(captured)} layer outputs seen, {ran} layers expected (a PET method "
                               "that replaces whole layers hides their hidden states)")
        return [token_states(h, final.shape[1]) for h in captured[:-1]] + [final]

    def after_step(self, fit, step: int) -> None:
        """``theta_s <- alpha theta_s + (1 - alpha) theta_f``, ``alpha = min(1 - 1/(n + 1),
        ema_alpha)`` after optimizer step n (1-based, over the stream), pair by pair."""
        self.global_step += 1
        ema_update(self.ema_pairs, min(1.0 - 1.0 / (self.global_step + 1), self.opts["ema_alpha"]))

    # -- prediction ------------------------------------------------------------------------------------
    def logits_of(self, module: str, indices: list[int]) -> torch.Tensor:
        """Head logits through ``module``; the fast module is left active."""
        pet = self.ctx.pet
        if module != self.module_name:
            pet.activate(self.model, module)
        out = self.head(self.ctx.features(self.model, indices))
        if module != self.module_name:
            pet.activate(self.model, self.module_name)
        return out

    def logits(self, indices: list[int]) -> torch.Tensor:
        return self.logits_of(self.answer_module, indices)

    def generate(self, indices: list[int]) -> list[str]:
        self.ctx.pet.activate(self.model, self.answer_module)
        answers = self.ctx.generate(self.model, indices)
        self.ctx.pet.activate(self.model, self.module_name)
        return answers

    def reference_model(self) -> torch.nn.Module:
        self.ctx.pet.activate(self.model, self.answer_module)
        self.model.eval()
        return self.model
