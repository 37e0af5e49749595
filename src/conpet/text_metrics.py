"""Metrics of generated answers against references: pure functions, one number in [0, 1] each.

- :func:`exact_match` and :func:`token_f1` after SQuAD's normalisation (lower case, punctuation
  and English articles removed, whitespace collapsed);
- :func:`rouge_l` (F-measure of the longest common subsequence, Google's ``rouge-score`` package,
  with its tokenizer and Porter stemming off);
- :func:`chrf` (character n-gram F-score, ``sacrebleu``'s chrF, scaled to [0, 1]).

:func:`score` averages one metric over pairs; :func:`primary_metric` picks a task's metric.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall of the normalised texts (1 when both are empty)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def chrf(prediction: str, reference: str) -> float:
    from sacrebleu.metrics import CHRF

    return float(CHRF().sentence_score(prediction, [reference]).score) / 100.0


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match, "f1": token_f1, "rouge_l": rouge_l, "chrf": chrf,
}


def score(metric: str, predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean of ``metric`` over (prediction, reference) pairs; a reference may be several
    acceptable answers, of which the best match counts (as SQuAD does)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no references to score")
    fn = METRICS[metric]
    return sum(max(fn(p, r) for r in ([ref] if isinstance(ref, str) else ref))
               for p, ref in zip(predictions, references)) / len(references)


SHORT_ANSWER_WORDS = 3


REPORTED = ("exact_match", "chrf")
"""Metrics recorded for every generative task beside its primary one (``score_<metric>`` matrices)."""


def primary_metric(setting: str, references: Sequence[str], recommended: str | None = None) -> str:
    """``setting`` (``data.metric``) unless ``auto``; then the stream's ``recommended`` metric
    (a built-in benchmark's), else exact match when every reference of the task has at most 3
    words (names, words, labels), else ROUGE-L."""
    if setting != "auto":
        return setting
    if recommended:
        return recommended
    return "exact_match" if all(len(r.split()) <= SHORT_ANSWER_WORDS for r in references) else "rouge_l"
