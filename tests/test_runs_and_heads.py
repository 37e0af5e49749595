import os

import pytest
import torch

from conpet.heads import GrowingHead
from conpet.runs import atomic_directory, atomic_write_json, read_json


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    atomic_write_json(tmp_path / "m.json", {"a": 2})
    assert read_json(tmp_path / "m.json") == {"a": 2}
    assert os.listdir(tmp_path) == ["m.json"]


def test_failed_directory_write_keeps_the_old_version(tmp_path):
    target = tmp_path / "adapters" / "task-01"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("half-written")
            raise RuntimeError("killed")
    assert (target / "weights").read_text() == "v1"
    assert sorted(os.listdir(target.parent)) == ["task-01"]


def test_head_grows_without_touching_old_columns(tmp_path):
    head = GrowingHead(8)
    head.grow(["a", "b"], torch.Generator().manual_seed(0))
    before = head.weight.detach().clone()
    head.grow(["b", "c"], torch.Generator().manual_seed(1))
    assert head.labels == ["a", "b", "c"]
    assert torch.equal(head.weight[:2], before)
    assert head(torch.randn(3, 8)).shape == (3, 3)
    head.save(tmp_path)
    loaded = GrowingHead.load(tmp_path)
    assert loaded.labels == head.labels and torch.equal(loaded.weight, head.weight)
