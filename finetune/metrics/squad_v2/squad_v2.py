"""Local stand-in for the Hub `squad_v2` metric (official SQuAD v2.0 evaluation)."""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import datasets
import evaluate

_DESCRIPTION = "SQuAD v2.0: exact match and token F1 with unanswerable questions, in 0..100."
_CITATION = "Rajpurkar et al., Know What You Don't Know: Unanswerable Questions for SQuAD, ACL 2018."
_INPUTS = """predictions: list of {"id": str, "prediction_text": str ("" = no answer), "no_answer_probability": float}.
references: list of {"id": str, "answers": {"text": list of str, "answer_start": list of int}}; no text = unanswerable.
no_answer_threshold (float, default 1.0): a prediction whose no_answer_probability exceeds it counts as "no answer".
Returns exact, f1, total, HasAns_*/NoAns_* (when such questions exist), best_exact(_thresh), best_f1(_thresh)."""

logger = logging.getLogger(__name__)

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation and articles, collapse whitespace (official SQuAD normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def compute_exact(gold: str, prediction: str) -> int:
    """1 when the normalised strings are equal, else 0."""
    return int(normalize_answer(gold) == normalize_answer(prediction))


def compute_f1(gold: str, prediction: str) -> float:
    """Bag-of-tokens F1; an empty side (no answer) scores 1 only when both are empty."""
    gold_tokens = normalize_answer(gold).split()
    pred_tokens = normalize_answer(prediction).split()
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    num_same = sum((Counter(gold_tokens) & Counter(pred_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _raw_scores(
    references: Sequence[dict[str, Any]], predicted: dict[str, str]
) -> tuple[dict[str, float], dict[str, float]]:
    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    for ref in references:
        qid = ref["id"]
        # For unanswerable questions the only correct answer is the empty string.
        golds = [t for t in ref["answers"]["text"] if normalize_answer(t)] or [""]
        if qid not in predicted:
            logger.warning("Missing prediction for %s", qid)
            continue
        exact[qid] = max(compute_exact(g, predicted[qid]) for g in golds)
        f1[qid] = max(compute_f1(g, predicted[qid]) for g in golds)
    return exact, f1


def _apply_no_answer_threshold(
    scores: dict[str, float], na_probs: dict[str, float], has_answer: dict[str, bool], threshold: float
) -> dict[str, float]:
    return {
        qid: float(not has_answer[qid]) if na_probs[qid] > threshold else score for qid, score in scores.items()
    }


def _eval_dict(exact: dict[str, float], f1: dict[str, float], qids: Iterable[str]) -> dict[str, float]:
    qids = list(qids)
    total = len(qids)
    return {
        "exact": 100.0 * sum(exact[q] for q in qids) / total,
        "f1": 100.0 * sum(f1[q] for q in qids) / total,
        "total": total,
    }


def _best_threshold(
    predicted: dict[str, str], scores: dict[str, float], na_probs: dict[str, float], has_answer: dict[str, bool]
) -> tuple[float, float]:
    """Sweep the no-answer threshold over the sorted probabilities; return (best score, its threshold)."""
    current = best = sum(1 for v in has_answer.values() if not v)
    best_threshold = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_answer[qid]:
            current += scores[qid]
        elif predicted[qid]:
            current -= 1
        if current > best:
            best, best_threshold = current, na_probs[qid]
    return 100.0 * best / len(scores), best_threshold


class SquadV2(evaluate.Metric):
    """SQuAD v2.0 evaluation with the Hub module's features, kwargs and output keys."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": {
                        "id": datasets.Value("string"),
                        "prediction_text": datasets.Value("string"),
                        "no_answer_probability": datasets.Value("float32"),
                    },
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
        self,
        predictions: Sequence[dict[str, Any]],
        references: Sequence[dict[str, Any]],
        no_answer_threshold: float = 1.0,
    ) -> dict[str, float]:
        na_probs = {p["id"]: p["no_answer_probability"] for p in predictions}
        predicted = {p["id"]: p["prediction_text"] for p in predictions}
        has_answer = {ref["id"]: bool(ref["answers"]["text"]) for ref in references}

        exact_raw, f1_raw = _raw_scores(references, predicted)
        exact = _apply_no_answer_threshold(exact_raw, na_probs, has_answer, no_answer_threshold)
        f1 = _apply_no_answer_threshold(f1_raw, na_probs, has_answer, no_answer_threshold)

        result = _eval_dict(exact, f1, exact)
        for prefix, wanted in (("HasAns", True), ("NoAns", False)):
            qids = [q for q, v in has_answer.items() if v is wanted]
            if qids:
                result.update({f"{prefix}_{k}": v for k, v in _eval_dict(exact, f1, qids).items()})
        result["best_exact"], result["best_exact_thresh"] = _best_threshold(predicted, exact_raw, na_probs, has_answer)
        result["best_f1"], result["best_f1_thresh"] = _best_threshold(predicted, f1_raw, na_probs, has_answer)
        return result
