"""LoRA with CorDA initialisation (Yang et al. 2024); see :class:`CorDA`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from conpet.errors import ConfigError
from conpet.pet.base import Calibration, LayerScope, register_pet
from conpet.pet.lora import LoRA


@register_pet("corda")
class CorDA(LoRA):
    """LoRA with CorDA initialisation (Yang et al. 2024, "CorDA: Context-Oriented Decomposition
    Adaptation of Large Language Models for Task-Aware Parameter-Efficient Fine-tuning"), using
    peft's CorDA decomposition (``peft.tuners.lora.corda.collect_eigens_for_layer``).

    For each targeted linear layer ``W`` the covariance ``C`` of its inputs is collected on rows of
    the task being learned (the runner hands over up to ``calibration_rows`` of them, default 256),
    ``W C = U S V^T`` is decomposed and ``V`` is multiplied by ``C^-1``; the module starts from the
    ``r`` components most tied to the task's context (``corda_method: ipm``, the instruction-
    previewed mode) or the least (``kpm``, knowledge-preserved).

    Deviation, named: peft subtracts the initial ``B0 A0`` from the backbone's weights, which one
    shared frozen backbone cannot allow (every task module, the selector and LwF's teacher live on
    it). conpet keeps the backbone untouched and stores the module as a plain peft LoRA of rank
    ``2r``: ``A = [A0; A0]``, ``B = [B0, -B0]``, the second half frozen (its gradient is masked and
    it is restored after every step). The update is therefore ``dW = s (B1 A1 - B0 A0)`` with the
    trainable ``B1, A1`` starting at ``B0, A0``: the same function and the same trainable
    subspace as peft's CorDA, on an untouched base; the saved folder loads in plain peft.
    Trainable parameters: ``r (in + out)`` per target (the frozen half is stored, not trained).
    ``use_rslora``/``use_dora`` are not available with it."""

    supports_kbit = False  # the decomposition reads the full-precision weights

    paper = ("Yang et al. 2024, CorDA: Context-Oriented Decomposition Adaptation of Large Language Models "
             "for Task-Aware Parameter-Efficient Fine-tuning")

    lora_mergeable = False

    def __init__(self, options: dict[str, Any] | None = None, *, scope: LayerScope | None = None,
                 precision: str = "fp32") -> None:
        options = dict(options or {})
        self.corda_method = options.pop("corda_method", "ipm")
        self.calibration_rows = options.pop("calibration_rows", 256)
        if self.corda_method not in ("ipm", "kpm"):
            raise ConfigError(f"pet.options.corda_method: 'ipm' or 'kpm', got {self.corda_method!r}")
        if not isinstance(self.calibration_rows, int) or self.calibration_rows < 1:
            raise ConfigError(f"pet.options.calibration_rows: must be an integer >= 1, got {self.calibration_rows!r}")
        for key in ("use_rslora", "use_dora", "init_lora_weights"):
            if options.get(key):
                raise ConfigError(f"pet.options.{key}: not available with corda")
        self._grad_handles: list = []
        super().__init__(options, scope=scope, precision=precision)

    def peft_options(self, model):
        options = super().peft_options(model)
        options["r"], options["lora_alpha"] = 2 * options["r"], 2 * options["lora_alpha"]  # same scaling
        return options

    def initialise(self, model: nn.Module, name: str, calibration: Calibration | None) -> None:
        """CorDA values for module ``name``; without calibration data (a module about to be
        overwritten by saved values) peft's plain LoRA initialisation stays."""
        from peft.tuners.lora.corda import collect_eigens_for_layer

        if calibration is None:
            return
        layers = [layer for _, layer in self.tuner_layers(model, name)]
        covariances: dict[int, list] = {id(layer): [0, 0] for layer in layers}

        def hook(layer):
            def collect(module, args, output):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                x = x / x.abs().max()
                acc = covariances[id(layer)]
                acc[0] = acc[0] + x.T @ x
                acc[1] += 1
            return collect

        handles = [layer.get_base_layer().register_forward_hook(hook(layer)) for layer in layers]
        try:
            with model.disable_adapter():
                calibration(model, self.calibration_rows)
        finally:
            for h in handles:
                h.remove()
        r = self.rank
        with torch.no_grad():
            for layer in layers:
                total, count = covariances[id(layer)]
                if not count:
                    raise ConfigError("pet 'corda': the calibration rows never reached a targeted layer")
                base = layer.get_base_layer()
                base.covariance_matrix = total / count
                try:
                    eigens = collect_eigens_for_layer(base, None)
                finally:
                    del base.covariance_matrix
                keep = slice(0, r) if self.corda_method == "ipm" else slice(-r, None)
                s = eigens.S_WC[keep] / layer.scaling[name]
                a0 = (eigens.V_WC[:, keep] * s.sqrt()).T  # r x in
                b0 = eigens.U_WC[:, keep] * s.sqrt()  # out x r
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                a.copy_(torch.cat([a0, a0]).to(a.dtype))
                b.copy_(torch.cat([b0, -b0], dim=1).to(b.dtype))

    def count(self, model: nn.Module, name: str) -> int:
        return super().count(model, name) // 2  # the frozen half is stored, not trained

    def step_hook(self, model: nn.Module, name: str, total_steps: int | None = None):
        """Mask the frozen half's gradient; restore it after each step (AdamW's weight decay
        would otherwise shrink it)."""
        for h in self._grad_handles:
            h.remove()
        self._grad_handles = []
        r = self.rank
        frozen = []
        for _, layer in self.tuner_layers(model, name):
            for weight, dim in ((layer.lora_A[name].weight, 0), (layer.lora_B[name].weight, 1)):
                mask = torch.ones_like(weight)
                mask.narrow(dim, r, r).zero_()
                self._grad_handles.append(weight.register_hook(lambda g, m=mask: g * m))
                frozen.append((weight, dim, weight.detach().narrow(dim, r, r).clone()))

        def restore(step: int) -> None:
            with torch.no_grad():
                for weight, dim, values in frozen:
                    weight.narrow(dim, r, r).copy_(values)

        return restore
