"""Merging per-task weight updates: pure tensor functions and a registry.

A *task vector* (Ilharco et al., 2023) is the weight update one task made, ``tau = theta_ft -
theta_pre``; for a LoRA adapter it is ``dW = scaling * B @ A`` (:func:`conpet.adapters.lora_delta`). Every
merge method here takes the updates of several tasks for ONE tensor (a list of same-shaped
tensors) plus keyword options, and returns one merged update of the same shape and dtype. The
functions do not change their inputs and have no hidden state (DARE draws its random mask from
an explicit seed or ``torch.Generator``). :func:`merge_state` applies a method tensor by tensor
to whole state dicts; :func:`conpet.adapters.to_lora` turns a merged ``dW`` back into LoRA factors.

Methods are registered in :data:`MERGE_METHODS` with their paper and defaults (the defaults are
read from the function's keyword arguments, so they cannot drift apart)::

    from conpet.merging import MERGE_METHODS, get_merge_method, merge_state
    ties = get_merge_method("ties")
    ties.paper, ties.defaults            # citation, {'density': 0.2, 'scaling': 1.0, ...}
    merged = merge_state([delta_task0, delta_task1], "ties", density=0.2)

Averaging LoRA factors separately is *not* averaging updates:
``mean(B) @ mean(A) != mean(B @ A)``. Merge ``dW`` (or the product), then refactor with
:func:`conpet.adapters.to_lora` if a LoRA is needed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from conpet.errors import ConfigError
from conpet.sparsify import (
    breadcrumbs_mask,
    dare_drop,
    global_magnitude_threshold,
    seeded_generator,
    top_magnitude_mask,
    work_dtype,
)

__all__ = [
    "MergeMethod",
    "MERGE_METHODS",
    "register_merge_method",
    "get_merge_method",
    "merge_state",
    "linear",
    "task_arithmetic",
    "ties",
    "dare",
    "breadcrumbs",
    "magnitude_prune",
]

MergeFn = Callable[..., Tensor]


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    ``name``: registry key; ``paper``: full citation; ``defaults``: the keyword options and their
    default values; ``fn``: the pure function ``fn(deltas, **options) -> Tensor``;
    ``trim_scope``: ``"global"`` or ``"tensor"`` for methods that trim by magnitude (the
    scope :func:`merge_state` uses unless told otherwise), ``None`` for the others.
    """

    name: str
    paper: str
    defaults: Mapping[str, Any]
    fn: MergeFn = field(repr=False)
    trim_scope: str | None = None

    def __call__(self, deltas: Sequence[Tensor], **options: Any) -> Tensor:
        """Merge one tensor's updates, after checking the option names."""
        self.check_options(options)
        return self.fn(deltas, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise :class:`ConfigError` for an option this method does not take."""
        unknown = [k for k in options if k not in self.defaults]
        if unknown:
            raise ConfigError(
                f"merge method {self.name!r} has no option {unknown[0]!r}; "
                f"its options are: {', '.join(sorted(self.defaults)) or '(none)'}"
            )


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(
    name: str, *, paper: str, trim_scope: str | None = None
) -> Callable[[MergeFn], MergeFn]:
    """Decorator: register ``fn`` under ``name``; its keyword-only defaults become ``defaults``."""

    def decorator(fn: MergeFn) -> MergeFn:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        defaults = {
            p.name: p.default
            for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        MERGE_METHODS[name] = MergeMethod(name, paper, defaults, fn, trim_scope)
        return fn

    return decorator


def get_merge_method(name: str | MergeMethod) -> MergeMethod:
    """The registered method called ``name``; :class:`ConfigError` listing the names otherwise."""
    if isinstance(name, MergeMethod):
        return name
    try:
        return MERGE_METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown merge method {name!r}; available: {', '.join(sorted(MERGE_METHODS))}"
        ) from None


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

TASK_ARITHMETIC_PAPER = (
    "Ilharco, G., Ribeiro, M. T., Wortsman, M., Gururangan, S., Schmidt, L., Hajishirzi, H., & "
    "Farhadi, A. (2023). Editing Models with Task Arithmetic. ICLR 2023. arXiv:2212.04089"
)
LINEAR_PAPER = (
    "Wortsman, M., Ilharco, G., Gadre, S. Y., et al. (2022). Model soups: averaging weights of "
    "multiple fine-tuned models improves accuracy without increasing inference time. ICML 2022. "
    "arXiv:2203.05482"
)
TIES_PAPER = (
    "Yadav, P., Tam, D., Choshen, L., Raffel, C., & Bansal, M. (2023). TIES-Merging: Resolving "
    "Interference When Merging Models. NeurIPS 2023. arXiv:2306.01708"
)
DARE_PAPER = (
    "Yu, L., Yu, B., Yu, H., Huang, F., & Li, Y. (2024). Language Models are Super Mario: "
    "Absorbing Abilities from Homologous Models as a Free Lunch. ICML 2024. arXiv:2311.03099"
)
BREADCRUMBS_PAPER = (
    "Davari, M., & Belilovsky, E. (2023). Model Breadcrumbs: Scaling Multi-Task Model Merging "
    "with Sparse Masks. arXiv:2312.06795 (ECCV 2024)"
)
MAGNITUDE_PRUNE_PAPER = (
    "Magnitude pruning of each task vector before summing, the 'trim' step of "
    "Yadav et al. (2023), TIES-Merging, NeurIPS 2023, arXiv:2306.01708, without sign election; "
    "as in mergekit's magnitude-based sparsification (arcee-ai/mergekit)"
)


def _check_deltas(deltas: Sequence[Tensor], where: str = "merge") -> None:
    if isinstance(deltas, Tensor) or not isinstance(deltas, Sequence) or len(deltas) == 0:
        raise ConfigError(f"{where}: expected a non-empty list of per-task tensors")
    for i, d in enumerate(deltas):
        if not isinstance(d, Tensor):
            raise ConfigError(f"{where}: task {i}'s update is a {type(d).__name__}, not a tensor")
        if d.shape != deltas[0].shape:
            raise ConfigError(
                f"{where}: task {i}'s update has shape {tuple(d.shape)} but task 0's has "
                f"{tuple(deltas[0].shape)}; merged updates must come from the same architecture "
                "and adapter rank"
            )


def _stack(deltas: Sequence[Tensor]) -> Tensor:
    """``[tasks, *shape]`` in the working dtype."""
    work = work_dtype(deltas[0].dtype)
    return torch.stack([d.detach().to(work) for d in deltas])


def _check_fraction(name: str, value: float, method: str, *, upper_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and 0.0 <= value
    ok = ok and (value < 1.0 if upper_open else value <= 1.0)
    if not ok:
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ConfigError(f"merge method {method!r}: {name} must be in {bound}, got {value!r}")


def _trim(stacked: Tensor, density: float, thresholds: Sequence[float] | None) -> Tensor:
    """Zero all but the largest magnitudes of each task's update (row of ``stacked``)."""
    if thresholds is not None:
        if len(thresholds) != stacked.shape[0]:
            raise ConfigError(
                f"magnitude_thresholds has {len(thresholds)} values for {stacked.shape[0]} tasks"
            )
        thr = torch.tensor(list(thresholds), dtype=stacked.dtype, device=stacked.device)
        thr = thr.reshape(-1, *([1] * (stacked.dim() - 1)))
        return stacked * (stacked.abs() >= thr)
    return torch.stack([row * top_magnitude_mask(row, density) for row in stacked])


def _elect_signs(stacked: Tensor) -> Tensor:
    """TIES sign election: ``sign(sum_t tau_t)`` ("mass"); a zero sum takes the majority sign.

    The majority sign is the sign of the sum of the elected signs over the whole tensor (as in
    ``resolve_zero_signs`` of the official TIES code). An entry whose sum and majority are both
    zero gets sign 0 and merges to 0.
    """
    signs = torch.sign(stacked.sum(dim=0))
    majority = torch.sign(signs.sum())
    return torch.where(signs == 0, majority, signs)


def _disjoint_mean(stacked: Tensor, signs: Tensor) -> Tensor:
    """Mean over the tasks whose (non-zero) entry agrees with the elected sign; 0 if none."""
    agrees = (torch.sign(stacked) == signs.unsqueeze(0)) & (stacked != 0)
    selected = stacked * agrees
    counts = agrees.sum(dim=0).clamp(min=1)
    return selected.sum(dim=0) / counts


_COMBINES = ("sum", "mean", "ties")


def _combine(stacked: Tensor, combine: str, method: str, allowed: Sequence[str]) -> Tensor:
    if combine not in allowed:
        raise ConfigError(
            f"merge method {method!r}: combine must be one of {', '.join(allowed)}; got {combine!r}"
        )
    if combine == "sum":
        return stacked.sum(dim=0)
    if combine == "mean":
        return stacked.mean(dim=0)
    return _disjoint_mean(stacked, _elect_signs(stacked))


# --------------------------------------------------------------------------------------------
# Merge methods (one tensor at a time)
# --------------------------------------------------------------------------------------------


@register_merge_method("linear", paper=LINEAR_PAPER)
def linear(
    deltas: Sequence[Tensor], *, weights: Sequence[float] | None = None, normalize: bool = True
) -> Tensor:
    """Weighted mean ``sum_t w_t tau_t / sum_t w_t`` (plain mean without ``weights``).

    With ``normalize=False`` the weighted sum is returned without dividing by ``sum_t w_t``.
    Wortsman et al. (2022), "Model soups", arXiv:2203.05482.
    """
    _check_deltas(deltas, "linear")
    stacked = _stack(deltas)
    if weights is None:
        w = torch.ones(len(deltas), dtype=stacked.dtype, device=stacked.device)
    else:
        if len(weights) != len(deltas):
            raise ConfigError(f"linear: {len(weights)} weights for {len(deltas)} tasks")
        w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype, device=stacked.device)
    merged = torch.tensordot(w, stacked, dims=1)
    if normalize:
        total = float(w.sum())
        if total == 0:
            raise ConfigError("linear: the weights sum to 0; give weights with a non-zero sum")
        merged = merged / total
    return merged.to(deltas[0].dtype)


