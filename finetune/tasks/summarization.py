"""Summarization: the text -> text machinery (``finetune.tasks.text_to_text``: encoder-decoder or
decoder-only, loss on the summary only, batched length-sorted generation) for document -> summary pairs.

* encoder-decoder: the document (after T5's ``summarize: `` prefix for T5 checkpoints) is the encoder
  input, cut at ``data.max_length`` tokens.
* decoder-only: the prompt is ``data.instruction`` with the document in it, as the user turn of the
  chat template when the tokenizer has one.

Long documents: ``data.max_source_tokens`` keeps the start of each document (for papers: the abstract
and the beginning of the introduction), cut after the last whole sentence within that many tokens, so
that prompt + summary fit in ``data.max_length``.

Metrics: ROUGE-1, ROUGE-2 and ROUGE-L F-measures (0-100, the mean over examples, with Porter stemming,
through ``evaluate``'s ``rouge``) and the length ratio (words of all outputs / words of all references).
The baseline is lead-N: the first N sentences of each document, with N chosen on the validation split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from finetune.config import check
from finetune.metrics import load_metric
from finetune.tasks.text_to_text import TextToTextData, TextToTextEval, TextToTextLearned, TextToTextTask

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
LEAD_CHOICES = range(1, 6)  # lead-N baselines tried on validation
# A sentence ends at . ! or ? (then maybe a closing quote or bracket) followed by white space; also at a
# blank line (between sections). Abbreviations ("et al.") end a sentence too: a baseline can live with it.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'”’)\]])\s+|\n\s*\n")


def split_sentences(text: str) -> list[str]:
    """Sentences of a text, stripped, in order (see ``_SENTENCE_END``)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def lead(text: str, n: int) -> str:
    """The first ``n`` sentences of ``text``, joined with spaces."""
    return " ".join(split_sentences(text)[:n])


