"""Extractive question answering (SQuAD and SQuAD v2 shapes) with BERT-style encoders.

Examples -> features: a question with a context longer than ``data.max_length`` becomes several
windows that share ``data.doc_stride`` tokens. Each window is labelled with the start and end tokens of
the answer, or with the [CLS] token when it does not hold the whole answer (or there is none). Every
feature keeps its example id and the character offsets of its context tokens, so that evaluation maps
the start/end logits of all windows back to one answer per example: the best of the n-best start/end
pairs over all windows, as a character span of the context; for SQuAD v2, nothing when the no-answer
([CLS]) score beats that span's by more than ``eval.null_score_threshold``.
"""

from __future__ import annotations

import collections
import logging
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForQuestionAnswering, PreTrainedTokenizerBase

from finetune.config import Config, DataConfig, EvalConfig, check
from finetune.data import describe_split, require_columns, training_split
from finetune.errors import DataError, FinetuneError, ModelError
from finetune.metrics import load_metric
from finetune.models import Checkpoint
from finetune.tasks.base import Learned, Task

logger = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Logits of positions a feature does not have (padding across batches and processes): never a candidate.
PAD_LOGIT = -1e9
EXAMPLE_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "question": datasets.Value("string"),
    "context": datasets.Value("string"),
    "answers": {"text": datasets.List(datasets.Value("string")),
                "answer_start": datasets.List(datasets.Value("int32"))},
})
BASELINE_NAME = "overlap: best-overlap sentence, words after the question's last word"


@dataclass
class QuestionAnsweringData(DataConfig):
    """``data`` keys of the question-answering task."""

    question_column: str = "question"
    context_column: str = "context"
    """The passage that holds the answer."""
    answers_column: str = "answers"
    """SQuAD-form answers ``{text: [...], answer_start: [...]}`` (character offsets)."""
    id_column: str | None = "id"
    """A unique id per example; null numbers the rows."""
    unanswerable: bool | None = None
    """Questions may have no answer (SQuAD v2); null: yes when the training split has one."""
    doc_stride: int = 128
    """Tokens shared by consecutive windows of a context longer than max_length (below it)."""
    on_bad_example: Literal["error", "skip"] = "error"
    """An example whose answer is not at its answer_start (or another bad row): stop with an error, or skip
    and count it."""

    def validate(self) -> None:
        super().validate()
        check(self.doc_stride >= 0, "data.doc_stride", ">= 0", self.doc_stride)
        check(self.doc_stride < self.max_length, "data.doc_stride", f"below data.max_length ({self.max_length})",
              self.doc_stride)


@dataclass
class QuestionAnsweringEval(EvalConfig):
    """``eval`` keys of the question-answering task."""

    n_best_size: int = 20
    """Start and end candidates per window considered for the answer span."""
    max_answer_length: int = 30
    """The longest answer span, in tokens."""
    null_score_threshold: float = 0.0
    """With unanswerable questions: answer nothing when the no-answer score beats the best span's by more
    than this (raise it for fewer empty answers)."""

    def validate(self) -> None:
        super().validate()
        check(self.n_best_size > 0, "eval.n_best_size", "> 0", self.n_best_size)
        check(self.max_answer_length > 0, "eval.max_answer_length", "> 0", self.max_answer_length)


@dataclass(frozen=True)
class QuestionAnsweringLearned(Learned):
    unanswerable: bool
    """Whether questions may have no answer (SQuAD v2 scoring and the no-answer decision)."""


