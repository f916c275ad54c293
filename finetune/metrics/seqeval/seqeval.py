"""Local stand-in for the Hub `seqeval` metric (entity-level scores of tag sequences, PyPI `seqeval`)."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
from seqeval import scheme as _schemes
from seqeval.metrics import accuracy_score, classification_report

_DESCRIPTION = (
    "seqeval: entity-level precision, recall and F1 of sequence labelling (NER, chunking), as the CoNLL "
    "shared tasks' conlleval script counts them, per entity type and overall, plus token accuracy."
)
_CITATION = "Hiroki Nakayama, seqeval: A Python framework for sequence labeling evaluation, 2018."
_SCHEMES = ("IOB1", "IOB2", "IOE1", "IOE2", "IOBES", "BILOU")
_INPUTS = f"""predictions, references: lists of tag sequences (one list of str per sentence, e.g. ["B-PER", "I-PER", "O"]).
suffix (default False): tags are written "PER-B" rather than "B-PER".
scheme (default None): one of {", ".join(_SCHEMES)}; with mode="strict", entities must follow it.
mode (default None): None counts entities as conlleval does (an I-X after O or after another type starts
  an entity); "strict" keeps only entities that are well formed in the scheme (detected from the
  references when scheme is None).
sample_weight (default None): one weight per sentence. zero_division ("warn", 0 or 1): the value of a
  score whose denominator is 0.
Returns {{TYPE: {{"precision", "recall", "f1", "number"}} for each entity type, "overall_precision",
"overall_recall", "overall_f1" (micro averages over entities), "overall_accuracy" (share of tokens
whose tag is right)}}; "number" is the count of reference entities of that type."""


class Seqeval(evaluate.Metric):
    """seqeval with the Hub module's features, kwargs and output keys."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string", id="label"), id="sequence"),
                    "references": datasets.Sequence(datasets.Value("string", id="label"), id="sequence"),
                }
            ),
            codebase_urls=["https://github.com/chakki-works/seqeval"],
            reference_urls=["https://github.com/chakki-works/seqeval"],
        )

    def _compute(
        self,
        predictions: Sequence[Sequence[str]],
        references: Sequence[Sequence[str]],
        suffix: bool = False,
        scheme: str | None = None,
        mode: str | None = None,
        sample_weight: Sequence[float] | None = None,
        zero_division: str | int = "warn",
    ) -> dict[str, object]:
        scheme_class = None
        if scheme is not None:
            if scheme not in _SCHEMES:
                raise ValueError(f"scheme should be one of {', '.join(_SCHEMES)}, got {scheme!r}")
            scheme_class = getattr(_schemes, scheme)
        references = [list(tags) for tags in references]
        predictions = [list(tags) for tags in predictions]
        report = classification_report(
            y_true=references,
            y_pred=predictions,
            suffix=suffix,
            output_dict=True,
            scheme=scheme_class,
            mode=mode,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
        overall = report.pop("micro avg")
        report.pop("macro avg", None)
        report.pop("weighted avg", None)
        # Plain Python numbers (seqeval gives NumPy scalars), so results print and serialise as JSON.
        scores: dict[str, object] = {
            kind: {
                "precision": float(score["precision"]),
                "recall": float(score["recall"]),
                "f1": float(score["f1-score"]),
                "number": int(score["support"]),
            }
            for kind, score in report.items()
        }
        scores["overall_precision"] = float(overall["precision"])
        scores["overall_recall"] = float(overall["recall"])
        scores["overall_f1"] = float(overall["f1-score"])
        scores["overall_accuracy"] = float(accuracy_score(y_true=references, y_pred=predictions))
        return scores
