"""``cofitune``: CoFiTune (Zhang et al. 2024, "Balancing Speciality and Versatility: a Coarse to
Fine Framework for Supervised Fine-tuning Large Language Model", ACL Findings; official code
rattlesnakey/CoFiTune ``src/softmask_utils.py``, ``src/softmask_llama.py``).

- **Coarse level.** Only the feed-forward ``up`` and ``down`` projections of layers
  (N 25%, N 50%] train, as full matrices (``gate_proj`` and everything else frozen): the
  ``cofitune`` PET method (:mod:`conpet.pet.cofitune`), which this learner requires. The
  paper's tree search over layer ranges and modules is not run; its chosen configuration is
  the default and the other candidate ranges are ``pet.options.window``.
- **Fine level (soft mask).** Virtual gates (ones, with gradient) multiply, in every window
  layer, (i) each attention head's output, (ii) ``up``'s output per intermediate neuron and
  (iii) ``down``'s output per hidden unit. The batch runs twice with dropout and
  ``0.1 KL(log_softmax(o1), softmax(o2))`` (``F.kl_div``, summed and divided by the rows, the
  reference's ``batchmean``) is back-propagated to the gates; their gradients are summed over
  the task's training rows and divided by the rows' token count. Each layer's vector is then
  normalised to ``|tanh((I - mean) / std)|`` and the importance of successive tasks is combined
  by an element-wise **max** (the reference's combination of several importance files). Before
  every optimizer step the gradient of ``up``'s row ``i`` (intermediate neuron ``i``) and of
  ``down``'s row ``h`` (hidden unit ``h``) is multiplied by ``1 - I`` (an explicit row scale:
  the reference tiles the 1-D mask over a flattened ZeRO-3 gradient partition, which does not
  line up with rows). The head importance is computed and stored as in the reference but not
  applied (``APPLY_SOFTMASK=input_projection,output_projection``: attention does not train).

Deviations, named:

- **When.** ``importance_timing: after`` (default): task t's importance is computed after
  training it, so the mask that trains task t protects what tasks < t found important (the first
  task trains unmasked). ``before``: the official pipeline's timing (the model about to be tuned,
  on the data it is about to be tuned on), so already the first task is masked.
- **Dropout.** A Llama-family model has no dropout: two passes would be identical and the KL's
  gradient exactly 0. The reference's soft-mask model adds ``nn.Dropout(0.003)`` to the MLP
  output and the attention probabilities; here dropout ``p = importance_dropout`` (0.003) is
  applied to ``down``'s output and to the heads' outputs (the attention output projection's
  input: forward hooks reach it in every family, the probabilities they do not), in the window
  and every layer above it (layers below come from the frozen cache). The passes run in eval
  mode (the backbone's own dropout off) with masks from a generator seeded by (seed, task), so
  the importance is reproducible (resume).
- **Output distribution o.** Generative streams: the next-token logits at the target positions
  (the reference: every position of the sequence). Classification streams: the head's logits
  over the seen classes (an encoder has no LM head here).
- A layer whose gate gradients are all equal (std 0) gets importance 0 there (the reference
  divides by 0). Under AdamW a fixed per-row gradient scale largely cancels in the update
  (Adam normalises per coordinate); this is the reference's behaviour too (DeepSpeed Adam).

Cost per task: one extra sweep of two forward passes and a backward pass to the gates over the
task's training rows (``importance_rows`` bounds it). Stored: three vectors per window layer
(heads, intermediate, hidden), constant in the number of tasks (the max is kept, not the list).
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.nn.functional as F

from conpet.errors import ConfigError
from conpet.generation import token_logits
from conpet.inputs import sorted_batches
from conpet.learners.base import register_learner
from conpet.learners.one_module import OneModuleLearner
from conpet.learners.options import Option
from conpet.pet.base import seeded_generator
from conpet.pet.cofitune import ffn_names
from conpet.pet.sites import block_paths

KL_WEIGHT = 0.1
"""The reference's ``T`` on the self-KL (a scale the per-layer normalisation removes)."""
PARTS = {"input_projection": "up", "output_projection": "down"}
"""The reference's ``APPLY_SOFTMASK`` names -> the importance vectors (and layers) they mask."""