class QuestionAnsweringTask(Task):
    name = "question-answering"
    Data = QuestionAnsweringData
    Eval = QuestionAnsweringEval
    Learned = QuestionAnsweringLearned
    auto_class = AutoModelForQuestionAnswering
    peft_task_type = "QUESTION_ANS"
    modules_to_save = ["qa_outputs"]
    input_columns = ("question", "context")
    metrics_higher_is_better = {"loss": False, "exact_match": True, "f1": True}
    headline_metrics = ["exact_match", "f1"]
    pipeline_tag = "question-answering"
    predict_example = '--question "What is the capital of France?" --context "Paris is the capital of France."'
    eval_pad_values = {"start_logits": PAD_LOGIT, "end_logits": PAD_LOGIT}
    data: QuestionAnsweringData
    eval: QuestionAnsweringEval

    def __init__(self, config: Config):
        super().__init__(config)
        self.skipped: dict[str, int] = {}
        """Bad examples skipped per split (``data.on_bad_example: skip``), for ``describe``."""
        self.window_counts: dict[str, int] = {}
        """Features (context windows) per split, for ``describe``."""

    # --- learn and bind --------------------------------------------------------------------------
    def learn(self, raw: datasets.DatasetDict, checkpoint: Checkpoint) -> QuestionAnsweringLearned:
        """Unanswerable questions: the recipe's ``data.unanswerable``, else whether the training split has one."""
        if self.data.unanswerable is not None:
            return QuestionAnsweringLearned(self.data.unanswerable)
        d = self.data
        train, where = training_split(raw, d)
        require_columns(train, [d.context_column, d.answers_column], where)
        for answers, context in zip(train[d.answers_column], train[d.context_column]):
            normalised, problem = _parse_answers(answers, context)
            if problem is None and not normalised["text"]:
                return QuestionAnsweringLearned(True)
        return QuestionAnsweringLearned(False)

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        if not tokenizer.is_fast:
            raise ModelError(f"{tokenizer.name_or_path}: question answering needs a fast tokenizer (character "
                             f"offsets); this checkpoint has only a slow one")
        return tokenizer

    # --- data ------------------------------------------------------------------------------------
    def prepare(self, raw: datasets.DatasetDict) -> datasets.DatasetDict:
        """Check every example (id, question, context, answer spans) and rename to SQuAD column names."""
        return datasets.DatasetDict({split: self._check_split(dataset, describe_split(raw, split, self.data))
                                     for split, dataset in raw.items()})

    def _check_split(self, dataset: datasets.Dataset, where: str) -> datasets.Dataset:
        d = self.data
        columns = [d.question_column, d.context_column, d.answers_column] + ([d.id_column] if d.id_column else [])
        require_columns(dataset, columns, where)
        ids = [str(v) if v is not None else "" for v in dataset[d.id_column]] if d.id_column else \
            [str(i + 1) for i in range(len(dataset))]
        rows: dict[str, list[Any]] = {name: [] for name in EXAMPLE_FEATURES}
        first_row: dict[str, int] = {}
        problems: list[str] = []
        for row, (example_id, question, context, answers) in enumerate(
                zip(ids, dataset[d.question_column], dataset[d.context_column], dataset[d.answers_column])):
            normalised, problem = _parse_answers(answers, context)
            if not example_id.strip():
                problem = f"empty id in column {d.id_column!r}"
            elif example_id in first_row:
                problem = f"duplicate id (also row {first_row[example_id] + 1})"
            elif not isinstance(question, str) or not question.strip():
                problem = f"empty question (column {d.question_column!r})"
            elif not isinstance(context, str) or not context.strip():
                problem = f"empty context (column {d.context_column!r})"
            elif problem is None and not normalised["text"] and not self.learned.unanswerable:
                problem = ("no answer, but unanswerable questions are off (data.unanswerable is false, or the model "
                           "was trained without them)")
            if problem is not None:
                message = f"{where}: row {row + 1}, id {example_id!r}: {problem}"
                if d.on_bad_example == "error":
                    raise DataError(message + " (data.on_bad_example: skip drops such examples)")
                problems.append(message)
                continue
            first_row[example_id] = row
            for name, value in zip(EXAMPLE_FEATURES, (example_id, question, context, normalised)):
                rows[name].append(value)
        if problems:
            self.skipped[where] = len(problems)
            logger.warning("%s: skipped %d bad example(s) (data.on_bad_example: skip); first: %s", where,
                           len(problems), problems[0])
        if not rows["id"]:
            raise DataError(f"{where}: no usable example left")
        return datasets.Dataset.from_dict(rows, features=EXAMPLE_FEATURES)

    def describe(self, splits: datasets.DatasetDict) -> list[str]:
        lines = []
        for name, split in splits.items():
            no_answer = sum(not a["text"] for a in split["answers"])
            line = f"{name}: {len(split)} questions on {len(set(split['context']))} contexts"
            if self.learned.unanswerable:
                line += f" ({no_answer} without answer)"
            if name in self.window_counts:
                line += f" -> {self.window_counts[name]} windows of at most {self.data.max_length} tokens"
            lines.append(line)
        lines += [f"{where}: skipped {n} bad example(s)" for where, n in self.skipped.items()]
        return lines

    def features(self, examples: datasets.Dataset, split: str) -> datasets.Dataset:
        d, tokenizer = self.data, self.tokenizer
        check_question_lengths(examples["question"], examples["id"], tokenizer, d.max_length, d.doc_stride, split)
        features = examples.map(encode_windows, batched=True, remove_columns=examples.column_names,
                                fn_kwargs={"tokenizer": tokenizer, "max_length": d.max_length, "stride": d.doc_stride},
                                desc=f"tokenizing {split}")
        self.window_counts[split] = len(features)
        return features

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Model inputs padded, plus start/end positions; example ids and offsets stay in the dataset."""
        keep = [{k: f[k] for k in MODEL_INPUTS if k in f} for f in features]
        batch = dict(self.tokenizer.pad(keep, padding=True, pad_to_multiple_of=self.config.train.pad_to_multiple_of,
                                   return_tensors="pt"))
        for key in ("start_positions", "end_positions"):
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        return batch

    # --- evaluation ------------------------------------------------------------------------------
    def eval_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        starts, ends = batch.pop("start_positions"), batch.pop("end_positions")
        outputs = model(**batch)
        start_logits, end_logits = outputs.start_logits.float(), outputs.end_logits.float()
        # The model's own loss, per feature: mean of the start and end cross-entropies.
        loss = (F.cross_entropy(start_logits, starts, reduction="none")
                + F.cross_entropy(end_logits, ends, reduction="none")) / 2
        return {"loss": loss, "start_logits": start_logits, "end_logits": end_logits}

    def compute_metrics(self, outputs: dict[str, np.ndarray], examples: datasets.Dataset,
                        features: datasets.Dataset) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        ids = examples["id"]
        answers = self.postprocess(examples, features, outputs["start_logits"], outputs["end_logits"])
        metrics: dict[str, Any] = {"loss": float(outputs["loss"].mean())}
        metrics.update(squad_scores(ids, [a.text for a in answers], examples["answers"], self.learned.unanswerable))
        rows = []
        for example_id, question, context, gold, answer in zip(ids, examples["question"], examples["context"],
                                                               examples["answers"], answers):
            row = {"id": example_id, "question": question, "prediction": answer.text, "start": answer.start,
                   "score": round(answer.score, 6), "answers": gold["text"], "context": context}
            if self.learned.unanswerable:
                row["null_score_diff"] = round(answer.null_score_diff, 4)
            rows.append(row)
        return metrics, rows

    def postprocess(self, examples: datasets.Dataset | dict[str, list], features: datasets.Dataset | dict[str, list],
                    start_logits: Sequence[np.ndarray], end_logits: Sequence[np.ndarray]) -> list[SpanPrediction]:
        """Per-feature logits (in feature order) -> one answer per example, with the recipe's settings."""
        index = {example_id: i for i, example_id in enumerate(examples["id"])}
        if len(index) != len(examples["id"]):
            raise FinetuneError("example ids are not unique: features cannot be mapped back to examples")
        unknown = next((x for x in features["example_id"] if x not in index), None)
        if unknown is not None:
            raise FinetuneError(f"a feature belongs to example {unknown!r}, which is not among the examples")
        e = self.eval
        return best_spans(examples["context"], [index[x] for x in features["example_id"]], features["offset_mapping"],
                          features["cls_index"], start_logits, end_logits, n_best_size=e.n_best_size,
                          max_answer_length=e.max_answer_length, unanswerable=self.learned.unanswerable,
                          null_score_threshold=e.null_score_threshold)

    def baseline(self, train: datasets.Dataset, test: datasets.Dataset,
                 validation: datasets.Dataset | None = None) -> dict[str, Any]:
        """A heuristic that needs no training: see :func:`overlap_answer`."""
        texts = [overlap_answer(q, c)[0] for q, c in zip(test["question"], test["context"])]
        scores = squad_scores(test["id"], texts, test["answers"], self.learned.unanswerable)
        return {"name": BASELINE_NAME, "exact_match": scores["exact_match"], "f1": scores["f1"]}

    @classmethod
    def worst_predictions(cls, rows: list[dict[str, Any]], count: int) -> tuple[str, list[dict[str, Any]]]:
        """Predicted spans that miss the answers, lowest F1 (SQuAD's word overlap) first, then most confident."""
        scored = [{**row, "f1": round(span_f1(row.get("prediction", ""), row.get("answers") or []), 4)}
                  for row in rows]
        for row in scored:  # the predicted span [in brackets] inside its context
            context, start, text = row.pop("context", None), row.get("start"), row.get("prediction") or ""
            if isinstance(context, str) and isinstance(start, int) and text:
                row["context, prediction in [ ]"] = f"{context[:start]}[{text}]{context[start + len(text):]}"
            elif isinstance(context, str):
                row["context, prediction in [ ]"] = context
        wrong = [row for row in scored if row["f1"] < 1]
        worst = sorted(wrong, key=lambda row: (row["f1"], -float(row.get("score", 0))))[:count]
        return f"spans that miss the answer, lowest F1 first ({len(wrong)} of {len(rows)} questions)", worst

    # --- inference -------------------------------------------------------------------------------
    def predict(self, model: torch.nn.Module, inputs: list[dict[str, Any]],
                stream: TextIO | None = None) -> list[dict[str, Any]]:
        for row, item in enumerate(inputs, start=1):
            for field in ("question", "context"):
                if not isinstance(item.get(field), str) or not item[field].strip():
                    raise DataError(f"input {row}: question answering needs a non-empty {field!r}")
        d, tokenizer = self.data, self.tokenizer
        examples = {"id": [str(i) for i in range(len(inputs))], "question": [x["question"] for x in inputs],
                    "context": [x["context"] for x in inputs],
                    "answers": [{"text": [], "answer_start": []} for _ in inputs]}
        check_question_lengths(examples["question"], examples["id"], tokenizer, d.max_length, d.doc_stride, "input")
        encoded = encode_windows(examples, tokenizer, d.max_length, d.doc_stride)
        features = [dict(zip(encoded, values)) for values in zip(*encoded.values())]
        device = next(model.parameters()).device
        start_logits: list[np.ndarray] = []
        end_logits: list[np.ndarray] = []
        for first in range(0, len(features), self.eval.batch_size):
            chunk = features[first:first + self.eval.batch_size]
            batch = self.collate(chunk)
            batch = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
            with torch.no_grad():
                outputs = model(**batch)
            for row, feature in enumerate(chunk):
                start_logits.append(outputs.start_logits[row, :feature["length"]].float().cpu().numpy())
                end_logits.append(outputs.end_logits[row, :feature["length"]].float().cpu().numpy())
        answers = self.postprocess(examples, encoded, start_logits, end_logits)
        return [{"question": item["question"], "answer": answer.text, "score": round(answer.score, 6),
                 "start": answer.start,
                 "end": None if answer.start is None else answer.start + len(answer.text)}
                for item, answer in zip(inputs, answers)]


