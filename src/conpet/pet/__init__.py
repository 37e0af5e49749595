"""Every PET method behind one interface (:class:`PETMethod`), chosen by name."""

from conpet.pet.base import PET_METHODS, PETMethod, get_pet, register_pet
from conpet.pet import dept, injected, peft_methods  # noqa: F401  (registers the methods)

__all__ = ["PETMethod", "PET_METHODS", "get_pet", "register_pet"]
