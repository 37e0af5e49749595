"""Every PET method behind one interface (:class:`PETMethod`), chosen by name.

One file per method in this folder; adding a method is one file (registered with
``@register_pet``), its import below and its rows in ``tests/test_pet_zoo.py``.
"""

from typing import Any

from conpet.errors import ConfigError, choices_hint
from conpet.pet import (adalora, adapter, bitfit, cofitune, compacter, corda, dept, hft, ia3, lisa,  # noqa: F401
                        ln_tuning, lora, mola, mos, osf, p_tuning, parallel_adapter, prefix_tuning, prompt_tuning,
                        sparse_ft)
from conpet.pet.base import PET_METHODS, LayerScope, PETMethod, register_pet


def get_pet_class(method: str) -> type[PETMethod]:
    if method not in PET_METHODS:
        raise ConfigError(f"pet.method: unknown PET method '{method}'{choices_hint(method, PET_METHODS)}")
    return PET_METHODS[method]


def get_pet(method: str, options: dict[str, Any] | None = None, *, scope: LayerScope | None = None,
            precision: str = "fp32") -> PETMethod:
    """Build PET method ``method``; its options are checked here (a :class:`ConfigError` names a
    misspelt or bad one)."""
    return get_pet_class(method)(options, scope=scope, precision=precision)


__all__ = ["PETMethod", "PET_METHODS", "LayerScope", "get_pet", "get_pet_class", "register_pet"]
