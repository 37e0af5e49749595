"""Evaluation after each task: accuracy of classification tasks (argmax over the seen classes, or
the task's own in the task-incremental setting) and, on generative streams, each task's primary
text metric of greedy answers (plus every reported metric on the same answers). Under a launcher
the batches are dealt out over the processes and the results gathered (:mod:`conpet.distributed`).
"""

from __future__ import annotations

import numpy as np

from conpet import distributed
from conpet import text_metrics
from conpet.config import RunConfig
from conpet.data.load import reference_text
from conpet.data.stream import Stream
from conpet.errors import ConpetError
from conpet.inputs import sorted_batches, text_chunks
from conpet.learners import Learner
from conpet.learners.loop import predict


def generate_rows(learner: Learner, rows: list[int]) -> dict[int, str]:
    """Greedy answers for ``rows`` in prompt-length-sorted batches (dealt out over processes and
    gathered under a launcher); each process gets every answer."""
    ctx = learner.ctx
    lengths = np.asarray([ctx.encoded.target_start[i] for i in rows])
    batches = sorted_batches(rows, lengths, ctx.cfg.train.eval_batch_size)
    out: dict[int, str] = {}
    for batch, keep in distributed.deal(batches):
        answers = learner.generate(batch)
        if keep:
            out.update(zip(batch, answers))
    return distributed.gather_dicts(out)


def task_metric(cfg: RunConfig, stream: Stream, j: int) -> str:
    """Task ``j``'s primary metric (``data.metric``; ``auto``: the stream's recommendation, else
    decided on its training targets)."""
    return text_metrics.primary_metric(cfg.data.metric, [stream.rows[i].target for i in stream.tasks[j].train],
                                       stream.metric)


def evaluate(learner: Learner, t: int, split: str = "test") -> tuple[list[float], list[int]]:
    """Accuracy on the ``split`` rows (test; dev for choosing settings) of every task 0..t,
    predicting over all seen classes (or only the task's classes in the task-incremental setting).
    On a generative stream: each task's primary metric (:func:`task_metric`) of greedy answers."""
    ctx = learner.ctx
    stream = ctx.stream
    if stream.generative:
        return evaluate_generation(learner, t, split)[:2]
    lengths = ctx.encoded.all_lengths
    accs, counts = [], []
    for j in range(t + 1):
        test = stream.tasks[j].split(split)
        if not test:
            raise ConpetError(f"data.report_dev: task '{stream.tasks[j].name}' has no {split} rows")
        allowed = stream.class_range(j) if ctx.cfg.data.setting == "task-incremental" else None
        batches = sorted_batches(test, lengths[test], ctx.cfg.train.eval_batch_size)
        preds = predict(learner.logits, batches, ctx.compute, allowed)
        correct = sum(preds[i] == stream.targets[i] for i in test)
        accs.append(correct / len(test))
        counts.append(len(test))
    return accs, counts


def evaluate_generation(learner: Learner, t: int, split: str = "test"
                        ) -> tuple[list[float], list[int], dict[str, list[float]]]:
    """Each task's primary metric of greedy answers on its ``split`` rows, the row counts, and
    every metric of :data:`conpet.text_metrics.REPORTED` on the same answers (``score_<metric>``)."""
    ctx = learner.ctx
    stream = ctx.stream
    scores, counts = [], []
    by_metric: dict[str, list[float]] = {f"score_{m}": [] for m in text_metrics.REPORTED}
    for j in range(t + 1):
        rows = stream.tasks[j].split(split)
        if not rows:
            raise ConpetError(f"data.report_dev: task '{stream.tasks[j].name}' has no {split} rows")
        answers = generate_rows(learner, rows)
        predictions, references = [answers[i] for i in rows], [stream.rows[i].references for i in rows]
        scores.append(text_metrics.score(task_metric(ctx.cfg, stream, j), predictions, references))
        for metric in text_metrics.REPORTED:
            by_metric[f"score_{metric}"].append(text_metrics.score(metric, predictions, references))
        counts.append(len(rows))
    return scores, counts, by_metric


def reference_chunks(learner: Learner, max_tokens: int) -> list[list[int]]:
    """The reference text (``data.reference_text``) as token chunks of at most ``max_tokens``."""
    ctx = learner.ctx
    return text_chunks(ctx.backbone.tokenizer, reference_text(ctx.cfg.data.reference_text), max_tokens)
