"""What a learner can do is declared once on its class (``conpet.learners.CAPABILITIES``) and read
by build, prediction and export; a run directory records it in ``learner.json``."""

from __future__ import annotations

import pytest

from conpet.build import check
from conpet.config import from_dict
from conpet.errors import ConfigError
from conpet.learners import LEARNERS, Learner
from conpet.learners.base import ROUTES
from conpet.pet import PET_METHODS


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_every_learner_declares_a_paper_and_consistent_capabilities(name):
    cls = LEARNERS[name]
    assert cls.paper, f"{name}: no paper"
    assert cls.routes in (None, *ROUTES)
    if cls.routes:  # routing chooses among modules, and says where each row went
        assert cls.module_per_task
        assert cls.logits_and_route is not Learner.logits_and_route
        if cls.generative:
            assert cls.generate_and_route is not Learner.generate_and_route
    assert cls.requires_pet in (None, *PET_METHODS)


def test_a_learner_built_around_a_pet_method_refuses_another_before_loading_anything():
    needing = [n for n, c in LEARNERS.items() if c.requires_pet]
    assert needing  # CoFiTune
    for name in needing:
        with pytest.raises(ConfigError, match=f"needs pet.method: {LEARNERS[name].requires_pet}"):
            check(from_dict({"learner": name, "pet": {"method": "lora"}}))

