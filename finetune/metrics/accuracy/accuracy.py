"""Local stand-in for the Hub `accuracy` metric (scikit-learn `accuracy_score`)."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_DESCRIPTION = "Accuracy: the proportion of correct predictions, (TP + TN) / (TP + TN + FP + FN)."
_CITATION = "Pedregosa et al., Scikit-learn: Machine Learning in Python, JMLR 12, 2011."
_INPUTS = """predictions (list of int), references (list of int); config "multilabel" takes lists of lists.
normalize (bool, default True): fraction if True, else the count of correct predictions.
sample_weight (list of float, optional). Returns {"accuracy": float}."""


class Accuracy(evaluate.Metric):
    """Accuracy with the Hub module's features, kwargs and output key."""

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
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(
        self,
        predictions: Sequence,
        references: Sequence,
        normalize: bool = True,
        sample_weight: Sequence[float] | None = None,
    ) -> dict[str, float]:
        score = accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight)
        return {"accuracy": float(score)}