@register_merge_method("task_arithmetic", paper=TASK_ARITHMETIC_PAPER)
def task_arithmetic(deltas: Sequence[Tensor], *, scaling: float = 1.0) -> Tensor:
    """Task arithmetic: ``scaling * sum_t tau_t`` (Ilharco et al., 2023, arXiv:2212.04089).

    The paper picks ``scaling`` (lambda) on validation data from 0 to 1; 1.0 is the plain sum.
    """
    _check_deltas(deltas, "task_arithmetic")
    return (scaling * _stack(deltas).sum(dim=0)).to(deltas[0].dtype)


@register_merge_method("ties", paper=TIES_PAPER, trim_scope="global")
def ties(
    deltas: Sequence[Tensor],
    *,
    density: float = 0.2,
    scaling: float = 1.0,
    magnitude_thresholds: Sequence[float] | None = None,
) -> Tensor:
    """TIES-Merging (Yadav et al., 2023, arXiv:2306.01708): trim, elect sign, disjoint merge.

    1. **Trim**: keep the ``density`` (default 20%) largest ``|tau_t|`` of each task, zero the
       rest. Here that is exactly ``round(density * numel)`` entries of this tensor; with
       ``magnitude_thresholds`` (one per task) it keeps ``|tau_t| >= threshold_t`` instead,
       which is how :func:`merge_state` trims over the whole flattened update as the paper does
       (``trim_scope="global"``, the default there). The official code's ``kthvalue`` keeps one
       entry more than ``density * n``; we keep exactly the requested count.
    2. **Elect**: the sign of ``sum_t trimmed_t`` per entry ("mass"); a zero sum takes the
       majority sign.
    3. **Disjoint mean**: average only the trimmed entries that agree with the elected sign,
       dividing by how many tasks agree.
    4. Multiply by ``scaling`` (lambda). The paper sweeps lambda in 0.8-2.5 on validation data;
       the default 1.0 (no validation) is not a value the paper verifies.
    """
    _check_deltas(deltas, "ties")
    _check_fraction("density", density, "ties")
    trimmed = _trim(_stack(deltas), density, magnitude_thresholds)
    merged = _disjoint_mean(trimmed, _elect_signs(trimmed))
    return (scaling * merged).to(deltas[0].dtype)