def summary_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-measures (0-100, mean over examples, Porter stemming) and ``length_ratio`` (words in all
    hypotheses / words in all references)."""
    rouge = load_metric("rouge").compute(predictions=hypotheses, references=references, rouge_types=list(ROUGE_TYPES),
                                         use_aggregator=False, use_stemmer=True)
    scores = {name: 100.0 * float(np.mean(rouge[name])) if len(hypotheses) else 0.0 for name in ROUGE_TYPES}
    reference_words = sum(len(r.split()) for r in references)
    scores["length_ratio"] = sum(len(h.split()) for h in hypotheses) / max(reference_words, 1)
    return scores


@dataclass
class SummarizationData(TextToTextData):
    """``data`` keys of the summarization task (with the text -> text ones: ``source_prefix``,
    ``use_chat_template``, ``system_prompt``)."""

    source_column: str | None = "document"
    """Column of the texts to summarize."""
    target_column: str | None = "summary"
    """Column of the reference summaries."""
    instruction: str = "Summarize the following text.\n\n{source}"
    """Decoder-only: the user turn; ``{source}`` is replaced by the document (clipped to max_source_tokens)."""
    max_source_tokens: int | None = None
    """Keep the start of each document: at most this many tokens, cut after the last whole sentence in them
    (when that keeps at least half); null keeps whole documents (cut at max_length for encoder-decoders;
    an over-long decoder prompt loses its start)."""

    def validate(self) -> None:
        super().validate()
        check(bool(self.source_column), "data.source_column", "the column of texts to summarize", self.source_column)
        check(bool(self.target_column), "data.target_column", "the column of reference summaries", self.target_column)
        check("{source}" in self.instruction, "data.instruction", "a text containing {source}", self.instruction)
        if self.max_source_tokens is not None:
            check(0 < self.max_source_tokens < self.max_length, "data.max_source_tokens",
                  f"a positive number of tokens below data.max_length ({self.max_length}), or null",
                  self.max_source_tokens)


@dataclass
class SummarizationEval(TextToTextEval):
    """``eval`` keys of the summarization task (with ``num_beams``)."""

    max_new_tokens: int = 128
    """Cap on new tokens per summary."""
    lead_sentences: int | None = None
    """The lead baseline's N (first N sentences of each document); null chooses N in 1-5 on the validation
    split (by the mean of ROUGE-1, -2 and -L)."""

    def validate(self) -> None:
        super().validate()
        check(self.lead_sentences is None or self.lead_sentences >= 1, "eval.lead_sentences", ">= 1 or null",
              self.lead_sentences)


@dataclass(frozen=True)
class SummarizationLearned(TextToTextLearned):
    """Encoder-decoder or decoder-only, and the model type."""


class SummarizationTask(TextToTextTask):
    name = "summarization"
    Data = SummarizationData
    Eval = SummarizationEval
    Learned = SummarizationLearned
    metrics_higher_is_better = {"loss": False, "rouge1": True, "rouge2": True, "rougeL": True}
    headline_metrics = ["rouge1", "rouge2", "rougeL", "length_ratio"]
    pipeline_tag = "summarization"
    output_key = "summary"
    unit = "documents"
    preview_heading = "sample summaries"
    data: SummarizationData
    eval: SummarizationEval

    # --- data ------------------------------------------------------------------------------------
    def pairs(self, dataset: datasets.Dataset, where: str) -> datasets.Dataset:
        return self.column_pairs(dataset, where)

    def describe(self, splits: datasets.DatasetDict) -> list[str]:
        lines = []
        for name, split in splits.items():
            source = np.mean([len(s.split()) for s in split["source"]]) if len(split) else 0.0
            target = np.mean([len(t.split()) for t in split["target"]]) if len(split) else 0.0
            lines.append(f"{name}: {len(split)} documents ({source:.0f} words on average; summaries {target:.0f})")
        if self.data.max_source_tokens:
            lines.append(f"documents clipped to their first {self.data.max_source_tokens} tokens "
                         f"(data.max_source_tokens), at a sentence end")
        return lines

    def clip_source(self, tokenizer: PreTrainedTokenizerBase, source: str) -> str:
        """The start of ``source``: at most ``data.max_source_tokens`` tokens, cut after the last sentence that
        ends within them when that keeps at least half of the clipped text."""
        limit = self.data.max_source_tokens
        if limit is None:
            return source
        if tokenizer.is_fast:
            encoded = tokenizer(source, add_special_tokens=False, return_offsets_mapping=True)
            if len(encoded["input_ids"]) <= limit:
                return source
            clipped = source[:encoded["offset_mapping"][limit - 1][1]]
        else:
            ids = tokenizer(source, add_special_tokens=False)["input_ids"]
            if len(ids) <= limit:
                return source
            clipped = tokenizer.decode(ids[:limit])
        ends = [m.start() for m in _SENTENCE_END.finditer(clipped)]
        if ends and ends[-1] >= len(clipped) // 2:
            clipped = clipped[:ends[-1]]
        return clipped.strip()

    def t5_prefix(self) -> str:
        return "summarize: "

    def instruction(self, source: str) -> str:
        return self.data.instruction.replace("{source}", source)

    def preview_source(self, source: str) -> str:
        return source if len(source) <= 160 else source[:160].rstrip() + " ..."

    # --- metrics and baseline --------------------------------------------------------------------
    def scores(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        return summary_scores(hypotheses, references)

    def baseline(self, train: datasets.Dataset, test: datasets.Dataset,
                 validation: datasets.Dataset | None = None) -> dict[str, Any]:
        """Lead-N: the first N sentences of each document, N from ``eval.lead_sentences`` or the best of 1-5
        on ``validation`` (on ``train`` when there is none)."""
        n, chosen_on = self.eval.lead_sentences, "eval.lead_sentences"
        if n is None:
            tune = validation if validation is not None and len(validation) else train
            chosen_on = "validation" if tune is validation else "train"
            n = choose_lead(list(tune["source"]), list(tune["target"]))
        scores = summary_scores([lead(s, n) for s in test["source"]], list(test["target"]))
        return {"name": f"lead-{n}: first {n} sentence(s) of the document, N from {chosen_on}", "lead_sentences": n,
                **scores}


def choose_lead(sources: list[str], references: list[str], choices: range = LEAD_CHOICES) -> int:
    """The N of the lead-N baseline with the best mean of ROUGE-1, -2 and -L (the smallest on ties)."""
    def quality(n: int) -> float:
        scores = summary_scores([lead(s, n) for s in sources], references)
        return float(np.mean([scores[name] for name in ROUGE_TYPES]))

    return max(choices, key=lambda n: (quality(n), -n))
