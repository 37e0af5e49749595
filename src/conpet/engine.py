"""The feature engine: cloze features of rows, optionally reusing frozen lower layers.

With ``train.top_layers = L`` the PET modules live only in the top L transformer layers. The
lower ``N - L`` layers are then frozen *and* see no PET, so their output for a row never changes:
it is computed once per row (no grad, under the run's autocast), kept in a memory-bounded
cache on the run's device and reused by every epoch, replay batch, selector and evaluation pass. Each training step
then runs only the top L layers forward and backward.

The cache belongs to one engine, which belongs to one backbone, one tokenization and one split
point, and is keyed by row index (token lists that are not rows, such as reference text, by
tuples that name them); another backbone or split means another engine with an empty
cache. At construction the split path is checked against the plain forward pass on a few rows, so an
architecture whose layers cannot be driven this way fails loudly instead of silently.

Without ``top_layers`` the engine is a plain full forward pass.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from conpet.backbone import Backbone, cloze_features, last_hidden, pool, token_states
from conpet.device import Compute, as_compute, shrink_on_oom
from conpet.errors import ConfigError
from conpet.families import family_of
from conpet.inputs import Encoded, collate, right_padded, sorted_batches
from conpet.pet.base import LayerScope


class _Passthrough(nn.Module):
    """Stands in for an encoder's embedding module: returns ``inputs_embeds`` unchanged."""

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        return inputs_embeds


class _ZeroPositions(nn.Module):
    """Stands in for an absolute position table (GPT-2's ``wpe``): the cached states have them."""

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        self.dim = table.embedding_dim

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*position_ids.shape, self.dim, device=position_ids.device)


def _bypass(module: nn.Module) -> nn.Module:
    """What replaces one part of a family's input stage in the upper pass."""
    if isinstance(module, nn.Embedding):
        return _ZeroPositions(module)
    if isinstance(module, nn.Dropout):
        return nn.Identity()
    return _Passthrough()