# --- examples ------------------------------------------------------------------------------------------
def _parse_answers(value: Any, context: Any) -> tuple[dict[str, list], str | None]:
    """SQuAD-form answers (``{text: [...], answer_start: [...]}``, or a list of ``{text, answer_start}``)
    -> (normalised answers, problem or None). Each answer text must be at its start in the context."""
    empty: dict[str, list] = {"text": [], "answer_start": []}
    if isinstance(value, list) and all(isinstance(x, dict) for x in value):
        value = {"text": [x.get("text") for x in value], "answer_start": [x.get("answer_start") for x in value]}
    if not isinstance(value, dict) or not isinstance(value.get("text"), list) \
            or not isinstance(value.get("answer_start"), list):
        return empty, f"answers must be {{text: [...], answer_start: [...]}}; got {value!r}"
    texts, starts = value["text"], value["answer_start"]
    if len(texts) != len(starts):
        return empty, f"{len(texts)} answer texts but {len(starts)} answer_start values"
    if not isinstance(context, str):
        return empty, None  # reported as an empty context
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or not text.strip():
            return empty, f"empty answer text ({text!r})"
        if isinstance(start, float) and start.is_integer():
            start = int(start)
        if not isinstance(start, int) or isinstance(start, bool):
            return empty, f"answer_start {start!r} is not a character offset"
        if start < 0 or context[start:start + len(text)] != text:
            found = context.find(text)
            if found < 0:
                return empty, f"answer text {text!r} does not occur in the context"
            return empty, (f"answer_start {start} does not match answer text {text!r}: the context has "
                           f"{context[max(start, 0):max(start, 0) + len(text)]!r} there (the text occurs at {found})")
    return {"text": list(texts), "answer_start": [int(s) for s in starts]}, None


