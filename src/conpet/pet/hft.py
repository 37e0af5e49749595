"""HFT (Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language Models").

At every stage (here: every task a module trains on) half of the parameters are updated and the
other half stay frozen at the values they had, which keeps part of the old knowledge intact.
The half is chosen *by category inside every transformer block*, the paper's recipe:

- attention: half of the block's attention matrices (2 of q, k, v, o);
- feed-forward: half of its matrices; with an odd number (Llama's gate, up, down) a random half
  of the blocks update ``ceil`` (2 of 3) and the others ``floor`` (1 of 3), so that over the
  blocks exactly half of the feed-forward matrices train.

For a module shared across tasks the half is **re-drawn at every task** (:meth:`HFT.begin_fit`),
from a hash of ``(seed, module name, task)``; the frozen half keeps its current values (not the
pretrained ones), and only the trainable half is handed to the optimizer, so frozen matrices keep
no stale optimizer moments.

Named deviations: HFT is a full fine-tuning method; conpet applies it to dense updates of the
targeted linear layers of the (scoped) transformer blocks. The paper also trains half of the
LayerNorms and the embeddings / LM head; conpet keeps norms and embeddings frozen and runs no LM
head. Updates are stored sparsely (the untouched half costs nothing). Trainable: about half of
the targeted matrices' entries (exactly half of the matrices per category).
"""

from __future__ import annotations

import re

import torch

from conpet.families import LINEAR_TARGETS
from conpet.pet.base import register_pet, seeded_generator
from conpet.pet.delta import DeltaPart, DeltaPET

ATTENTION = re.compile(r"(attn|attention)")


def category(path: str) -> str:
    """``attention`` or ``ffn``: the block part a targeted matrix belongs to."""
    return "attention" if ATTENTION.search(re.search(r"\.\d+\.(.+)$", path).group(1)) else "ffn"


def draw_half(paths: list[str], seed: object, name: str, task: int) -> list[str]:
    """The paths that train at stage ``task``: per block and category, a random half (an odd
    category's ``ceil``/``floor`` alternates over a random half of the blocks)."""
    gen = seeded_generator(seed, name, task)
    blocks: dict[str, dict[str, list[str]]] = {}
    for path in paths:
        block = re.search(r"^(.*?\.\d+)\.", path).group(1)
        blocks.setdefault(block, {}).setdefault(category(path), []).append(path)
    order = list(blocks)
    ceil_blocks = {cat: {order[i] for i in gen_perm(gen, len(order))[: len(order) // 2]}
                   for cat in ("attention", "ffn")}
    chosen = []
    for block in order:
        for cat, members in blocks[block].items():
            n = len(members) // 2 + (len(members) % 2 and block in ceil_blocks[cat])
            chosen += [members[i] for i in gen_perm(gen, len(members))[:n]]
    return chosen


def gen_perm(gen: torch.Generator, n: int) -> list[int]:
    return torch.randperm(n, generator=gen).tolist()


@register_pet("hft")
class HFT(DeltaPET):
    """Half fine-tuning: per block, half of the attention and half of the feed-forward matrices
    train, re-drawn at every task."""

    paper = "Hui et al. 2024, HFT: Half Fine-Tuning for Large Language Models"
    defaults = {"target_modules": LINEAR_TARGETS, "seed": 0}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stage: dict[str, int] = {}
        """The task each module's current half was drawn for."""

    def begin_fit(self, model, name, task):
        self.stage[name] = task

    def chosen(self, model, name) -> list[str]:
        """The sites module ``name`` updates at its current stage (task 0 until a fit says otherwise)."""
        return draw_half(list(model.sites), self.options["seed"], name, self.stage.get(name, 0))

    def build(self, base, path, shared):
        return DeltaPart(base)

    def parameters(self, model, name):
        chosen = set(self.chosen(model, name))
        out = []
        for path, site in model.sites.items():
            p = site.parts[name].delta
            p.requires_grad_(path in chosen)
            if path in chosen:
                out.append(p)
        return out

    def count(self, model, name):
        return sum(model.sites[p].parts[name].delta.numel() for p in self.chosen(model, name))

    def expected_count(self, model):
        return self.count(model, next(iter(model.peft_config)))
