"""Predict with a finished run: label, the task(s) chosen and a confidence for each input row.

    from conpet.predict import predict
    rows = [Row(text="The ship steamed off into the Pacific.", label="?", entity="steamed")]
    for p in predict("runs/dynamic", rows): print(p["label"], p["tasks"], p["confidence"])

Works for every learner: it rebuilds the learner from the run's ``config.yaml`` and
``stream.json`` and loads its modules after the last task (``Learner.restore``). Nothing from
the training data is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from conpet.config import load_config
from conpet.data.stream import Row, Stream, Task
from conpet.errors import ConpetError
from conpet.pet.base import check_binding
from conpet.runs import read_json, seed_dir


def load_run_stream(run_dir: Path, rows: list[Row]) -> Stream:
    meta = read_json(run_dir / "stream.json")
    tasks = [Task(name=t["name"], labels=tuple(t["labels"])) for t in meta["tasks"]]
    return Stream(name=meta["name"], kind=meta["kind"], rows=rows, tasks=tasks)


def finished_run(run_dir: str | Path, seed: int | None) -> tuple:
    """``(config, seed, task names, seed folder)`` of a run whose last task has finished; a clear
    error otherwise (shared by predict, merge, compress and export)."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "stream.json"):
        if not (run_dir / name).is_file():
            raise ConpetError(f"{run_dir}: not a conpet run directory (no {name})")
    cfg = load_config(str(run_dir / "config.yaml"))
    seed = cfg.seed if seed is None else seed
    tasks = [t["name"] for t in read_json(run_dir / "stream.json")["tasks"]]
    sdir = seed_dir(run_dir, seed)
    if not (sdir / "adapters" / tasks[-1]).is_dir():
        raise ConpetError(f"{sdir}: the run has not finished its last task ({tasks[-1]})")
    return cfg, seed, tasks, sdir


@torch.no_grad()
def predict(run_dir: str | Path, rows: list[Row], seed: int | None = None, batch_size: int = 64) -> list[dict]:
    """Predict every row with the run's final modules (seed: the run's first seed by default)."""
    from conpet.backbone import cast_frozen_linears, load_backbone
    from conpet.engine import FeatureEngine
    from conpet.inputs import encode_rows
    from conpet.learners import Context, get_learner
    from conpet.learners.loop import autocast, resolve_precision
    from conpet.pet import get_pet

    run_dir = Path(run_dir)
    cfg, seed, _, sdir = finished_run(run_dir, seed)
    stream = load_run_stream(run_dir, rows)
    backbone = load_backbone(cfg.model)
    for meta in sorted((sdir / "adapters").glob("*/conpet.json")):  # every module must match this base
        check_binding(meta.parent, backbone.fingerprint, str(backbone.path))
    precision = resolve_precision(cfg.train.precision)
    if precision == "bf16":
        cast_frozen_linears(backbone.model)
    encoded = encode_rows(rows, stream.kind, backbone.tokenizer, backbone.is_decoder, cfg.train.max_length)
    engine = FeatureEngine(backbone, encoded, cfg.train.top_layers, precision, batch_size,
                           pet_method=cfg.pet.method)
    pet = get_pet(cfg.pet.method, engine.pet_options(cfg.pet.method, cfg.pet.options))
    pet.bf16_autocast = precision == "bf16"
    ctx = Context(cfg=cfg, stream=stream, backbone=backbone, encoded=encoded, pet=pet, seed=seed,
                  precision=precision, progress=False, engine=engine)
    learner = get_learner(cfg.learner)(ctx)
    learner.restore(sdir)
    task_names = [t.name for t in stream.tasks]
    out = []
    for start in range(0, len(rows), batch_size):
        indices = list(range(start, min(start + batch_size, len(rows))))
        with autocast(precision):
            logits = learner.logits(indices).float()
        probs = torch.softmax(logits, dim=-1)
        selection = getattr(learner, "last_selection", None)
        for r, i in enumerate(indices):
            k = int(probs[r].argmax())
            label = stream.labels[k]
            item = {"text": rows[i].text, "label": label, "probability": float(probs[r, k])}
            if selection is not None:
                top, sel = selection
                item["tasks"] = [task_names[int(t)] for t in top[r]]
                item["selector_confidence"] = [float(sel[r, int(t)]) for t in top[r]]
            else:
                item["tasks"] = [task_names[stream.task_of_label[label]]]
            item["confidence"] = item.get("selector_confidence", [item["probability"]])[0]
            out.append(item)
    learner.close()
    return out