# --- features ------------------------------------------------------------------------------------------
def check_question_lengths(questions: list[str], ids: list[str], tokenizer: PreTrainedTokenizerBase,
                           max_length: int, stride: int, where: str) -> None:
    """Every window must keep more context tokens than the stride (the tokenizer aborts otherwise)."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    lengths = [len(ids_) for ids_ in tokenizer([q.lstrip() for q in questions], add_special_tokens=False)["input_ids"]]
    for example_id, length in zip(ids, lengths):
        room = max_length - length - specials
        if room <= stride:
            raise DataError(f"{where}, id {example_id!r}: the question has {length} tokens, which leaves {room} "
                            f"context tokens per window of data.max_length={max_length}; that must exceed "
                            f"data.doc_stride={stride}: raise data.max_length or lower data.doc_stride")


def encode_windows(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_length: int,
                   stride: int) -> dict[str, list]:
    """Question + context -> one feature per window of the context, with start/end token labels, the
    example id, the [CLS] position and the character offsets of context tokens (None elsewhere)."""
    encoded = tokenizer([q.lstrip() for q in batch["question"]], batch["context"], truncation="only_second",
                        max_length=max_length, stride=stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True)
    features: dict[str, list] = {key: encoded[key] for key in MODEL_INPUTS if key in encoded}
    features.update(example_id=[], offset_mapping=[], cls_index=[], start_positions=[], end_positions=[], length=[])
    for i, example in enumerate(encoded["overflow_to_sample_mapping"]):
        input_ids = encoded["input_ids"][i]
        offsets = [tuple(o) if sequence == 1 else None
                   for o, sequence in zip(encoded["offset_mapping"][i], encoded.sequence_ids(i))]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        start, end = answer_tokens(offsets, batch["answers"][example], cls_index)
        features["example_id"].append(batch["id"][example])
        features["offset_mapping"].append(offsets)
        features["cls_index"].append(cls_index)
        features["start_positions"].append(start)
        features["end_positions"].append(end)
        features["length"].append(len(input_ids))
    return features


def answer_tokens(offsets: list[tuple[int, int] | None], answers: dict[str, list], cls_index: int) -> tuple[int, int]:
    """Start and end tokens of the first answer in one window; [CLS] for both when the window does not
    hold the whole answer or there is none."""
    if not answers["text"]:
        return cls_index, cls_index
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    context = [i for i, o in enumerate(offsets) if o is not None]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return cls_index, cls_index
    start = next(i for i in context if offsets[i][1] > start_char)  # the token holding the first character
    end = max(i for i in context if offsets[i][0] < end_char)  # the token holding the last character
    return start, end


# --- postprocessing ------------------------------------------------------------------------------------
@dataclass
class SpanPrediction:
    """One example's answer: a character span of its context, or nothing (``start`` None)."""

    text: str
    start: int | None
    score: float
    """Probability among the n-best spans (and the no-answer candidate, for SQuAD v2)."""
    null_score_diff: float | None = None
    """SQuAD v2: no-answer score minus the best span's score (the answer is empty above the threshold)."""


