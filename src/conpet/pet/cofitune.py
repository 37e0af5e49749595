"""CoFiTune's coarse level (Zhang et al. 2024); see :class:`CoFiTune`."""

from __future__ import annotations

import re

from torch import nn

from conpet.errors import ConfigError
from conpet.families import FFN_LAYOUTS, ffn_layout
from conpet.pet.base import register_pet
from conpet.pet.delta import DeltaPart, DeltaPET

WINDOWS: dict[str, tuple[int, int]] = {
    "bottom1": (0, 1), "bottom2": (1, 2), "middle": (2, 3), "top": (3, 4),
    "bottom-plus": (0, 2), "middle-plus": (1, 3), "top-plus": (2, 4),
}
"""The candidate layer ranges of the official ``pipeline_sft.sh``, in quarters of the stack:
``bottom2`` = quarters [1, 2) = layers (N 25%, N 50%] (8-15 of 32, 10-19 of 40, 15-29 of 60)."""

def window_layers(window: str, n_layers: int) -> list[int]:
    """The layer indices (0-based) of ``window`` in an ``n_layers`` stack."""
    lo, hi = WINDOWS[window]
    return list(range(n_layers * lo // 4, n_layers * hi // 4))


def ffn_names(model: nn.Module) -> tuple[str, str, str]:
    """(up, down, attention output) block-relative paths of ``model``'s family (:data:`conpet.families.FFN_LAYOUTS`)."""
    names = ffn_layout(path for path, _ in model.named_modules())
    if names is None:
        raise ConfigError(f"pet 'cofitune': no known feed-forward layout in {type(model).__name__} (known: "
                          + "; ".join("/".join(names) for names in FFN_LAYOUTS) + ")")
    return names


@register_pet("cofitune")
class CoFiTune(DeltaPET):
    """CoFiTune's coarse level (Zhang et al. 2024, "Balancing Speciality and Versatility: a
    Coarse to Fine Framework for Supervised Fine-tuning Large Language Model", official code
    rattlesnakey/CoFiTune): full-matrix updates of the feed-forward ``up`` and ``down``
    projections in one window of layers, everything else (attention, Llama's ``gate_proj``,
    norms, embeddings) frozen. The default window is the paper's chosen configuration, layers
    (N 25%, N 50%] (``window: bottom2``); the other candidate ranges of the official script can
    be chosen (``bottom1``, ``middle``, ``top``, ``bottom-plus``, ``middle-plus``, ``top-plus``).
    The tree search over ranges and modules itself is not run.

    The window sits in the middle of the stack, so the frozen-layer cache must stop below it:
    ``train.top_layers: auto`` resolves to exactly that (:meth:`confine_top_layers`); an explicit
    ``top_layers`` that leaves part of the window in the cache is an error. Named deviation: the
    update is stored as a delta beside the frozen weight (conpet's dense-update machinery), so
    AdamW's weight decay pulls it towards the pretrained weight, not towards zero. Trainable:
    the up and down weight matrices of every window layer, ``2 x hidden x intermediate`` each
    layer (biases stay frozen)."""

    paper = ("Zhang et al. 2024, Balancing Speciality and Versatility: a Coarse to Fine Framework for Supervised "
             "Fine-tuning Large Language Model")
    defaults = {"window": "bottom2"}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.n_layers: int | None = None
        if self.scope is not None:
            self.n_layers = self.scope.n_layers
            window = self.window()
            if not set(window) <= set(self.scope.layers):
                raise ConfigError(f"train.top_layers: pet 'cofitune' trains layers {window[0]}-{window[-1]} of "
                                  f"{self.n_layers}, below the top {len(self.scope.layers)}; it needs "
                                  f"train.top_layers >= {self.n_layers - window[0]} (or auto, or null)")

    def check_options(self, options):
        options = super().check_options(options)
        if options["window"] not in WINDOWS:
            raise ConfigError(f"pet.options.window: one of {', '.join(WINDOWS)}, got {options['window']!r}")
        return options

    @classmethod
    def confine_top_layers(cls, setting: int | str | None, n_layers: int, options: dict) -> int | str | None:
        """``train.top_layers`` for this method: ``auto`` caches every layer below the window."""
        name = options.get("window", cls.defaults["window"])
        window = window_layers(name, n_layers) if name in WINDOWS else []  # a bad name: the constructor says so
        return n_layers - window[0] if setting == "auto" and window else setting

    def window(self) -> list[int]:
        """The trained layers (the model's depth is known once a scope is given or a model attached)."""
        layers = window_layers(self.options["window"], self.n_layers)
        if not layers:
            raise ConfigError(f"pet.options.window: '{self.options['window']}' holds no layer of a "
                              f"{self.n_layers}-layer model; choose a wider window (e.g. bottom-plus)")
        return layers

    @property
    def layers(self) -> list[int] | None:
        return self.window() if self.n_layers is not None else None

    def attach(self, model, name, calibration=None):
        self.n_layers = model.config.num_hidden_layers
        return super().attach(model, name, calibration)

    def site_pattern(self, model):
        up, down, _ = ffn_names(model)
        return f"^({re.escape(up)}|{re.escape(down)})$"

    def build(self, base, path, shared):
        return DeltaPart(base)

    def expected_count(self, model):
        return sum(site.base.weight.numel() for site in model.sites.values())
