"""The shared run context a learner is built with (:class:`Context`): the config, the stream, the
feature engine (backbone, tokenized rows, lower-layer cache), the PET method and the seed's random
state, with the few operations every learner needs on them (features, batches, greedy answers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from conpet.backbone import Backbone
from conpet.config import RunConfig
from conpet.data.stream import Stream
from conpet.device import Compute
from conpet.engine import FeatureEngine
from conpet.generation import greedy_generate
from conpet.heads import GrowingHead
from conpet.inputs import Encoded, end_token_id, length_bucketed_batches
from conpet.pet.base import Calibration, PETMethod


@dataclass
class Context:
    """Everything a learner needs, built once per seed by :func:`conpet.build.build_learner`."""

    cfg: RunConfig
    stream: Stream
    engine: FeatureEngine
    """Computes cloze features (and caches frozen lower layers); owns backbone, rows and precision."""
    pet: PETMethod
    seed: int
    options: dict[str, Any] = field(default_factory=dict)
    """The learner's options, checked and converted once (:func:`conpet.learners.options.check_options`)."""
    progress: bool = True
    checkpointer: Any = None
    """A :class:`conpet.checkpoint.Checkpointer` (in-task checkpoints and resume), or None."""

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.torch_gen = torch.Generator().manual_seed(self.seed)
        self.targets_all = torch.tensor(self.stream.targets, dtype=torch.long, device=self.engine.device)
        self.answer_tokens: dict[int, list[int]] = {}
        """The generated tokens of the answers :meth:`generate` gave, by row index (what a server
        counts and cuts; decoding and encoding again does not always give them back)."""

    @property
    def backbone(self) -> Backbone:
        return self.engine.backbone

    @property
    def encoded(self) -> Encoded:
        return self.engine.encoded

    @property
    def precision(self) -> str:
        return self.engine.precision

    @property
    def compute(self) -> Compute:
        """The run's device and precision (autocast, gradient scaler)."""
        return self.engine.compute

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def generative(self) -> bool:
        """Whether the stream's tasks are prompt -> target (trained and evaluated through the LM head)."""
        return self.stream.generative

    @property
    def lm_head(self) -> torch.nn.Module:
        """The backbone's frozen output projection (generative streams; loaded once by ``prepare``)."""
        return self.backbone.lm_head

    def generate(self, model: torch.nn.Module, indices: list[int], ensemble: int = 1,
                 **forward_kwargs) -> list[str]:
        """Greedy answers (text) to the prompts of rows ``indices`` through ``model``'s active module
        (``ensemble``, ``forward_kwargs``: see :func:`conpet.generation.greedy_generate`)."""
        tok = self.backbone.tokenizer
        prompts = [self.encoded.prompt(i) for i in indices]
        tokens = greedy_generate(model, self.lm_head, prompts, self.backbone.pad_id, [end_token_id(tok)],
                                 self.cfg.data.max_new_tokens, self.compute, ensemble=ensemble,
                                 kv_cache=not self.pet.input_level, **forward_kwargs)
        self.answer_tokens.update(zip(indices, tokens))
        return [tok.decode(t, skip_special_tokens=True).strip() for t in tokens]

    def new_head(self) -> GrowingHead:
        """An empty classification head on the run's device."""
        return GrowingHead(self.backbone.hidden_size, device=self.device)

    def calibration(self, t: int) -> Calibration:
        """Runs a model on task ``t``'s training rows (data-aware PET initialisations)."""
        return self.engine.calibration(self.stream.tasks[t].train)

    def features(self, model: torch.nn.Module, indices: list[int], **forward_kwargs) -> torch.Tensor:
        """Cloze features [batch, hidden] of rows through ``model`` (the backbone with its PET modules)."""
        return self.engine.features(model, indices, **forward_kwargs)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.engine.batch(indices)

    def targets(self, indices: list[int]) -> torch.Tensor:
        return self.targets_all[indices]

    def epoch_batches(self, indices: list[int], epochs: int | None = None) -> list[list[int]]:
        """``epochs`` passes over ``indices`` in length-bucketed random batches."""
        lengths = self.encoded.all_lengths
        out: list[list[int]] = []
        for _ in range(epochs or self.cfg.train.epochs):
            out.extend(length_bucketed_batches(indices, lengths[indices], self.cfg.train.batch_size, self.rng,
                                               pool_batches=50 if self.cfg.train.length_bucketing else 1))
        return out
