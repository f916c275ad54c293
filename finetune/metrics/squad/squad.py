"""Local stand-in for the Hub `squad` metric (official SQuAD v1.1 evaluation)."""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import datasets
import evaluate

_DESCRIPTION = "SQuAD v1.1: exact match and token F1 of predicted answer spans, each in 0..100."
_CITATION = "Rajpurkar et al., SQuAD: 100,000+ Questions for Machine Comprehension of Text, EMNLP 2016."
_INPUTS = """predictions: list of {"id": str, "prediction_text": str}.
references: list of {"id": str, "answers": {"text": list of str, "answer_start": list of int}}.
Returns {"exact_match": float, "f1": float}, both in 0..100."""

logger = logging.getLogger(__name__)

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation and articles, collapse whitespace (official SQuAD normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Bag-of-tokens F1 between the normalised prediction and ground truth."""
    prediction_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(ground_truth).split()
    num_same = sum((Counter(prediction_tokens) & Counter(truth_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def _best_over_truths(fn: Callable[[str, str], float], prediction: str, truths: Sequence[str]) -> float:
    return max((fn(prediction, truth) for truth in truths), default=0.0)


class Squad(evaluate.Metric):
    """SQuAD v1.1 exact match / F1 with the Hub module's features and output keys."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")},
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": datasets.features.Sequence(
                            {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}
                        ),
                    },
                }
            ),
            codebase_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
            reference_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
        )

    def _compute(
        self, predictions: Sequence[dict[str, Any]], references: Sequence[dict[str, Any]]
    ) -> dict[str, float]:
        predicted = {p["id"]: p["prediction_text"] for p in predictions}
        exact_match = f1 = 0.0
        for ref in references:
            if ref["id"] not in predicted:
                # As in the official script: an unanswered question counts in the total and scores 0.
                logger.warning("Unanswered question %s will receive score 0.", ref["id"])
                continue
            truths = ref["answers"]["text"]
            exact_match += _best_over_truths(exact_match_score, predicted[ref["id"]], truths)
            f1 += _best_over_truths(f1_score, predicted[ref["id"]], truths)
        total = len(references)
        return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}
