"""PET methods backed by peft's public API (one adapter per module name, peft's file format)."""

from __future__ import annotations

import contextlib
import inspect
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from conpet.errors import ConfigError
from conpet.pet.base import PETMethod, check_safe_folder, in_module, register_pet


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct short names of the linear layers inside the transformer blocks (what peft's
    ``all-linear`` targets), e.g. ``[down_proj, gate_proj, k_proj, ...]``."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and re.search(r"\.\d+\.", n)}
    if not names:
        raise ConfigError("pet.options: target_modules 'all-linear' found no linear layer in the backbone's blocks")
    return sorted(names)


@contextlib.contextmanager
def readable_folder(folder: Path):
    """``folder`` itself, checked to hold no pickle; a ComPEFT-compressed folder
    (:func:`conpet.adapters.compress_lora_folder`) is decompressed into a temporary peft folder."""
    from conpet.adapters import decompress_lora_folder, is_compressed

    folder = Path(folder)
    if is_compressed(folder):
        with tempfile.TemporaryDirectory(prefix="conpet-decompressed-") as tmp:
            decompress_lora_folder(folder, Path(tmp))
            yield Path(tmp)
        return
    check_safe_folder(folder)
    yield folder


class PeftBacked(PETMethod):
    """Shared plumbing: subclasses only say how to build the peft config."""

    def peft_config(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _config(self):
        try:
            return self.peft_config()
        except TypeError as e:
            raise ConfigError(f"pet.options: {e} (options of '{self.name}': see peft's config)") from None
        except ValueError as e:
            raise ConfigError(f"pet.options: {e}") from None

    def resolve_options(self, model: nn.Module) -> None:
        """Options that depend on the backbone, settled once before the first module is built."""

    def attach(self, model: nn.Module, name: str) -> nn.Module:
        from peft import get_peft_model

        self.resolve_options(model)
        try:
            wrapped = get_peft_model(model, self._config(), adapter_name=name)
        except ValueError as e:
            raise ConfigError(f"pet.options for '{self.name}': {e}") from None
        self._skip_input_casts(wrapped)
        self.activate(wrapped, name)
        self.initialise(wrapped, name)
        return wrapped

    def initialise(self, model: nn.Module, name: str) -> None:
        """Data-aware start of a new module ``name`` (CorDA, prefix tuning), run after peft built
        it; a no-op for peft's own initialisations. Not run for a module loaded from a folder."""

    def _skip_input_casts(self, model: nn.Module) -> None:
        """Under bf16 autocast, peft's cast of each LoRA input to the adapter's fp32 dtype is
        undone by autocast right after (bf16 -> fp32 -> bf16, exact both ways): skip it. Same
        numbers, fewer copies (peft's own ``disable_input_dtype_casting``, made permanent)."""
        if self.bf16_autocast:
            for m in model.modules():
                if hasattr(m, "cast_input_dtype_enabled"):
                    m.cast_input_dtype_enabled = False

    def attach_from(self, model: nn.Module, folder: Path, name: str) -> nn.Module:
        from peft import PeftModel

        with readable_folder(folder) as plain:
            wrapped = PeftModel.from_pretrained(model, str(plain), adapter_name=name, is_trainable=False)
        self._skip_input_casts(wrapped)
        self.activate(wrapped, name)
        return wrapped

    def add(self, model: nn.Module, name: str) -> None:
        model.add_adapter(name, self._config())
        self._skip_input_casts(model)
        self.initialise(model, name)

    def activate(self, model: nn.Module, name: str) -> None:
        model.set_adapter(name)

    def tensors(self, model: nn.Module, name: str) -> list[nn.Parameter]:
        """Parameters of module ``name`` (peft puts the adapter name in every parameter path)."""
        return [p for n, p in model.named_parameters() if in_module(n, name)]

    def parameters(self, model: nn.Module, name: str) -> list[nn.Parameter]:
        params = self.tensors(model, name)
        for p in params:
            p.requires_grad_(True)
        return params

    def count(self, model: nn.Module, name: str) -> int:
        return sum(p.numel() for p in self.tensors(model, name))

    def save(self, model: nn.Module, name: str, folder: Path) -> None:
        model.save_pretrained(str(folder), selected_adapters=[name])
        inner = folder / name
        if name != "default" and inner.is_dir():  # peft nests non-default adapters
            for f in inner.iterdir():
                shutil.move(str(f), str(folder / f.name))
            inner.rmdir()

    load_trainable: bool = True
    """Whether peft loads a module as trainable (peft refuses it for prompt adapters and for a
    second trainable AdaLoRA module; :meth:`parameters` turns training on either way)."""

    def load(self, model: nn.Module, folder: Path, name: str) -> None:
        with readable_folder(folder) as plain:
            model.load_adapter(str(plain), adapter_name=name, is_trainable=self.load_trainable)
        self._skip_input_casts(model)

    def modules(self, model: nn.Module) -> list[str]:
        return list(getattr(model, "peft_config", {}))

    def _tuner_layers(self, model: nn.Module, name: str):
        """(backbone path, peft tuner layer) of every layer module ``name`` touches."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for path, m in model.named_modules():
            if isinstance(m, BaseTunerLayer) and name in getattr(m, m.adapter_layer_names[0], {}):
                yield path.removeprefix("base_model.model."), m

    def remove(self, model: nn.Module, name: str) -> None:
        model.delete_adapter(name)

    def detach(self, model: nn.Module) -> nn.Module:
        return model.unload()


@register_pet("lora")
class LoRA(PeftBacked):
    """LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") via peft.

    Options are peft ``LoraConfig`` fields; defaults: ``r=8, lora_alpha=16, lora_dropout=0.0``,
    ``target_modules`` = peft's default for the architecture (query/value projections).
    ``use_rslora`` and ``use_dora`` switch on rsLoRA and DoRA.
    """

    paper = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models"
    defaults: dict[str, Any] = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}

    def resolve_options(self, model: nn.Module) -> None:
        # peft refuses the string "all-linear" together with layers_to_transform (the fast path of
        # train.top_layers); spell it out as the names of the backbone's linear layers instead.
        if self.options.get("target_modules") == "all-linear" and self.options.get("layers_to_transform") is not None:
            self.options["target_modules"] = linear_module_names(model)

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(**{**self.defaults, **self.options})

    def delta_weights(self, model: nn.Module, name: str):
        """``dW = scaling x B A`` per targeted weight (peft's ``get_delta_weight``); DoRA's
        magnitude renormalisation is not an additive update: ``None``."""
        out = {}
        for path, layer in self._tuner_layers(model, name):
            if getattr(layer, "use_dora", {}).get(name):
                return None
            out[f"{path}.weight"] = layer.get_delta_weight(name).detach()
        return out


@register_pet("ia3")
class IA3(PeftBacked):
    """(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
    than In-Context Learning") via peft: learned vectors rescale keys, values and the feed-forward
    activations. Options are peft ``IA3Config`` fields (defaults: peft's per-architecture targets).
    Trainable: the sizes of the rescaled activations (k, v outputs and the feed-forward input)."""

    paper = "Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"
    routes_per_row = False

    def resolve_options(self, model: nn.Module) -> None:
        # peft's IA3Config has no layers_to_transform: confine it to the top layers
        # (train.top_layers) with regexes over peft's per-architecture targets instead
        layers = self.options.pop("layers_to_transform", None)
        pattern = self.options.pop("layers_pattern", None)
        if layers is None:
            return
        from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
                                          TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS)

        model_type = model.config.model_type
        targets = self.options.get("target_modules") or TARGETS.get(model_type)
        feedforward = self.options.get("feedforward_modules") or FEEDFORWARD.get(model_type)
        if not isinstance(targets, (list, tuple)) or not isinstance(feedforward, (list, tuple)):
            raise ConfigError(f"pet 'ia3' with train.top_layers needs target_modules and feedforward_modules as "
                              f"lists of names for model type '{model_type}'")
        idx = "|".join(str(i) for i in layers)
        where = rf"{pattern}\." if pattern else ""

        def regex(names) -> str:
            return rf"(.*\.)?{where}({idx})\..*({'|'.join(re.escape(n) for n in names)})$"

        self.options["target_modules"] = regex(targets)
        self.options["feedforward_modules"] = regex(feedforward)

    def peft_config(self):
        from peft import IA3Config

        return IA3Config(**{k: v for k, v in self.options.items() if k not in ("layers_to_transform", "layers_pattern")})

    def delta_weights(self, model: nn.Module, name: str):
        """``W (l - 1)`` (the learned vector scales the weight's columns for the feed-forward
        input, its rows otherwise) and, for the rows case, ``b (l - 1)`` for a bias."""
        out = {}
        for path, layer in self._tuner_layers(model, name):
            base = layer.get_base_layer()
            scale = layer.ia3_l[name].detach()
            out[f"{path}.weight"] = base.weight.detach() * (scale - 1)
            if not layer.is_feedforward and base.bias is not None:
                out[f"{path}.bias"] = base.bias.detach() * (scale.reshape(base.bias.shape) - 1)
        return out


@register_pet("ln_tuning")
class LNTuning(PeftBacked):
    """LN tuning (Qi et al. 2022, "Parameter-Efficient Tuning on Layer Normalization for
    Pre-trained Language Models") via peft: only the LayerNorm / RMSNorm weights (and biases)
    train. With ``train.top_layers`` only the norms of the top layers are tuned."""

    paper = "Qi et al. 2022, Parameter-Efficient Tuning on Layer Normalization for Pre-trained Language Models"
    routes_per_row = False

    def resolve_options(self, model: nn.Module) -> None:
        layers = self.options.pop("layers_to_transform", None)
        pattern = self.options.pop("layers_pattern", None)
        if "target_modules" not in self.options:  # every norm inside the transformer blocks
            idx = "|".join(str(i) for i in layers) if layers is not None else r"\d+"
            where = rf"{pattern}\." if pattern else ""
            self.options["target_modules"] = rf"(.*\.)?{where}({idx})\..*(norm|LayerNorm)[^.]*$"

    def delta_weights(self, model: nn.Module, name: str):
        """The tuned norm's parameters minus the frozen ones."""
        out = {}
        for path, layer in self._tuner_layers(model, name):
            base = dict(layer.get_base_layer().named_parameters())
            for key, p in layer.ln_tuning_layers[name].named_parameters():
                out[f"{path}.{key}"] = (p - base[key]).detach()
        return out

    def peft_config(self):
        from peft import LNTuningConfig

        options = {k: v for k, v in self.options.items() if k not in ("layers_to_transform", "layers_pattern")}
        return LNTuningConfig(**options)


# -- the prompt family (peft's prompt learning) ----------------------------------------------------
class PromptLearning(PeftBacked):
    """Shared plumbing of prompt tuning, prefix tuning and P-tuning through peft's
    ``FEATURE_EXTRACTION`` task type: virtual tokens are prepended to every input (prefix tuning:
    to every layer's keys and values), so the cloze position moves by their number
    (:func:`conpet.backbone.cloze_features` reads it from the output length). These methods act
    at the input, so they need ``train.top_layers: null`` (``auto`` resolves to it).

    ``lr`` is the learning rate of the virtual tokens, default 3e-2 for prompt and prefix tuning
    (peft's prompt-learning examples; soft prompts want a larger rate than LoRA's ``train.lr``)
    and 1e-3 for P-tuning, whose prompt encoder is an MLP (peft's P-tuning guide; at 3e-2 it
    diverges as soon as replay adds steps); ``lr: null`` uses ``train.lr``."""

    input_level = True
    routes_per_row = False
    load_trainable = False
    defaults: dict[str, Any] = {"num_virtual_tokens": 20}
    default_lr: float = 3e-2

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        # a PET confined to the top layers (train.top_layers) is refused earlier; here the keys
        # are simply not the prompt config's
        options.pop("layers_to_transform", None)
        options.pop("layers_pattern", None)
        self.lr = options.pop("lr", self.default_lr)
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"pet.options.lr: must be a positive number, got {self.lr!r}")
        super().__init__(options)

    def config_class(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def peft_config(self):
        return self.config_class()(task_type="FEATURE_EXTRACTION", **{**self.defaults, **self.options})

    def param_groups(self, model: nn.Module, name: str, lr: float) -> list[dict]:
        return [{"params": self.parameters(model, name), "lr": float(self.lr or lr)}]

    def detach(self, model: nn.Module) -> nn.Module:
        return model.get_base_model()  # peft leaves the backbone's own modules untouched here

    def expected_count(self, model: nn.Module) -> int:
        """Trainable parameters from the method's formula (``model`` wrapped; peft's resolved config)."""
        raise NotImplementedError


@register_pet("prompt_tuning")
class PromptTuning(PromptLearning):
    """Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
    Tuning") via peft: ``num_virtual_tokens`` (default 20) trainable input embeddings prepended to
    every input. Trainable: ``num_virtual_tokens x hidden``."""

    paper = "Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning"

    def config_class(self):
        from peft import PromptTuningConfig

        return PromptTuningConfig

    def expected_count(self, model):
        c = next(iter(model.peft_config.values()))
        return c.num_virtual_tokens * c.token_dim


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

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        self.init = options.pop("init", "real_tokens")
        if self.init not in ("real_tokens", "random"):
            raise ConfigError(f"pet.options.init: 'real_tokens' or 'random', got {self.init!r}")
        super().__init__(options)

    def config_class(self):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig

    def initialise(self, model: nn.Module, name: str) -> None:
        """The paper's initialisation with activations of real words (Li & Liang 2021, section
        7.2; peft draws the prefix from N(0, 1), which on SmolLM2 swamps every layer's attention and
        the module never learns): the prefix becomes the keys and values that the frozen backbone
        computes for the first ``num_virtual_tokens`` tokens of the task's own training rows, at
        positions 0..n-1, the positions the real inputs then follow. Without calibration rows (a
        module about to be overwritten by saved values), with ``init: random`` or with
        ``prefix_projection`` (the MLP's input is not a key/value), peft's initialisation stays."""
        import torch
        from transformers import DynamicCache

        from conpet.learners.loop import autocast

        config = model.peft_config[name]
        if self.calibration is None or self.init != "real_tokens" or config.prefix_projection:
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
            self.calibration(model, n)
        finally:
            handle.remove()
        if not tokens:
            raise ConfigError("pet 'prefix_tuning': the calibration rows gave no token to initialise the prefix from")
        ids = torch.tensor((tokens * n)[:n]).unsqueeze(0)
        cache = DynamicCache()
        with torch.no_grad(), autocast("bf16" if self.bf16_autocast else "fp32"):
            # transformers 5 renames past_key_values to cache (the old name goes in 5.40)
            key = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
            base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **{key: cache})
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


@register_pet("p_tuning")
class PTuning(PromptLearning):
    """P-tuning (Liu et al. 2021, "GPT Understands, Too") via peft: virtual-token embeddings
    produced by a prompt encoder (an MLP by default, ``encoder_reparameterization_type: LSTM`` for
    the paper's LSTM). Trainable (MLP): ``tokens x d + d h + h + h h + h + h d + d`` with
    ``h = encoder_hidden_size`` (default 128)."""

    paper = "Liu et al. 2021, GPT Understands, Too"
    defaults: dict[str, Any] = {"num_virtual_tokens": 20, "encoder_hidden_size": 128}
    default_lr = 1e-3

    def config_class(self):
        from peft import PromptEncoderConfig

        return PromptEncoderConfig

    def expected_count(self, model):
        c = next(iter(model.peft_config.values()))
        d, h = c.token_dim, c.encoder_hidden_size
        if str(c.encoder_reparameterization_type).upper().endswith("MLP"):
            return c.num_virtual_tokens * d + d * h + h + h * h + h + h * d + d
        raise NotImplementedError("formula given for the MLP encoder only")


# -- AdaLoRA ---------------------------------------------------------------------------------------
@register_pet("adalora")
class AdaLoRA(PeftBacked):
    """AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning")
    via peft: SVD-form updates ``P diag(E) Q`` whose ranks are pruned by an importance score towards
    a target budget during training, with an orthogonality penalty on P and Q.

    How conpet drives it (peft leaves this to the training loop): every fit of a module runs
    AdaLoRA's whole budget schedule, ``total_step`` = that fit's steps (``tinit``/``tfinal`` are
    peft's options, default 0); ``update_and_allocate`` is called after each optimizer step, with
    the gradients still present; ``orth_reg_weight`` (default 0.5) times the penalty is added to the
    loss. peft trains one AdaLoRA module at a time: when another module trains (a new task's
    expert, the selector), it becomes the trainable one and the others are frozen for peft.
    Defaults: ``init_r=12, target_r=8`` (peft's), ``lora_alpha=16``."""

    paper = "Zhang et al. 2023, Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
    routes_per_row = False
    load_trainable = False
    defaults: dict[str, Any] = {"init_r": 12, "target_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                                "total_step": 1}

    resolve_options = LoRA.resolve_options

    delta_weights = LoRA.delta_weights

    def tensors(self, model: nn.Module, name: str) -> list[nn.Parameter]:
        # ``ranknum`` is a constant (the initial rank) that peft keeps as a frozen parameter
        return [p for n, p in model.named_parameters() if in_module(n, name) and ".ranknum." not in n]

    def peft_config(self):
        from peft import AdaLoraConfig

        options = {**self.defaults, **self.options}
        # each fit sets the real total_step (step_hook); until then any value with room for
        # peft's budgeting phase
        options["total_step"] = max(int(options["total_step"]), options.get("tinit", 0) + options.get("tfinal", 0) + 1)
        return AdaLoraConfig(**options)

    def add(self, model: nn.Module, name: str) -> None:
        for config in model.peft_config.values():  # peft allows one trainable AdaLoRA module
            config.inference_mode = True
        super().add(model, name)

    def load(self, model: nn.Module, folder: Path, name: str) -> None:
        for config in model.peft_config.values():
            config.inference_mode = True
        super().load(model, folder, name)

    def step_hook(self, model: nn.Module, name: str, total_steps: int | None = None):
        """Make ``name`` peft's one trainable AdaLoRA module and start a fresh budget schedule of
        ``total_steps`` steps."""
        from peft.tuners.adalora.layer import RankAllocator

        tuner = model.base_model
        for n, other in model.peft_config.items():
            other.inference_mode = n != name
        config = model.peft_config[name]
        config.total_step = max(int(total_steps or 1), config.tinit + config.tfinal + 1)
        tuner.trainable_adapter_name = name
        tuner.rankallocator = RankAllocator(tuner.model, config, name)

        def update(step: int) -> None:
            tuner.update_and_allocate(step)

        return update

    def extra_loss(self, model: nn.Module, name: str):
        """peft's orthogonality penalty (``AdaLoraModel.forward`` adds it only to a loss computed
        by the model from labels, which conpet's heads never pass): mean over P and Q of
        ``||P P^T - I||_F`` / ``||Q^T Q - I||_F``, times ``orth_reg_weight``."""
        import torch

        weight = model.peft_config[name].orth_reg_weight
        if not weight:
            return None
        terms = []
        for n, p in model.named_parameters():
            if ("lora_A" in n or "lora_B" in n) and in_module(n, name) and p.requires_grad:
                cov = p @ p.T if "lora_A" in n else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype), "fro"))
        return weight * torch.stack(terms).mean() if terms else None


# -- CorDA -----------------------------------------------------------------------------------------
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

    paper = ("Yang et al. 2024, CorDA: Context-Oriented Decomposition Adaptation of Large Language Models "
             "for Task-Aware Parameter-Efficient Fine-tuning")

    def __init__(self, options: dict[str, Any] | None = None) -> None:
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
        super().__init__(options)
        self._grad_handles: list = []

    def rank(self) -> int:
        return int({**self.defaults, **self.options}["r"])

    def peft_config(self):
        from peft import LoraConfig

        options = {**self.defaults, **self.options}
        options["r"], options["lora_alpha"] = 2 * options["r"], 2 * options["lora_alpha"]  # same scaling
        return LoraConfig(**options)

    def initialise(self, model: nn.Module, name: str) -> None:
        """CorDA values for module ``name``; without calibration data (a module about to be
        overwritten by saved values) peft's plain LoRA initialisation stays."""
        import torch
        from peft.tuners.lora.corda import collect_eigens_for_layer

        if self.calibration is None:
            return
        layers = [layer for _, layer in self._tuner_layers(model, name)]
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
                self.calibration(model, self.calibration_rows)
        finally:
            for h in handles:
                h.remove()
        r = self.rank()
        with torch.no_grad():
            for layer in layers:
                total, count = covariances[id(layer)]
                if not count:
                    raise ConfigError(f"pet 'corda': the calibration rows never reached a targeted layer")
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
        import torch

        for h in self._grad_handles:
            h.remove()
        self._grad_handles = []
        r = self.rank()
        frozen = []
        for _, layer in self._tuner_layers(model, name):
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
