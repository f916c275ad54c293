"""Local stand-in for the Hub `precision` metric (scikit-learn `precision_score`)."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np
from sklearn.metrics import precision_score

_DESCRIPTION = "Precision: the fraction of positive predictions that are correct, TP / (TP + FP)."
_CITATION = "Pedregosa et al., Scikit-learn: Machine Learning in Python, JMLR 12, 2011."
_INPUTS = """predictions (list of int), references (list of int); config "multilabel" takes lists of lists.
labels, pos_label (default 1), average ("binary" default, "micro", "macro", "weighted", "samples" or None),
sample_weight, zero_division: as in scikit-learn.
Returns {"precision": float}, or {"precision": array of per-class scores} when average=None."""


class Precision(evaluate.Metric):
    """Precision with the Hub module's features, kwargs and output key."""

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
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.precision_score.html"],
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
        score = precision_score(
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
        return {"precision": float(score) if np.size(score) == 1 else score}
