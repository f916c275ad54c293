"""Local stand-in for the Hub `rouge` metric (Google's rouge_score package)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import datasets
import evaluate
from rouge_score import rouge_scorer, scoring

_DESCRIPTION = "ROUGE: n-gram (rouge1, rouge2) and longest-common-subsequence (rougeL, rougeLsum) F-measures, in 0..1."
_CITATION = "Lin, ROUGE: A Package for Automatic Evaluation of Summaries, ACL Workshop 2004."
_INPUTS = """predictions (list of str); references (list of str, or list of list of str for several references).
rouge_types (default rouge1, rouge2, rougeL, rougeLsum), use_aggregator (True), use_stemmer (False),
tokenizer (callable str -> list of str, optional).
Returns {rouge_type: F-measure}, or {rouge_type: list of per-example F-measures} when use_aggregator=False."""


class _CallableTokenizer:
    """Adapts a plain callable to the `.tokenize` interface rouge_score expects."""

    def __init__(self, tokenize: Callable[[str], list[str]]) -> None:
        self.tokenize = tokenize


class Rouge(evaluate.Metric):
    """ROUGE with the Hub module's features, kwargs and output keys."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence")),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://en.wikipedia.org/wiki/ROUGE_(metric)"],
        )

    def _compute(
        self,
        predictions: Sequence[str],
        references: Sequence[Sequence[str] | str],
        rouge_types: Sequence[str] | None = None,
        use_aggregator: bool = True,
        use_stemmer: bool = False,
        tokenizer: Callable[[str], list[str]] | None = None,
    ) -> dict[str, float | list[float]]:
        rouge_types = list(rouge_types or ("rouge1", "rouge2", "rougeL", "rougeLsum"))
        scorer = rouge_scorer.RougeScorer(
            rouge_types=rouge_types,
            use_stemmer=use_stemmer,
            tokenizer=_CallableTokenizer(tokenizer) if tokenizer is not None else None,
        )
        scores = [
            scorer.score(ref, pred) if isinstance(ref, str) else scorer.score_multi(ref, pred)
            for ref, pred in zip(references, predictions)
        ]
        if not use_aggregator:
            return {key: [float(s[key].fmeasure) for s in scores] for key in rouge_types}
        # Like the Hub module: bootstrap aggregation, reporting the mid (median) F-measure.
        aggregator = scoring.BootstrapAggregator()
        for score in scores:
            aggregator.add_scores(score)
        return {key: float(interval.mid.fmeasure) for key, interval in aggregator.aggregate().items()}
