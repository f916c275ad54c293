"""Local stand-in for the Hub `recall` metric (scikit-learn `recall_score`)."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np
from sklearn.metrics import recall_score

_DESCRIPTION = "Recall: the fraction of positive references that are found, TP / (TP + FN)."
_CITATION = "Pedregosa et al., Scikit-learn: Machine Learning in Python, JMLR 12, 2011."
_INPUTS = """predictions (list of int), references (list of int); config "multilabel" takes lists of lists.
labels, pos_label (default 1), average ("binary" default, "micro", "macro", "weighted", "samples" or None),
sample_weight, zero_division: as in scikit-learn.
Returns {"recall": float}, or {"recall": array of per-class scores} when average=None."""


class Recall(evaluate.Metric):
    """Recall with the Hub module's features, kwargs and output key."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int32")),
                    "references": datasets.Sequence(datasets.Value("int32")),
                }
                if self.config_name == "multilabel"
                else {
                    "predictions": datasets.Value("int32"),
                    "references": datasets.Value("int32"),
                }
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.recall_score.html"],
        )

    def _compute(
        self,
        predictions: Sequence,
        references: Sequence,
        labels: Sequence[int] | None = None,
        pos_label: int = 1,
        average: str | None = "binary",
        sample_weight: Sequence[float] | None = None,
        zero_division: str | float = "warn",
    ) -> dict[str, float | np.ndarray]:
        score = recall_score(
            references,
            predictions,
            labels=labels,
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
        # A plain float for one score, the per-class array otherwise (as the Hub module). np.size because
        # recent scikit-learn (1.9 here) returns a Python float, not a NumPy scalar, for averaged scores.
        return {"recall": float(score) if np.size(score) == 1 else score}
