"""Prefix tuning (Li & Liang 2021) via peft, started from real tokens' keys and values; see
:class:`PrefixTuning`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from conpet.device import autocast
from conpet.errors import ConfigError
from conpet.families import cache_argument
from conpet.pet.base import Calibration, LayerScope, register_pet
from conpet.pet.prompt_learning import PromptLearning


@register_pet("prefix_tuning")
class PrefixTuning(PromptLearning):
    """Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
    Generation") via peft: ``num_virtual_tokens`` trainable keys and values prepended in every
    layer. Trainable (no reparameterisation): ``tokens x layers x 2 x kv_dim`` where kv_dim is the
    key/value width (smaller than hidden with grouped-query attention). ``prefix_projection: true``
    adds the paper's MLP reparameterisation. ``init: real_tokens`` (default; the paper's section
    7.2) starts the prefix from the backbone's keys and values of real task tokens,
    ``init: random`` keeps peft's N(0, 1) draw."""

    paper = "Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation"

    def __init__(self, options: dict[str, Any] | None = None, *, scope: LayerScope | None = None,
                 precision: str = "fp32") -> None:
        options = dict(options or {})
        self.init = options.pop("init", "real_tokens")
        if self.init not in ("real_tokens", "random"):
            raise ConfigError(f"pet.options.init: 'real_tokens' or 'random', got {self.init!r}")
        super().__init__(options, scope=scope, precision=precision)

    def config_class(self):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig

    def initialise(self, model: nn.Module, name: str, calibration: Calibration | None) -> None:
        """The paper's initialisation with activations of real words (Li & Liang 2021, section
        7.2; peft draws the prefix from N(0, 1), which on SmolLM2 swamps every layer's attention and
        the module never learns): the prefix becomes the keys and values that the frozen backbone
        computes for the first ``num_virtual_tokens`` tokens of the task's own training rows, at
        positions 0..n-1, the positions the real inputs then follow. Without calibration rows (a
        module about to be overwritten by saved values), with ``init: random`` or with
        ``prefix_projection`` (the MLP's input is not a key/value), peft's initialisation stays."""
        from transformers import DynamicCache

        config = model.peft_config[name]
        if calibration is None or self.init != "real_tokens" or config.prefix_projection:
            return
        n = config.num_virtual_tokens
        base = model.get_base_model()
        tokens: list[int] = []

        def collect(module, args, kwargs):
            ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
            if ids is None or len(tokens) >= n:
                return
            # peft prepends the prefix's own positions to the mask: the rows' part is its tail
            keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask[:, -ids.shape[1]:].bool()
            tokens.extend(ids[keep].tolist())  # row after row, padding left out

        handle = base.register_forward_pre_hook(collect, with_kwargs=True)
        try:
            calibration(model, n)
        finally:
            handle.remove()
        if not tokens:
            raise ConfigError("pet 'prefix_tuning': the calibration rows gave no token to initialise the prefix from")
        device = next(base.parameters()).device
        ids = torch.tensor((tokens * n)[:n], device=device).unsqueeze(0)
        cache = DynamicCache()
        with torch.no_grad(), autocast(self.precision, device):
            base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **{cache_argument(base): cache})
        layers = [(layer.keys, layer.values) for layer in cache.layers if getattr(layer, "keys", None) is not None]
        if len(layers) != config.num_layers:
            raise ConfigError(f"pet 'prefix_tuning': the backbone filled {len(layers)} of {config.num_layers} "
                              "layers' keys and values; use pet.options.init: random")
        # peft's layout per virtual token: [layer0 key, layer0 value, layer1 key, ...] x heads x head_dim
        kv = torch.stack([t[0] for pair in layers for t in pair])  # [layers*2, heads, n, head_dim]
        weight = model.prompt_encoder[name].embedding.weight
        with torch.no_grad():
            weight.copy_(kv.permute(2, 0, 1, 3).reshape(n, -1).to(weight.dtype))

    def expected_count(self, model):
        c = next(iter(model.peft_config.values()))
        base = model.get_base_model().config
        kv_heads = getattr(base, "num_key_value_heads", None) or base.num_attention_heads
        kv_dim = base.hidden_size // base.num_attention_heads * kv_heads
        if c.prefix_projection:
            h = c.encoder_hidden_size
            out = c.num_layers * 2 * kv_dim
            return c.num_virtual_tokens * c.token_dim + c.token_dim * h + h + h * out + out
        return c.num_virtual_tokens * c.num_layers * 2 * kv_dim