def best_spans(contexts: Sequence[str], feature_example: Sequence[int],
               feature_offsets: Sequence[Sequence[Sequence[int] | None]], feature_cls: Sequence[int],
               start_logits: Sequence[np.ndarray], end_logits: Sequence[np.ndarray], *, n_best_size: int,
               max_answer_length: int, unanswerable: bool, null_score_threshold: float) -> list[SpanPrediction]:
    """Per-feature start/end logits -> one answer per example (``contexts[i]``).

    For each window of an example, the ``n_best_size`` best start and end tokens among its context tokens
    form candidate spans (end not before start, at most ``max_answer_length`` tokens); the best-scoring
    span (start + end logit) over all windows wins. A span never leaves its window, so an answer that
    straddles a window boundary is found from the window that holds it whole. With ``unanswerable``, the
    no-answer score is the lowest [CLS] score over the windows; the answer is empty when it beats the best
    span by more than ``null_score_threshold``.
    """
    if not (len(feature_example) == len(feature_offsets) == len(start_logits) == len(end_logits)):
        raise FinetuneError(f"got {len(start_logits)} start and {len(end_logits)} end logit rows for "
                            f"{len(feature_example)} features: outputs must be one row per feature, in feature order")
    by_example: dict[int, list[int]] = collections.defaultdict(list)
    for feature, example in enumerate(feature_example):
        by_example[example].append(feature)
    missing = [i for i in range(len(contexts)) if i not in by_example]
    if missing:
        raise FinetuneError(f"{len(missing)} example(s) have no feature (first: example {missing[0]})")
    predictions = []
    for example, context in enumerate(contexts):
        spans: list[tuple[float, int, int]] = []  # (score, start char, end char)
        null_score = None
        for feature in by_example[example]:
            offsets = feature_offsets[feature]
            start, end = np.asarray(start_logits[feature]), np.asarray(end_logits[feature])
            if unanswerable:
                cls = feature_cls[feature]
                score = float(start[cls] + end[cls])
                null_score = score if null_score is None else min(null_score, score)
            tokens = np.array([i for i, o in enumerate(offsets) if o is not None], dtype=np.int64)
            if tokens.size == 0:
                continue
            top_starts = tokens[np.argsort(-start[tokens], kind="stable")[:n_best_size]]
            top_ends = tokens[np.argsort(-end[tokens], kind="stable")[:n_best_size]]
            lengths = top_ends[None, :] - top_starts[:, None] + 1
            scores = start[top_starts][:, None] + end[top_ends][None, :]
            for i, j in zip(*np.nonzero((lengths >= 1) & (lengths <= max_answer_length))):
                spans.append((float(scores[i, j]), offsets[top_starts[i]][0], offsets[top_ends[j]][1]))
        spans.sort(key=lambda span: -span[0])
        spans = spans[:n_best_size]
        candidates = [s for s, _, _ in spans] + ([null_score] if unanswerable else [])
        probabilities = _softmax(np.array(candidates)) if candidates else np.array([])
        if not unanswerable:
            if not spans:  # only when no window has a context token
                predictions.append(SpanPrediction("", None, 0.0))
                continue
            _, first, last = spans[0]
            predictions.append(SpanPrediction(context[first:last], first, float(probabilities[0])))
            continue
        diff = null_score - spans[0][0] if spans else float("inf")
        if diff > null_score_threshold:
            predictions.append(SpanPrediction("", None, float(probabilities[-1]), diff))
        else:
            _, first, last = spans[0]
            predictions.append(SpanPrediction(context[first:last], first, float(probabilities[0]), diff))
    return predictions


