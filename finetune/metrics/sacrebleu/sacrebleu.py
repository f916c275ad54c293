"""Local stand-in for the Hub `sacrebleu` metric (corpus BLEU from the sacrebleu package)."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import sacrebleu as scb

_DESCRIPTION = "SacreBLEU: reproducible corpus-level BLEU (Post, 2018), score in 0..100."
_CITATION = "Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018."
_INPUTS = """predictions (list of str); references (list of str, or list of list of str, as many per prediction).
smooth_method, smooth_value, force, lowercase, tokenize, use_effective_order: as in sacrebleu.corpus_bleu.
Returns {"score", "counts", "totals", "precisions", "bp", "sys_len", "ref_len"}."""


def references_per_stream(references: Sequence[Sequence[str] | str]) -> list[list[str]]:
    """Turn per-prediction references into sacrebleu's per-stream layout (one list per reference slot)."""
    rows = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    width = len(rows[0])
    if any(len(row) != width for row in rows):
        raise ValueError("Sacrebleu requires the same number of references for each prediction")
    return [[row[i] for row in rows] for i in range(width)]


class Sacrebleu(evaluate.Metric):
    """Corpus BLEU with the Hub module's features, kwargs and output keys."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            homepage="https://github.com/mjpost/sacreBLEU",
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
            codebase_urls=["https://github.com/mjpost/sacreBLEU"],
            reference_urls=["https://github.com/mjpost/sacreBLEU"],
        )

    def _compute(
        self,
        predictions: Sequence[str],
        references: Sequence[Sequence[str] | str],
        smooth_method: str = "exp",
        smooth_value: float | None = None,
        force: bool = False,
        lowercase: bool = False,
        tokenize: str | None = None,
        use_effective_order: bool = False,
    ) -> dict[str, float | int | list]:
        output = scb.corpus_bleu(
            predictions,
            references_per_stream(references),
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            force=force,
            lowercase=lowercase,
            use_effective_order=use_effective_order,
            # None would override sacrebleu's own default tokenizer (13a), so pass it only when given.
            **({"tokenize": tokenize} if tokenize else {}),
        )
        return {
            "score": output.score,
            "counts": output.counts,
            "totals": output.totals,
            "precisions": output.precisions,
            "bp": output.bp,
            "sys_len": output.sys_len,
            "ref_len": output.ref_len,
        }
