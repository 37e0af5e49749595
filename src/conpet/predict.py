"""Predict with a run (``conpet predict``): a thin layer over :class:`conpet.model.ContinualModel`.

    from conpet.predict import predict
    for p in predict("runs/dynamic", [{"text": "The ship steamed off.", "entity": "steamed"}]):
        print(p["label"], p["task"], p["confidence"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from conpet.data.stream import Row
from conpet.model import ContinualModel


def predict(run_dir: str | Path, rows: Sequence[str | Mapping[str, Any] | Row], seed: int | None = None,
            batch_size: int | None = None, device: str | None = None, task: str | None = None) -> list[dict]:
    """Answer every row with the run's modules after its last finished task (seed: the run's first
    by default) on ``device`` (default: the run's ``train.device``). Classification: ``{"text",
    "label", "score", "task", "confidence"}`` (:class:`conpet.model.Prediction`); a generative run
    answers each row's prompt: ``{"prompt", "text", "task", ...}`` (:class:`conpet.model.Generation`).
    ``task``: ``None``/``"auto"`` (the run's routing) or a task's name."""
    model = ContinualModel.from_run(run_dir, seed=seed, device=device, batch_size=batch_size)
    try:
        if model.generative:
            prompts = [r.text if isinstance(r, Row) else r["text"] if isinstance(r, Mapping) else r for r in rows]
            return [g.to_dict() for g in model.generate(prompts, task=task)]
        return [p.to_dict() for p in model.predict(rows, task=task)]
    finally:
        model.close()
