"""Declared learner state (``state_attrs``): packed to tensors + JSON and back, in place where it can."""

from __future__ import annotations

import json

import pytest
import torch

from conpet.errors import ConpetError
from conpet.learners.state import pack, unpack


class Inner:
    state_attrs = ("n", "stack")

    def __init__(self) -> None:
        self.n = 1
        self.stack = [torch.zeros(2, 3)]


class Holder:
    state_attrs = ("step", "rows", "anchor", "bases", "inner", "gone", "weight")

    def __init__(self) -> None:
        self.step = 0
        self.rows = {"animal": [1, 2]}
        self.anchor: list[torch.Tensor] = []
        self.bases: dict[str, torch.Tensor] = {}
        self.inner: Inner | None = Inner()
        self.gone: Inner | None = None
        self.weight = torch.nn.Parameter(torch.zeros(4))


def test_declared_state_round_trips_through_tensors_and_json():
    a = Holder()
    a.step, a.rows = 7, {"animal": [3], "food": [4, 5]}
    a.anchor = [torch.randn(3), torch.randn(2, 2)]
    a.bases = {"layers.0.q": torch.randn(5, 2)}
    a.inner.n, a.inner.stack = 3, [torch.randn(2, 3), torch.randn(2, 5)]
    with torch.no_grad():
        a.weight.copy_(torch.arange(4.0))
    tensors, meta = pack(a, "declared/")
    meta = json.loads(json.dumps(meta))  # what a checkpoint's JSON gives back
    assert set(tensors) == {"declared/anchor/0", "declared/anchor/1", "declared/bases/layers.0.q",
                            "declared/inner/stack/0", "declared/inner/stack/1", "declared/weight"}
    b = Holder()
    weight = b.weight
    unpack(b, {k: v.clone() for k, v in tensors.items()}, meta, "declared/")
    assert b.step == 7 and b.rows == {"animal": [3], "food": [4, 5]} and b.gone is None
    assert all(torch.equal(x, y) for x, y in zip(b.anchor, a.anchor)) and len(b.anchor) == 2
    assert torch.equal(b.bases["layers.0.q"], a.bases["layers.0.q"])
    assert b.inner.n == 3 and [s.shape for s in b.inner.stack] == [(2, 3), (2, 5)]
    assert b.weight is weight and torch.equal(weight, torch.arange(4.0))  # in place: an optimizer keeps it


def test_an_object_saved_must_exist_when_loaded_and_other_values_must_be_json():
    a = Holder()
    tensors, meta = pack(a)
    b = Holder()
    b.inner = None
    with pytest.raises(RuntimeError, match="'inner' of Holder was saved but does not exist now"):
        unpack(b, tensors, meta)
    a.step = object()
    with pytest.raises(TypeError):
        pack(a)


def test_a_checkpoint_without_a_declared_attribute_is_a_clear_error():
    tensors, meta = pack(Holder())
    del meta["step"]
    with pytest.raises(ConpetError, match="the checkpoint has no 'step' of Holder .* run it again"):
        unpack(Holder(), tensors, meta)
