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

from conpet.build import build_learner, keeps_torch_threads, prepare
from conpet.data.stream import Row, Stream, Task
from conpet.runs import adapter_dir, check_binding, finished_run, read_json


def load_run_stream(run_dir: Path, rows: list[Row]) -> Stream:
    """The run's tasks and labels (``stream.json``) over the rows to predict."""
    meta = read_json(run_dir / "stream.json")
    tasks = [Task(name=t["name"], labels=tuple(t["labels"])) for t in meta["tasks"]]
    return Stream(name=meta["name"], kind=meta["kind"], rows=rows, tasks=tasks)


@keeps_torch_threads
@torch.no_grad()
def predict(run_dir: str | Path, rows: list[Row], seed: int | None = None, batch_size: int = 64,
            device: str | None = None) -> list[dict]:
    """Predict every row with the run's final modules (seed: the run's first seed by default) on
    ``device`` (default: the run's ``train.device``; a run trained on a GPU predicts on a CPU with
    ``device="cpu"``). A generative run answers each row's prompt (``text``): ``{"prompt",
    "answer", "tasks"}`` (the module that answered has learned every task in ``tasks``)."""
    run_dir = Path(run_dir)
    cfg, seed, task_names, _ = finished_run(run_dir, seed)
    cfg.train.eval_batch_size = batch_size
    if device is not None:
        cfg.train.device = device
    prepared = prepare(cfg, load_run_stream(run_dir, rows))
    stream, engine = prepared
    for task in task_names:  # every module must match this base
        check_binding(adapter_dir(run_dir, seed, task), engine.backbone.fingerprint, str(engine.backbone.path))
    learner = build_learner(cfg, prepared, seed)
    try:
        learner.restore(run_dir, seed)
        if stream.generative:
            out = []
            for start in range(0, len(rows), batch_size):
                indices = list(range(start, min(start + batch_size, len(rows))))
                answers, route = learner.generate_and_route(indices)
                for r, (i, answer) in enumerate(zip(indices, answers)):
                    item = {"prompt": rows[i].text, "answer": answer, "tasks": task_names}
                    if route is not None:  # a learner that routes: the module that answered
                        task = int(route.tasks[r, 0])
                        item["tasks"] = [task_names[task]]
                        item["selector_confidence"] = [float(route.confidence[r, task])]
                    out.append(item)
            return out
        out = []
        for start in range(0, len(rows), batch_size):
            indices = list(range(start, min(start + batch_size, len(rows))))
            with engine.compute.autocast():
                logits, route = learner.logits_and_route(indices)
            probs = torch.softmax(logits.float(), dim=-1).cpu()
            for r, i in enumerate(indices):
                k = int(probs[r].argmax())
                label = stream.labels[k]
                item = {"text": rows[i].text, "label": label, "probability": float(probs[r, k])}
                if route is not None:
                    item["tasks"] = [task_names[int(t)] for t in route.tasks[r]]
                    item["selector_confidence"] = [float(route.confidence[r, int(t)]) for t in route.tasks[r]]
                else:
                    item["tasks"] = [task_names[t] for t, task in enumerate(stream.tasks) if label in task.labels]
                item["confidence"] = item.get("selector_confidence", [item["probability"]])[0]
                out.append(item)
    finally:
        learner.close()
    return out