class _Stop(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


def find_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(owner, attribute, ModuleList) of the transformer layer stack of an HF base model."""
    n = getattr(model.config, "num_hidden_layers", None)
    for owner in model.modules():
        for attr, child in owner.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n:
                return owner, attr, child
    raise ConfigError(f"train.top_layers: cannot find the {n} transformer layers of {type(model).__name__}")


AUTO_TOP_FRACTION = 0.4
"""``train.top_layers: auto`` confines PET to this share of the layers (rounded) of a backbone
deeper than 8 layers: SmolLM2's top 12 of 30, the best mean dev accuracy over the WordNet streams
in the 3-seed sweep of L in {4, 8, 12, all} (docs/speed.md)."""


def auto_top_layers(n_layers: int | None) -> int | None:
    """What ``auto`` confines PET to in a backbone of ``n_layers``: ``None`` (every layer) for 8
    layers or fewer, else the top :data:`AUTO_TOP_FRACTION` of them."""
    if n_layers is None or n_layers <= 8:
        return None
    return max(1, round(AUTO_TOP_FRACTION * n_layers))


def resolve_top_layers(setting: int | str | None, model: nn.Module, input_level: bool,
                       sharded: bool = False) -> int | None:
    """The one decision on ``train.top_layers``: ``auto`` -> :func:`auto_top_layers`; a method working at the input (``input_level``) needs every
    layer, so ``auto`` gives it ``None`` and an explicit number is an error. A ``sharded``
    backbone (``backbone.fsdp``) runs whole: the lower-layer cache is per process (an explicit
    number was refused by :func:`conpet.build.check_fsdp`)."""
    if sharded:
        return None
    if input_level:
        if isinstance(setting, int):
            raise ConfigError(f"train.top_layers: the PET method works at the input embeddings, so every layer "
                              f"must see it; it needs train.top_layers: null (or auto), not {setting}")
        return None
    if setting == "auto":
        return auto_top_layers(getattr(model.config, "num_hidden_layers", None))
    return setting


class FeatureEngine:
    def __init__(self, backbone: Backbone, encoded: Encoded, top_layers: int | None = None,
                 compute: Compute | str = "fp32", batch_size: int = 64, max_cache_mb: float = 4096.0,
                 cache_dtype: torch.dtype | None = None, pooling: str = "cloze") -> None:
        self.backbone = backbone
        self.pooling = pooling
        """How :meth:`features` reads a row: ``cloze``, ``mean`` or ``last`` (:func:`conpet.backbone.pool`)."""
        self.encoded = encoded
        self.compute = as_compute(compute)
        self.batch_size = batch_size
        self.cache_dtype = cache_dtype or (self.compute.dtype if self.compute.precision != "fp32" else torch.float32)
        self.max_cache_bytes = int(max_cache_mb * 2**20)
        self.cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.cache_bytes = 0
        self.hits = self.misses = 0
        self.split = None
        self.top_layers = top_layers
        if top_layers is not None:
            # the layer stack's owner and attribute are found once; PET wrapping and unwrapping
            # replace modules inside the layers, never the stack itself
            self._owner, self._attr, layers = find_layers(backbone.model)
            n = len(layers)
            if not 1 <= top_layers <= n:
                raise ConfigError(f"train.top_layers: must be between 1 and {n} for this model, got {top_layers}")
            self.split = n - top_layers
            self.n_layers = n

    @property
    def precision(self) -> str:
        return self.compute.precision

    def replace_rows(self, encoded: Encoded) -> None:
        """Work on other rows (a served batch): the cache, keyed by row index, is emptied."""
        self.encoded = encoded
        self.cache.clear()
        self.cache_bytes = 0

    def placement(self) -> str:
        """Where the PET modules sit, in words (a run says it once at its start)."""
        if self.top_layers is None:
            return "PET in every layer"
        return (f"PET in the top {self.top_layers} of {self.n_layers} layers, the {self.n_layers - self.top_layers} "
                "below computed once per row")

    @property
    def hidden_dtype(self) -> torch.dtype:
        """The dtype the upper layers get their input in: the backbone's own (that of its input
        embeddings; fp32 for a model loaded in fp32 and run under autocast)."""
        dtype = self.backbone.model.get_input_embeddings().weight.dtype
        return dtype if dtype.is_floating_point else torch.float32

    @property
    def device(self) -> torch.device:
        return self.compute.device

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The padded batch of rows ``indices`` (``input_ids``, ``attention_mask``, ``cloze_pos``) on the device."""
        return {k: self.compute.to(v) for k, v in collate(self.encoded, indices, self.backbone.pad_id).items()}

    # -- which layers the PET modules may touch ---------------------------------------------
    @property
    def scope(self) -> LayerScope | None:
        """The layers PET modules may touch when the engine caches the lower ones, else ``None``."""
        if self.split is None:
            return None
        return LayerScope(tuple(range(self.split, self.n_layers)), self._attr, self.n_layers)

    # -- the forward passes ----------------------------------------------------------------------
    def features(self, model: nn.Module, indices: list[int], **forward_kwargs) -> torch.Tensor:
        """Features [batch, hidden] of rows ``indices`` through ``model`` (PET included), pooled
        as :attr:`pooling` says.

        ``forward_kwargs`` go to the model, e.g. peft's ``adapter_names`` to route each row
        through its own module in one batch."""
        if self.pooling == "cloze" and (self.split is None or self.split == 0):
            return cloze_features(model, self.batch(indices), **forward_kwargs)
        return self.pool(self.states(model, indices, **forward_kwargs), indices)

    def pool(self, states: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """Rows ``indices``' right-padded last-layer states [batch, tokens, hidden] -> one feature
        vector each, as :attr:`pooling` says."""
        lengths = torch.tensor([len(self.encoded.ids[i]) for i in indices], device=states.device)
        cloze = torch.tensor([self.encoded.cloze_pos[i] for i in indices], device=states.device)
        return pool(states, lengths, cloze, self.pooling)

    def states(self, model: nn.Module, indices: list[int], **forward_kwargs) -> torch.Tensor:
        """Last-layer hidden states [batch, longest row, hidden] of rows ``indices`` (right-padded;
        position k is row token k, also under a prompt method that prepends virtual tokens): what
        a language-model loss reads at every target position. The lower layers come from the cache."""
        if self.split is None or self.split == 0:
            batch = self.batch(indices)
            return self._full_states(model, batch["input_ids"], batch["attention_mask"], **forward_kwargs)
        self._ensure(indices)
        return self._upper_of(model, [self.cache[i] for i in indices], **forward_kwargs)

    def sequence_states(self, model: nn.Module, seqs: Sequence[Sequence[int]], keys: Sequence[tuple],
                        **forward_kwargs) -> torch.Tensor:
        """:meth:`states` of token lists that are not rows of the stream (the reference text a
        learner distils on), right-padded; their lower layers are computed once and cached under
        ``keys``, one hashable tuple per sequence naming it for the run (an int key is a row)."""
        if self.split is None or self.split == 0:
            return self._full_states(model, *right_padded(seqs, self.backbone.pad_id, self.device), **forward_kwargs)
        missing = {k: s for k, s in zip(keys, seqs) if k not in self.cache}
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)

        def cache_part(part: list) -> None:
            ids, mask = right_padded([missing[k] for k in part], self.backbone.pad_id, self.device)
            self._store(part, self._lower({"input_ids": ids, "attention_mask": mask}), [len(missing[k]) for k in part])

        todo = list(missing)
        for start in range(0, len(todo), self.batch_size):
            shrink_on_oom(cache_part, todo[start:start + self.batch_size], join=lambda parts: None,
                          on_shrink=self.compute.empty_cache)
        self._keep(keys)
        return self._upper_of(model, [self.cache[k] for k in keys], **forward_kwargs)

    def _full_states(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, **forward_kwargs) -> torch.Tensor:
        """Last-layer states [batch, width, hidden] of a padded batch through the whole model
        (position k is token k, also under a prompt method that prepends virtual tokens)."""
        return token_states(last_hidden(model(input_ids=ids, attention_mask=mask, **forward_kwargs)), ids.shape[1])

    def _upper_of(self, model: nn.Module, seqs: list[torch.Tensor], **forward_kwargs) -> torch.Tensor:
        """The top layers on cached lower states (one [tokens, hidden] tensor per sequence), right-padded."""
        width = max(s.shape[0] for s in seqs)
        device = self.device
        hidden = torch.zeros(len(seqs), width, seqs[0].shape[1], device=device, dtype=self.hidden_dtype)
        mask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
        for r, s in enumerate(seqs):
            hidden[r, : s.shape[0]] = s.to(self.hidden_dtype)
            mask[r, : s.shape[0]] = 1
        return self._upper(model, hidden, mask, **forward_kwargs)

    def _layers(self):
        return self._owner, self._attr, getattr(self._owner, self._attr)

    def _upper(self, model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, **forward_kwargs) -> torch.Tensor:
        """The top layers on cached hidden states: the stack is cut to its top part, the family's
        input stage is bypassed (:mod:`conpet.families`) and per-layer config lists
        (``layer_types``: sliding or full attention) are cut to match."""
        base = self.backbone.model
        owner, attr, layers = self._layers()
        family = family_of(base.config.model_type)
        swaps = [(owner, attr, nn.ModuleList(list(layers)[self.split:]))]
        swaps += [(base, name, _bypass(getattr(base, name))) for name in family.input_stage
                  if getattr(base, name, None) is not None]
        swaps += [(owner, name, None) for name in family.after_first_layer if getattr(owner, name, None) is not None]
        layer_types = getattr(base.config, "layer_types", None)
        if isinstance(layer_types, (list, tuple)) and len(layer_types) == self.n_layers:
            swaps.append((base.config, "layer_types", list(layer_types)[self.split:]))
        saved = []
        try:
            for obj, name, new in swaps:
                saved.append((obj, name, getattr(obj, name)))
                setattr(obj, name, new)
            out = model(inputs_embeds=hidden, attention_mask=mask, **forward_kwargs)
        finally:
            for obj, name, old in reversed(saved):
                setattr(obj, name, old)
        return last_hidden(out)

    @torch.no_grad()
    def _lower(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The input of layer ``split`` (the first PET layer) for a batch, as that layer receives it:
        always computed in eval mode (no dropout), whatever mode the model is in when a row is
        first cached, so a cached row never keeps one draw of dropout noise for the whole run."""
        model = self.backbone.model
        layers = self._layers()[2]

        def stop(module, args, kwargs):
            raise _Stop(args[0] if args else kwargs["hidden_states"])

        handle = layers[self.split].register_forward_pre_hook(stop, with_kwargs=True)
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with self.compute.autocast():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        except _Stop as s:
            return s.value
        finally:
            handle.remove()
            for m, training in modes:
                m.training = training
        raise RuntimeError("the lower layers never reached the split point")

    def _ensure(self, indices: list[int]) -> None:
        missing = [i for i in dict.fromkeys(indices) if i not in self.cache]
        self.hits += len(indices) - len(missing)
        self.misses += len(missing)
        if not missing:
            for i in indices:
                self.cache.move_to_end(i)
            return
        lengths = self.encoded.lengths(missing)
        for rows in sorted_batches(missing, lengths, self.batch_size):
            shrink_on_oom(self._cache_rows, rows, join=lambda parts: None, on_shrink=self.compute.empty_cache)
        self._keep(indices)

    def _keep(self, keys) -> None:
        """Mark ``keys`` most recently used, then evict the least recently used entries past the
        memory bound (never one of ``keys``)."""
        for k in keys:
            self.cache.move_to_end(k)
        while self.cache_bytes > self.max_cache_bytes and len(self.cache) > len(keys):
            _, t = self.cache.popitem(last=False)
            self.cache_bytes -= t.numel() * t.element_size()

    def _cache_rows(self, rows: list[int]) -> None:
        self._store(rows, self._lower(self.batch(rows)), [len(self.encoded.ids[i]) for i in rows])

    def _store(self, keys, hidden: torch.Tensor, lengths: list[int]) -> None:
        """Cache ``hidden[r, :lengths[r]]`` (a batch's lower-layer output) under ``keys[r]``."""
        for r, k in enumerate(keys):
            t = hidden[r, : lengths[r]].to(self.cache_dtype).clone()
            self.cache[k] = t
            self.cache_bytes += t.numel() * t.element_size()

    def calibration(self, indices: list[int]):
        """``run(model, max_rows)``: run ``model`` without gradient on the first ``max_rows`` of
        ``indices`` (data-aware initialisations such as CorDA collect statistics through hooks)."""
        def run(model: nn.Module, max_rows: int) -> None:
            rows = list(indices[:max_rows])
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad(), self.compute.autocast():
                    for batch in sorted_batches(rows, self.encoded.lengths(rows), self.batch_size):
                        self.features(model, batch)
            finally:
                model.train(was_training)

        return run

    def warm(self, indices: list[int]) -> None:
        """Compute and cache the lower layers for ``indices`` up front."""
        if self.split:
            for start in range(0, len(indices), 4096):
                self._ensure(list(indices[start:start + 4096]))

    def check(self, model: nn.Module, indices: list[int], atol: float | None = None) -> float:
        """Relative max |split - full| feature difference on ``indices``; raises above ``atol``
        (default: 1e-4 in fp32, where a correct split is exact up to summation order; 1e-2 under
        bf16/fp16 autocast)."""
        atol = atol if atol is not None else (1e-4 if self.precision == "fp32" else 1e-2)
        if not self.split:
            return 0.0
        batch = self.batch(indices)
        rows = torch.arange(len(indices), device=self.device)
        with torch.no_grad(), self.compute.autocast():
            full = cloze_features(model, batch).float()
            lower = self._lower(batch).to(self.hidden_dtype)
            split = self._upper(model, lower, batch["attention_mask"])[rows, batch["cloze_pos"]].float()
        diff = float((full - split).abs().max() / (full.abs().max() + 1e-6))
        if diff > atol:
            raise ConfigError(f"train.top_layers: the split forward pass of {type(self.backbone.model).__name__} "
                              f"does not match the full one (relative difference {diff:.3g}); "
                              "this architecture needs train.top_layers: null")
        return diff
