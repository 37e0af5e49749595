"""ContinualModel beyond the learner matrix: a backbone the user already holds, bad inputs."""

from __future__ import annotations

import pytest

from conpet.cli import main
from conpet.errors import ConpetError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_encoder):
    from conftest import write_typing_data

    root = tmp_path_factory.mktemp("model")
    data, tasks = write_typing_data(root / "data")
    out = root / "run"
    assert main(["run", "--model", str(tiny_encoder), "--data", str(data), "--tasks", str(tasks), "--learner",
                 "dynamic", "--epochs", "2", "--batch-size", "4", "--no-progress", "--out", str(out)]) == 0
    return out


ROWS = [{"text": f"Yesterday we talked about the {w} for a while.", "entity": w} for w in ("wolf", "soup", "saw")]


def test_a_backbone_already_in_memory_answers_as_the_one_loaded_from_the_run(run_dir, tiny_encoder):
    from transformers import AutoModel, AutoTokenizer

    from conpet import ContinualModel

    loaded = ContinualModel.from_run(run_dir)
    expected = [p.to_dict() for p in loaded.predict(ROWS)]
    loaded.close()
    held = ContinualModel.from_run(run_dir, model=AutoModel.from_pretrained(tiny_encoder),
                                   tokenizer=AutoTokenizer.from_pretrained(tiny_encoder))
    try:
        assert [p.to_dict() for p in held.predict(ROWS)] == expected
    finally:
        held.close()
    with pytest.raises(ConpetError, match="give both model= and tokenizer="):
        ContinualModel.from_run(run_dir, model=AutoModel.from_pretrained(tiny_encoder))


def test_bad_inputs_are_one_clear_error(run_dir):
    from conpet import ContinualModel

    model = ContinualModel.from_run(run_dir)
    try:
        with pytest.raises(ConpetError, match="the typing template needs field 'entity'"):
            model.predict(["We saw the wolf."])
        with pytest.raises(ConpetError, match="unknown field"):
            model.predict([{"text": "We saw the wolf.", "entity": "wolf", "colour": "red"}])
        with pytest.raises(ConpetError, match="unknown task 'task-09'"):
            model.predict(ROWS, task="task-09")
        with pytest.raises(ConpetError, match="this run classifies"):
            model.generate(["hello"])
        with pytest.raises(ConpetError, match="at least one input"):
            model.predict([])
    finally:
        model.close()
    with pytest.raises(ConpetError, match="not a conpet run directory"):
        ContinualModel.from_run(run_dir / "seed-0")