def _softmax(scores: np.ndarray) -> np.ndarray:
    exp = np.exp(scores - scores.max())
    return exp / exp.sum()


# --- metrics -------------------------------------------------------------------------------------------
def squad_scores(ids: Sequence[str], texts: Sequence[str], answers: Sequence[dict[str, list]],
                 unanswerable: bool) -> dict[str, float]:
    """Exact match and F1 (0-100) by the SQuAD definitions, or the SQuAD v2 ones (an empty prediction
    is right for a question without answer) through ``evaluate``."""
    references = [{"id": i, "answers": {"text": list(a["text"]), "answer_start": [int(s) for s in a["answer_start"]]}}
                  for i, a in zip(ids, answers)]
    if not unanswerable:
        predictions = [{"id": i, "prediction_text": t} for i, t in zip(ids, texts)]
        result = load_metric("squad").compute(predictions=predictions, references=references)
        return {"exact_match": float(result["exact_match"]), "f1": float(result["f1"])}
    # The empty-answer decision is already made (null_score_threshold), hence probability 0 for all.
    predictions = [{"id": i, "prediction_text": t, "no_answer_probability": 0.0} for i, t in zip(ids, texts)]
    result = load_metric("squad_v2").compute(predictions=predictions, references=references)
    scores = {"exact_match": float(result["exact"]), "f1": float(result["f1"])}
    for prefix, name in (("HasAns", "has_answer"), ("NoAns", "no_answer")):
        if f"{prefix}_exact" in result:
            scores[f"{name}_exact_match"] = float(result[f"{prefix}_exact"])
            scores[f"{name}_f1"] = float(result[f"{prefix}_f1"])
    return scores