def normalise(impt: torch.Tensor) -> torch.Tensor:
    """``|tanh((I - mean) / std)|`` per layer (row) of ``impt`` [layers, units] (unbiased std,
    as ``Tensor.std``); a row of equal values gives 0."""
    mean, std = impt.mean(dim=1, keepdim=True), impt.std(dim=1, keepdim=True)
    return torch.tanh((impt - mean) / std.clamp_min(torch.finfo(impt.dtype).tiny)).abs()


@register_learner("cofitune")
class CoFiTune(OneModuleLearner):
    """CoFiTune: FFN up/down of the (25%, 50%] layers, gradients soft-masked by (1 - importance)."""

    paper = ("Zhang et al. 2024, Balancing Speciality and Versatility: a Coarse to Fine Framework for Supervised "
             "Fine-tuning Large Language Model")
    generative = True
    exports_lora = False  # CoFiTune tunes backbone layers, not a LoRA
    requires_pet = "cofitune"  # the coarse level: full FFN up/down matrices of a layer window
    options = {
        "apply_softmask": Option("input_projection,output_projection", str,
                                 choices=("input_projection,output_projection", "input_projection",
                                          "output_projection", "none"),
                                 help="which gradients the soft mask scales (the reference's APPLY_SOFTMASK); "
                                      "none = the coarse level alone"),
        "importance_dropout": Option(0.003, float, minimum=0.0,
                                     help="dropout of the two importance passes (the reference's nn.Dropout(0.003))"),
        "importance_timing": Option("after", str, choices=("after", "before"),
                                    help="compute task t's importance after training it (its mask protects later "
                                         "tasks) or before (the official single-stage timing)"),
        "importance_rows": Option(None, int, minimum=1, nullable=True,
                                  help="training rows of the importance sweep (the first ones); default: all"),
    }

    @classmethod
    def validate(cls, cfg, opts) -> None:
        if not 0.0 < opts["importance_dropout"] < 1.0:
            raise ConfigError(f"learner_options.importance_dropout: must be in (0, 1) (without dropout the two passes "
                              f"are identical and the importance is 0), got {opts['importance_dropout']}")

    state_attrs = ("importance", "importance_tasks")
    saved_attrs = ("importance",)

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.importance: dict[str, torch.Tensor] | None = None
        """Normalised importance, max over the tasks so far: ``heads`` [window, heads], ``up``
        [window, intermediate], ``down`` [window, hidden]."""
        self.importance_tasks: list[int] = []

    # -- learning --------------------------------------------------------------------------------------
    def before_task(self, t: int) -> None:
        if self.opts["apply_softmask"] != "none" and self.opts["importance_timing"] == "before":
            self.accumulate_importance(t)

    @contextlib.contextmanager
    def during_fits(self, t: int):
        """The soft mask on the window's gradients while the task trains."""
        handles = self.mask_gradients() if self.opts["apply_softmask"] != "none" else []
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def after_task(self, t: int) -> None:
        if self.opts["apply_softmask"] != "none" and self.opts["importance_timing"] == "after":
            self.accumulate_importance(t)

    def sites(self) -> dict[str, dict[int, torch.nn.Module]]:
        """The window's ``up``/``down`` sites and every upper layer's ``down`` and attention output
        layer, by layer index (paths of the backbone inside the PET-wrapped model)."""
        base = self.model.base_model
        names = dict(zip(("up", "down", "attn"), ffn_names(base)))
        first = self.ctx.pet.layers[0]
        upper = list(range(first, base.config.num_hidden_layers))
        out = {}
        for kind, name in names.items():
            out[kind] = {int(re.search(r"\.(\d+)\.", path).group(1)): base.get_submodule(path)
                         for path in block_paths(base, f"^{re.escape(name)}$", upper)}
        return out

    def mask_gradients(self) -> list:
        """Gradient hooks scaling row ``r`` of each window ``up``/``down`` update by ``1 - I[r]``
        (the importance read at every step, so a resumed state applies at once)."""
        if self.importance is None:
            return []
        sites, handles = self.sites(), []
        for part in self.opts["apply_softmask"].split(","):
            kind = PARTS[part]
            for k, layer in enumerate(self.ctx.pet.layers):
                delta = sites[kind][layer].parts[self.module_name].delta
                handles.append(delta.register_hook(self._row_scale(kind, k)))
        return handles

    def _row_scale(self, kind: str, k: int):
        def scale(grad: torch.Tensor) -> torch.Tensor:
            return grad * (1.0 - self.importance[kind][k]).to(grad.dtype).unsqueeze(1)

        return scale

    # -- importance ------------------------------------------------------------------------------------
    def accumulate_importance(self, t: int) -> None:
        """Task ``t``'s normalised importance, combined with the earlier tasks' by element-wise max."""
        new = {kind: normalise(raw) for kind, raw in self.importance_sweep(t).items()}
        self.importance = new if self.importance is None else \
            {kind: torch.maximum(self.importance[kind], v) for kind, v in new.items()}
        self.importance_tasks.append(t)

    def importance_sweep(self, t: int) -> dict[str, torch.Tensor]:
        """Raw gate gradients of the self-KL, summed over task ``t``'s training rows and divided
        by their token count: ``heads`` [window, heads], ``up`` [window, intermediate], ``down``
        [window, hidden]."""
        ctx, model = self.ctx, self.model
        ctx.pet.activate(model, self.module_name)
        window = self.ctx.pet.layers
        sites = self.sites()
        n_heads = model.config.num_attention_heads
        sizes = {"heads": n_heads, "up": sites["up"][window[0]].base.out_features,
                 "down": sites["down"][window[0]].base.out_features}
        gates = {kind: torch.ones(len(window), n, device=ctx.device, requires_grad=True) for kind, n in sizes.items()}
        gen = torch.Generator(device=ctx.device).manual_seed(seeded_generator(ctx.seed, "cofitune", t).initial_seed())
        p = self.opts["importance_dropout"]

        def drop(x: torch.Tensor) -> torch.Tensor:
            return x * torch.empty_like(x).bernoulli_(1.0 - p, generator=gen) / (1.0 - p)

        def gated(kind: str, layer: int, x: torch.Tensor) -> torch.Tensor:
            if layer not in window:
                return x
            gate = gates[kind][window.index(layer)].to(x.dtype)
            if kind == "heads":
                return (x.unflatten(-1, (n_heads, -1)) * gate.unsqueeze(1)).flatten(-2)
            return x * gate

        handles = []
        for layer, module in sites["attn"].items():
            handles.append(module.register_forward_pre_hook(
                lambda m, args, layer=layer: (drop(gated("heads", layer, args[0])), *args[1:])))
        for layer, module in sites["up"].items():
            handles.append(module.register_forward_hook(lambda m, args, out, layer=layer: gated("up", layer, out)))
        for layer, module in sites["down"].items():
            handles.append(module.register_forward_hook(
                lambda m, args, out, layer=layer: drop(gated("down", layer, out))))
        sums = {kind: torch.zeros_like(g) for kind, g in gates.items()}
        rows = list(ctx.stream.tasks[t].train)[: self.opts["importance_rows"]]
        tokens = 0
        model.eval()
        try:
            for batch in sorted_batches(rows, ctx.encoded.lengths(rows), ctx.cfg.train.batch_size):
                with ctx.compute.autocast():
                    o1, o2 = self.output_logits(batch).float(), self.output_logits(batch).float()
                loss = KL_WEIGHT * F.kl_div(F.log_softmax(o1, -1), F.softmax(o2, -1), reduction="sum") / len(batch)
                for kind, grad in zip(gates, torch.autograd.grad(loss, list(gates.values()))):
                    sums[kind] += grad
                tokens += int(ctx.encoded.lengths(batch).sum())
        finally:
            for h in handles:
                h.remove()
        return {kind: v / tokens for kind, v in sums.items()}

    def output_logits(self, indices: list[int]) -> torch.Tensor:
        """The output distribution the self-KL compares: next-token logits at the target
        positions (generative) or the head's logits over the seen classes."""
        if self.ctx.generative:
            return token_logits(self.ctx.engine, self.model, self.ctx.lm_head, indices)
        return self.logits(indices)
