"""Local stand-in for the Hub `chrf` metric (chrF / chrF++ from the sacrebleu package)."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
from sacrebleu.metrics import CHRF

_DESCRIPTION = "chrF: character n-gram F-score (Popovic, 2015); chrF++ adds word n-grams (word_order=2). 0..100."
_CITATION = "Popovic, chrF: character n-gram F-score for automatic MT evaluation, WMT 2015."
_INPUTS = """predictions (list of str); references (list of str, or list of list of str, as many per prediction).
char_order (6), word_order (0; 2 = chrF++), beta (2), lowercase, whitespace, eps_smoothing: as in sacrebleu CHRF.
Returns {"score", "char_order", "word_order", "beta"}."""


def references_per_stream(references: Sequence[Sequence[str] | str]) -> list[list[str]]:
    """Turn per-prediction references into sacrebleu's per-stream layout (one list per reference slot)."""
    rows = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    width = len(rows[0])
    if any(len(row) != width for row in rows):
        raise ValueError("ChrF requires the same number of references for each prediction")
    return [[row[i] for row in rows] for i in range(width)]


class ChrF(evaluate.Metric):
    """Corpus chrF / chrF++ with the Hub module's features, kwargs and output keys."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            homepage="https://github.com/mjpost/sacreBLEU#chrf--chrf",
            inputs_description=_INPUTS,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence"), id="references"),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            codebase_urls=["https://github.com/mjpost/sacreBLEU#chrf--chrf"],
            reference_urls=["https://github.com/m-popovic/chrF"],
        )

    def _compute(
        self,
        predictions: Sequence[str],
        references: Sequence[Sequence[str] | str],
        char_order: int = CHRF.CHAR_ORDER,
        word_order: int = CHRF.WORD_ORDER,
        beta: int = CHRF.BETA,
        lowercase: bool = False,
        whitespace: bool = False,
        eps_smoothing: bool = False,
    ) -> dict[str, float | int]:
        scorer = CHRF(char_order, word_order, beta, lowercase, whitespace, eps_smoothing)
        output = scorer.corpus_score(predictions, references_per_stream(references))
        return {
            "score": output.score,
            "char_order": output.char_order,
            "word_order": output.word_order,
            "beta": output.beta,
        }