def span_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD's F1 of one predicted span against its best gold answer (words lowercased, punctuation and articles
    dropped); a question without answer is right only when nothing is predicted."""
    def words(text: str) -> list[str]:
        text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
        return re.sub(r"\b(a|an|the)\b", " ", text).split()

    if not answers:
        return float(not words(prediction))
    best = 0.0
    predicted = words(prediction)
    for answer in answers:
        gold = words(answer)
        common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
        if not predicted or not gold:
            best = max(best, float(predicted == gold))
        elif common:
            precision, recall = common / len(predicted), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# --- baseline ------------------------------------------------------------------------------------------
STOPWORDS = frozenset("""a an the of in on at to for by with from and or is are was were be been being it its this
that these those what which who whom whose when where why how does do did has have had as into than there""".split())
_WORD = re.compile(r"\S+")
# A sentence ends at . ! or ? followed by a space or the end (so "18.25" does not end one).
_SENTENCE = re.compile(r"(?:[^.!?]|[.!?](?!\s|$))+[.!?]*")
_PUNCTUATION = string.punctuation + "“”‘’«»"


def _norm(word: str) -> str:
    word = word.lower().strip(_PUNCTUATION)
    return word[:-2] if word.endswith(("'s", "’s")) else word


def overlap_answer(question: str, context: str) -> tuple[str, int]:
    """The no-training baseline: take the sentence of the context that shares the most content words
    with the question, and answer the words after the last question word in it (skipping leading
    function words, up to the next comma or the sentence end); the whole sentence when nothing follows."""
    asked = {_norm(w) for w in question.split()} - STOPWORDS - {""}
    best: list[tuple[int, int, str]] = []
    best_overlap = -1
    for sentence in _SENTENCE.finditer(context):
        words = [(m.start(), m.end(), _norm(m.group())) for m in _WORD.finditer(context, *sentence.span())]
        overlap = len({w for _, _, w in words} & asked)
        if words and overlap > best_overlap:
            best, best_overlap = words, overlap
    last = max((i for i, (_, _, w) in enumerate(best) if w in asked), default=-1)
    tail = best[last + 1:]
    while tail and tail[0][2] in STOPWORDS:
        tail = tail[1:]
    span = []
    for word in tail:
        span.append(word)
        if context[word[1] - 1] in ",;:":
            break
    span = span or best
    start, end = span[0][0], span[-1][1]
    text = context[start:end].rstrip(",;:.!?")
    return (text, start) if text else (context[start:end], start)