@register_merge_method("dare", paper=DARE_PAPER)
def dare(
    deltas: Sequence[Tensor],
    *,
    drop_rate: float = 0.1,
    combine: str = "sum",
    scaling: float = 1.0,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE, Drop And REscale (Yu et al., 2024, arXiv:2311.03099).

    Per task and tensor: ``m ~ Bernoulli(drop_rate)``, ``tau~ = tau * (1 - m) / (1 - drop_rate)``;
    then combine the rescaled updates by ``"sum"`` (task arithmetic), ``"mean"`` or ``"ties"``
    (sign election + disjoint mean, no further trim), times ``scaling``. The default drop rate
    0.1 is the MergeLM command-line default; the paper drops up to 0.9 (0.99) of SFT deltas and
    uses 0.2 to merge WizardLM with WizardMath. (Older peft ``random_pruning`` forgot the
    rescale; it is applied here.)

    Randomness comes from ``generator`` if given (it advances), else from a fresh generator
    seeded with ``seed``: the same seed gives the same result; ``seed=None`` draws a random one.
    """
    _check_deltas(deltas, "dare")
    _check_fraction("drop_rate", drop_rate, "dare", upper_open=True)
    if generator is None:
        generator = seeded_generator(seed)
    stacked = torch.stack([dare_drop(d, drop_rate, generator) for d in deltas])
    merged = _combine(stacked, combine, "dare", _COMBINES)
    return (scaling * merged).to(deltas[0].dtype)


@register_merge_method("breadcrumbs", paper=BREADCRUMBS_PAPER)
def breadcrumbs(
    deltas: Sequence[Tensor],
    *,
    drop_top: float = 0.006,
    drop_bottom: float = 0.844,
    scaling: float = 0.2,
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, 2023, arXiv:2312.06795).

    Per task and per tensor (layer): zero the ``drop_top`` fraction of largest ``|tau|``
    (outliers, the paper's beta) and the ``drop_bottom`` fraction of smallest (the paper's
    gamma), keep the middle ``1 - drop_top - drop_bottom``; then ``scaling * sum`` (alpha).

    Defaults are the official code's: remove the top 0.006, keep 0.15 (so drop the bottom
    0.844), alpha 0.2 (search ranges: keep 0.05-0.2, top 0.001-0.01, alpha 0.01-1). mergekit's
    ``density=0.9, gamma=0.01`` is ``drop_top=0.01, drop_bottom=0.09`` here.

    Deviation from the official code, following the paper: the masks are computed over the
    whole tensor (layer-wise), not per row via ``topk`` on the last dimension.
    """
    _check_deltas(deltas, "breadcrumbs")
    _check_fraction("drop_top", drop_top, "breadcrumbs")
    _check_fraction("drop_bottom", drop_bottom, "breadcrumbs")
    if drop_top + drop_bottom > 1.0 + 1e-12:
        raise ConfigError(
            f"merge method 'breadcrumbs': drop_top + drop_bottom must be <= 1, got "
            f"{drop_top} + {drop_bottom}"
        )
    stacked = _stack(deltas)
    masked = torch.stack([row * breadcrumbs_mask(row, drop_top, drop_bottom) for row in stacked])
    return (scaling * masked.sum(dim=0)).to(deltas[0].dtype)


@register_merge_method("magnitude_prune", paper=MAGNITUDE_PRUNE_PAPER, trim_scope="tensor")
def magnitude_prune(
    deltas: Sequence[Tensor],
    *,
    density: float = 0.2,
    combine: str = "sum",
    scaling: float = 1.0,
    magnitude_thresholds: Sequence[float] | None = None,
) -> Tensor:
    """Keep each task's ``density`` largest ``|tau|`` (as TIES' trim step), then ``scaling``
    times their ``"sum"`` or ``"mean"``. No sign election: conflicting entries are added.

    ``magnitude_thresholds`` (one per task) replaces the per-tensor count, see :func:`ties`.
    """
    _check_deltas(deltas, "magnitude_prune")
    _check_fraction("density", density, "magnitude_prune")
    trimmed = _trim(_stack(deltas), density, magnitude_thresholds)
    merged = _combine(trimmed, combine, "magnitude_prune", ("sum", "mean"))
    return (scaling * merged).to(deltas[0].dtype)


# --------------------------------------------------------------------------------------------
# Whole state dicts
# --------------------------------------------------------------------------------------------


def _check_same_keys(deltas_per_task: Sequence[Mapping[str, Tensor]]) -> list[str]:
    if not deltas_per_task:
        raise ConfigError("merge_state: no task updates to merge")
    keys = list(deltas_per_task[0])
    first = set(keys)
    for i, state in enumerate(deltas_per_task[1:], start=1):
        for key in keys:
            if key not in state:
                raise ConfigError(
                    f"merge_state: task {i}'s update has no tensor {key!r}, which task 0's has; "
                    "merge updates of the same modules (same target_modules and layers)"
                )
        for key in state:
            if key not in first:
                raise ConfigError(
                    f"merge_state: task {i}'s update has tensor {key!r}, which task 0's lacks; "
                    "merge updates of the same modules (same target_modules and layers)"
                )
    return keys


def merge_state(
    deltas_per_task: Sequence[Mapping[str, Tensor]],
    method: str | MergeMethod,
    *,
    trim_scope: str | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """Merge per-task state dicts of updates tensor by tensor with ``method``.

    All tasks must have the same keys (the error names the first key that differs) and shapes.
    ``options`` go to the method (see ``get_merge_method(method).defaults``).

    ``trim_scope`` (only for methods that trim by magnitude: ``ties``, ``magnitude_prune``):
    ``"global"`` keeps each task's ``density`` largest entries over its whole flattened update,
    as the TIES paper does; ``"tensor"`` keeps them within every tensor, as peft's ``ties()``
    does. The default is the method's own (``global`` for TIES).

    ``dare`` uses one generator (from ``seed`` or the given ``generator``) across tensors, in
    task 0's key order, so the whole merge is reproducible.
    """
    m = get_merge_method(method)
    m.check_options(options)
    keys = _check_same_keys(deltas_per_task)
    for key in keys:
        _check_deltas([state[key] for state in deltas_per_task], f"merge_state: tensor {key!r}")

    if trim_scope is not None and m.trim_scope is None:
        raise ConfigError(f"merge method {m.name!r} does not trim by magnitude; drop trim_scope")
    scope = trim_scope or m.trim_scope
    if scope not in (None, "global", "tensor"):
        raise ConfigError(f"trim_scope must be 'global' or 'tensor', got {scope!r}")
    if scope == "global" and options.get("magnitude_thresholds") is None:
        density = options.get("density", m.defaults["density"])
        _check_fraction("density", density, m.name)
        options["magnitude_thresholds"] = [
            global_magnitude_threshold(state, density) for state in deltas_per_task
        ]

    if m.name == "dare" and options.get("generator") is None:
        options["generator"] = seeded_generator(options.pop("seed", m.defaults["seed"]))

    return {key: m.fn([state[key] for state in deltas_per_task], **options) for key in keys}


# --------------------------------------------------------------------------------------------
# LoRA <-> dense update
# --------------------------------------------------------------------------------------------
