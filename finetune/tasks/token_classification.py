"""Token classification: a tag for every word of a sentence (named entities, part-of-speech), with
BERT-style encoders or any model that has a fast tokenizer.

Rows: a list of words (``data.tokens_column``) and one tag per word (``data.tags_column``), either entity
tags (IOB2/IOB1/IOBES: ``B-PER``, ``I-PER``, ``O``) or plain tags (``NOUN``, ``VERB``). From json/jsonl/parquet
files with list columns, CoNLL column files and CoNLL-U treebanks (``finetune.conll``), or Hub datasets in
the conll2003 layout (``tokens``, ``ner_tags`` as a sequence of ClassLabel ids: their names are the tags).

Alignment: the fast tokenizer splits the words into sub-tokens (``word_ids()``); a word's first sub-token
carries its tag and the others are ignored in the loss (-100), or, with ``data.label_all_subtokens``,
carry the word's tag too (``B-X`` continued as ``I-X``). A word given alone must get the sub-tokens it has
inside running text: byte-level BPE tokenizers are switched to ``add_prefix_space`` (and SentencePiece
ones to a ``▁`` before every word) at bind time. A word the tokenizer drops entirely (e.g. a zero-width
character) gets the unknown token, so that no word is lost.

Windows: a sentence longer than ``data.max_length`` tokens is cut between words into windows; each
window repeats up to ``data.stride`` sub-tokens of the words before its own as context (not labelled),
so that every word is labelled, and predicted, in exactly one window.

Predictions go back to one tag per word (its first sub-token's); entities (read as conlleval and seqeval
do: a stray ``I-X`` starts one) become character spans of the sentence: its text (``data.text_column``)
when the data has it, else the words joined with single spaces.

Metrics: for entity tags, seqeval's entity precision / recall / F1 overall and per type, and token
accuracy; for plain tags, token accuracy, macro-F1 over tags and per-tag precision / recall / F1. The
baseline tags each word with its most frequent tag in the training split (unseen words: the most
frequent tag overall).
"""

from __future__ import annotations

import collections
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForTokenClassification, PreTrainedTokenizerBase

from finetune.config import Config, DataConfig, check
from finetune.data import describe_split, require_columns, training_split
from finetune.errors import ConfigError, DataError, FinetuneError, ModelError
from finetune.metrics import load_metric
from finetune.models import Checkpoint
from finetune.tasks.base import Learned, Task
from finetune.tasks.decoding import IGNORE_INDEX, pad_rows

logger = logging.getLogger(__name__)

ENTITY_PREFIXES = ("B-", "I-", "E-", "S-")
ENTITY_METRICS = ("f1", "precision", "recall")
PLAIN_METRICS = ("macro_f1",)
# Leading and trailing punctuation split off whitespace-separated words of a text given to ``predict``.
OPENERS = "([{\"'“‘«"
CLOSERS = ".,;:!?)]}\"'”’»…"
_CHUNK = re.compile(r"\S+")


@dataclass
class TokenClassificationData(DataConfig):
    """``data`` keys of the token-classification task."""

    tokens_column: str = "tokens"
    """A list of words per row (one sentence)."""
    tags_column: str = "tags"
    """A list of tags per row, one per word: names, or ClassLabel ids (conll2003's ``ner_tags``, ``pos_tags``)."""
    text_column: str | None = None
    """The sentence as text, when the data has it: entity offsets refer to it, and every word must occur in it,
    in order; null: the words joined with single spaces."""
    label_all_subtokens: bool = False
    """Train on every sub-token of a word (its tag; B-X continued as I-X) instead of its first only; predictions
    always read the first."""
    stride: int = 16
    """Sentences longer than max_length: sub-tokens of the preceding words that each window repeats as context."""
    on_bad_example: Literal["error", "skip"] = "error"
    """A bad sentence (words and tags of different lengths, no words, an empty word, a tag the training split
    does not have, a word not in its text): stop with an error naming the row, or skip it and count it."""

    def validate(self) -> None:
        super().validate()
        check(0 <= self.stride <= self.max_length // 2, "data.stride",
              f"in [0, {self.max_length // 2}] (at most half of data.max_length)", self.stride)


@dataclass(frozen=True)
class TokenClassificationLearned(Learned):
    tags: tuple[str, ...]
    """Tag names in head order: the ClassLabel names of the training split's tags, or its tags sorted (``O``
    first, entity tags by type, ``B-`` before ``I-``)."""


def is_entity_tag_set(tags: Sequence[str]) -> bool:
    """Entity tags (IOB/IOBES): every tag is ``O`` or a prefix ``B-``/``I-``/``E-``/``S-`` and a type."""
    return any(t != "O" for t in tags) and all(
        t == "O" or (t[:2] in ENTITY_PREFIXES and len(t) > 2) for t in tags)


def order_tags(tags: set[str]) -> list[str]:
    """A stable head order: for entity tags ``O``, then by type, ``B-`` ``I-`` ``E-`` ``S-`` within a type;
    plain tags sorted."""
    if not is_entity_tag_set(sorted(tags)):
        return sorted(tags)
    return sorted(tags, key=lambda t: ("", 0) if t == "O" else (t[2:], ENTITY_PREFIXES.index(t[:2]) + 1))


class TokenClassificationTask(Task):
    name = "token-classification"
    Data = TokenClassificationData
    Learned = TokenClassificationLearned
    auto_class = AutoModelForTokenClassification
    peft_task_type = "TOKEN_CLS"
    modules_to_save = ["classifier", "score"]
    metrics_higher_is_better = {"loss": False, "f1": True, "precision": True, "recall": True, "accuracy": True,
                                "macro_f1": True}
    headline_metrics = ["f1", "precision", "recall", "accuracy", "macro_f1"]
    """Entity tag sets report the first four, plain ones accuracy and macro_f1."""
    pipeline_tag = "token-classification"
    eval_pad_values = {"predicted": IGNORE_INDEX}
    data: TokenClassificationData

    def __init__(self, config: Config):
        super().__init__(config)
        self.skipped: dict[str, int] = {}
        """Bad sentences skipped per split (``data.on_bad_example: skip``)."""
        self.stray: dict[str, int] = {}
        """Per split: entity tags I-X (or E-X) that follow neither B-X nor I-X (kept: they start an entity)."""
        self.window_counts: dict[str, int] = {}
        """Features (windows) per split, for ``describe``."""
        self.specials: tuple[list[int], list[int]] = ([], [])
        """Special token ids the tokenizer puts before and after a sentence (set at bind time)."""

    @property
    def entities(self) -> bool:
        """Whether the tags are entity tags (seqeval metrics, entity spans) or plain ones."""
        return is_entity_tag_set(self.learned.tags)

    # --- learn and bind --------------------------------------------------------------------------
    def learn(self, raw: datasets.DatasetDict, checkpoint: Checkpoint) -> TokenClassificationLearned:
        """The tag set: the ClassLabel names of the tags column, or the tags the training split uses."""
        d = self.data
        train, where = training_split(raw, d)
        require_columns(train, self._column_keys(), where)
        classes = _class_label(train.features[d.tags_column])
        if classes is not None:
            tags = list(classes.names)
        else:
            used = {_tag_name(t) for row in train[d.tags_column] if isinstance(row, list) for t in row}
            tags = order_tags(used - {""})
        if len(tags) < 2:
            raise DataError(f"{where}: column {d.tags_column!r} (data.tags_column) has {len(tags)} tag "
                            f"({', '.join(tags) or 'none'}); need at least 2")
        entities = is_entity_tag_set(tags)
        wrong = PLAIN_METRICS if entities else ENTITY_METRICS
        if self.config.train.metric_for_best in wrong:
            allowed = ("loss", "accuracy") + (ENTITY_METRICS if entities else PLAIN_METRICS)
            raise ConfigError(f"config key 'train.metric_for_best' must be one of {', '.join(allowed)} for "
                              f"{'entity' if entities else 'plain (no B-/I- entity)'} tags; got "
                              f"{self.config.train.metric_for_best!r}")
        return TokenClassificationLearned(tuple(tags))

    def _column_keys(self) -> dict[str, str]:
        d = self.data
        keys = {d.tokens_column: "data.tokens_column", d.tags_column: "data.tags_column"}
        if d.text_column:
            keys[d.text_column] = "data.text_column"
        return keys

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        """A fast tokenizer (word ids), a pad token, words tokenized as inside running text."""
        if not tokenizer.is_fast:
            raise ModelError(f"{tokenizer.name_or_path}: token classification needs a fast tokenizer (word ids); "
                             f"this checkpoint has only a slow one")
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None and tokenizer.unk_token_id is None:
                raise ModelError(f"{tokenizer.name_or_path}: the tokenizer has no pad, eos or unk token to pad with")
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token_id is not None else tokenizer.unk_token
        if not words_match_running_text(tokenizer):
            add_word_prefix(tokenizer)
            if not words_match_running_text(tokenizer):
                logger.warning("%s: words given one by one get other sub-tokens than inside running text",
                               tokenizer.name_or_path)
        self.specials = special_tokens_around(tokenizer)
        room = self.data.max_length - sum(len(s) for s in self.specials)
        if room <= self.data.stride:
            raise ConfigError(f"config key 'data.max_length' must leave more than data.stride ({self.data.stride}) "
                              f"tokens besides the {sum(len(s) for s in self.specials)} special tokens; got "
                              f"{self.data.max_length}")
        return tokenizer

    # --- data ------------------------------------------------------------------------------------
    def prepare(self, raw: datasets.DatasetDict) -> datasets.DatasetDict:
        """Check every sentence of every split; columns ``id``, ``tokens``, ``tags`` (ids of the learned tags),
        ``text`` and ``starts`` (each word's first character in ``text``)."""
        return datasets.DatasetDict({split: self._check_split(dataset, describe_split(raw, split, self.data))
                                     for split, dataset in raw.items()})

    def _check_split(self, dataset: datasets.Dataset, where: str) -> datasets.Dataset:
        d, tags = self.data, self.learned.tags
        require_columns(dataset, self._column_keys(), where)
        classes = _class_label(dataset.features[d.tags_column])
        index = {tag: i for i, tag in enumerate(tags)}
        has_ids = "id" in dataset.column_names
        ids = [str(v) for v in dataset["id"]] if has_ids else [str(row + 1) for row in range(len(dataset))]
        texts = dataset[d.text_column] if d.text_column else [None] * len(dataset)
        rows: dict[str, list[Any]] = {"id": [], "tokens": [], "tags": [], "text": [], "starts": []}
        problems: list[str] = []
        stray = 0
        for row, (tokens, row_tags, text) in enumerate(zip(dataset[d.tokens_column], dataset[d.tags_column], texts)):
            names, problem = _check_sentence(tokens, row_tags, classes, index, d)
            if problem is None:
                sentence, starts, problem = word_starts(tokens, text, d.text_column)
            if problem is not None:
                message = f"{where}: row {row + 1}" + (f" (id {ids[row]})" if has_ids else "") + f": {problem}"
                if d.on_bad_example == "error":
                    raise DataError(message + " (data.on_bad_example=skip drops such sentences)")
                problems.append(message)
                continue
            if self.entities:
                stray += count_stray_tags(names)
            for key, value in zip(rows, (ids[row], list(tokens), [index[n] for n in names], sentence, starts)):
                rows[key].append(value)
        if problems:
            self.skipped[where] = len(problems)
            logger.warning("%s: skipped %d bad sentence(s) (data.on_bad_example: skip); first: %s", where,
                           len(problems), problems[0])
        if stray:
            self.stray[where] = stray
        if not rows["id"]:
            raise DataError(f"{where}: no usable sentence left")
        features = datasets.Features({
            "id": datasets.Value("string"), "tokens": datasets.List(datasets.Value("string")),
            "tags": datasets.List(datasets.ClassLabel(names=list(tags))), "text": datasets.Value("string"),
            "starts": datasets.List(datasets.Value("int32"))})
        return datasets.Dataset.from_dict(rows, features=features)

    def describe(self, splits: datasets.DatasetDict) -> list[str]:
        lines = []
        for name, split in splits.items():
            words = sum(len(t) for t in split["tokens"])
            line = f"{name}: {len(split)} sentences, {words} words"
            if self.entities:
                begins = sum(self.learned.tags[t][:2] in ("B-", "S-") for row in split["tags"] for t in row)
                line += f", {begins} entities"
            if name in self.window_counts and self.window_counts[name] != len(split):
                line += f" -> {self.window_counts[name]} windows of at most {self.data.max_length} tokens"
            lines.append(line)
        lines += [f"{where}: skipped {n} bad sentence(s)" for where, n in self.skipped.items()]
        lines += [f"{where}: {n} tag(s) I-X after neither B-X nor I-X, kept (they start an entity, as in conlleval)"
                  for where, n in self.stray.items()]
        return lines

    def features(self, examples: datasets.Dataset, split: str) -> datasets.Dataset:
        """One feature per window (most sentences: one): ``input_ids``, ``labels``, ``word_index`` (the word
        whose prediction a position gives, else -1), ``example`` (row in ``examples``), ``length``."""
        settings = {"tokenizer": self.tokenizer, "max_length": self.data.max_length, "stride": self.data.stride,
                    "specials": self.specials,
                    "continuation": self._continuation() if self.data.label_all_subtokens else None}
        features = examples.map(_encode_batch, batched=True, with_indices=True, remove_columns=examples.column_names,
                                fn_kwargs=settings, desc=f"tokenizing {split}")
        self.window_counts[split] = len(features)
        return features

    def _continuation(self) -> list[int]:
        """Tag id for the later sub-tokens of a word of each tag: I-X for B-X (when the set has I-X), else itself."""
        index = {tag: i for i, tag in enumerate(self.learned.tags)}
        return [index.get("I-" + tag[2:], i) if tag.startswith("B-") else i for i, tag in enumerate(self.learned.tags)]

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
        multiple = self.config.train.pad_to_multiple_of
        inputs = [f["input_ids"] for f in features]
        return {
            "input_ids": pad_rows(inputs, self.tokenizer.pad_token_id, "right", multiple),
            "attention_mask": pad_rows([[1] * len(ids) for ids in inputs], 0, "right", multiple),
            "labels": pad_rows([f["labels"] for f in features], IGNORE_INDEX, "right", multiple),
        }

    # --- model -----------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        id2label = dict(enumerate(self.learned.tags))
        return {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}

    # --- evaluation ------------------------------------------------------------------------------
    def eval_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none").sum(1)
        score, predicted = logits.softmax(-1).max(-1)
        return {"loss": nll / (labels != IGNORE_INDEX).sum(1).clamp(min=1), "predicted": predicted, "score": score}

    def compute_metrics(self, outputs: dict[str, np.ndarray], examples: datasets.Dataset,
                        features: datasets.Dataset) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        tags = self.learned.tags
        predicted, scores = word_predictions(outputs["predicted"], outputs["score"], features["example"],
                                             features["word_index"], [len(t) for t in examples["tokens"]])
        references = [[tags[t] for t in row] for row in examples["tags"]]
        predictions = [[tags[t] for t in row] for row in predicted]
        metrics: dict[str, Any] = {"loss": float(outputs["loss"].mean())}
        metrics.update(self.scores(references, predictions))
        rows = []
        for i, example in enumerate(examples):
            row = {"id": example["id"], "tokens": example["tokens"], "tags": references[i], "predicted": predictions[i]}
            if self.entities:
                row["entities"] = entity_spans(predictions[i], scores[i], example["text"], example["starts"],
                                               example["tokens"])
            rows.append(row)
        return metrics, rows

    def scores(self, references: list[list[str]], predictions: list[list[str]]) -> dict[str, Any]:
        """Entity tags: seqeval's precision, recall, F1 (overall and per type) and token accuracy. Plain tags:
        token accuracy, macro-F1 over the tags that occur (in references or predictions), per-tag P/R/F1."""
        if self.entities:
            result = load_metric("seqeval").compute(predictions=predictions, references=references, zero_division=0)
            return {
                "precision": float(result["overall_precision"]), "recall": float(result["overall_recall"]),
                "f1": float(result["overall_f1"]), "accuracy": float(result["overall_accuracy"]),
                "per_type": {kind: {"precision": float(v["precision"]), "recall": float(v["recall"]),
                                    "f1": float(v["f1"]), "number": int(v["number"])}
                             for kind, v in sorted(result.items()) if isinstance(v, dict)},
            }
        index = {tag: i for i, tag in enumerate(self.learned.tags)}
        refs = [index[t] for row in references for t in row]
        preds = [index[t] for row in predictions for t in row]
        present = sorted(set(refs) | set(preds))
        kwargs = {"predictions": preds, "references": refs}
        scores: dict[str, Any] = {
            "accuracy": float(np.mean(np.array(refs) == np.array(preds))),
            "macro_f1": float(load_metric("f1").compute(**kwargs, average="macro", labels=present)["f1"]),
        }
        per_tag = {name: np.atleast_1d(load_metric(name).compute(**kwargs, average=None, labels=present,
                                                                 zero_division=0)[name])
                   for name in ("precision", "recall", "f1")}
        scores["per_tag"] = {self.learned.tags[t]: {name: float(per_tag[name][i]) for name in per_tag}
                             for i, t in enumerate(present)}
        return scores

    def baseline(self, train: datasets.Dataset, test: datasets.Dataset,
                 validation: datasets.Dataset | None = None) -> dict[str, Any]:
        """Each word's most frequent tag in the training split; unseen words get the most frequent tag overall."""
        tags = self.learned.tags
        by_word: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        overall: collections.Counter = collections.Counter()
        for tokens, row in zip(train["tokens"], train["tags"]):
            for word, tag in zip(tokens, row):
                by_word[word][tag] += 1
                overall[tag] += 1
        fallback = overall.most_common(1)[0][0]
        best = {word: counts.most_common(1)[0][0] for word, counts in by_word.items()}
        predictions = [[tags[best.get(word, fallback)] for word in tokens] for tokens in test["tokens"]]
        references = [[tags[t] for t in row] for row in test["tags"]]
        scores = self.scores(references, predictions)
        names = ("f1", "precision", "recall", "accuracy") if self.entities else ("accuracy", "macro_f1")
        return {"name": f"most frequent tag of each word in train (unseen words: {tags[fallback]})",
                **{name: scores[name] for name in names}}

    # --- inference -------------------------------------------------------------------------------
    def predict(self, model: torch.nn.Module, inputs: list[dict[str, Any]],
                stream: TextIO | None = None) -> list[dict[str, Any]]:
        """Rows with ``text`` (split into words at white space, punctuation split off their ends) or a list of
        words in ``tokens`` -> the words, their ``predicted`` tags and, for entity tags, the ``entities``
        (text, type, start, end, score) with character offsets in the text (or in the words joined by spaces)."""
        sentences: list[tuple[list[str], str, list[int]]] = []
        for row, item in enumerate(inputs, start=1):
            words = next((item[k] for k in ("tokens", self.data.tokens_column) if isinstance(item.get(k), list)), None)
            if words is not None and words and all(isinstance(w, str) and w.strip() for w in words):
                text, starts, _ = word_starts(words, None, None)
                sentences.append((list(words), text, starts))
            elif isinstance(item.get("text"), str) and item["text"].strip():
                words, starts = split_words(item["text"])
                sentences.append((words, item["text"], starts))
            else:
                raise DataError(f"input {row}: a token-classification input needs a non-empty 'text' or a list of "
                                f"non-empty words in 'tokens'")
        encoded = encode_windows(self.tokenizer, [s[0] for s in sentences], None, max_length=self.data.max_length,
                                 stride=self.data.stride, specials=self.specials)
        features = [dict(zip(encoded, values)) for values in zip(*encoded.values())]
        device = next(model.parameters()).device
        predicted_rows, score_rows = [], []
        model.eval()
        for first in range(0, len(features), self.config.eval.batch_size):
            chunk = features[first:first + self.config.eval.batch_size]
            batch = self.collate(chunk)
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits.float()
            score, predicted = logits.softmax(-1).max(-1)
            predicted_rows += list(predicted.cpu().numpy())
            score_rows += list(score.cpu().numpy())
        width = max(len(row) for row in predicted_rows)
        predicted, scores = word_predictions(
            np.stack([np.pad(r, (0, width - len(r)), constant_values=IGNORE_INDEX) for r in predicted_rows]),
            np.stack([np.pad(r, (0, width - len(r))) for r in score_rows]),
            encoded["example"], encoded["word_index"], [len(s[0]) for s in sentences])
        results = []
        for item, (words, text, starts), ids, probs in zip(inputs, sentences, predicted, scores):
            tags = [self.learned.tags[t] for t in ids]
            result = {**item, "tokens": words, "predicted": tags}
            if self.entities:
                result["entities"] = entity_spans(tags, probs, text, starts, words)
            else:
                result["scores"] = [round(float(p), 6) for p in probs]
            results.append(result)
        return results


# --- rows ----------------------------------------------------------------------------------------------
def _class_label(feature: Any) -> datasets.ClassLabel | None:
    """The ClassLabel inside a sequence feature (conll2003's ``ner_tags``), if any."""
    inner = getattr(feature, "feature", None)
    return inner if isinstance(inner, datasets.ClassLabel) else None


def _tag_name(value: Any) -> str:
    """Tags are kept as names: numbers become their text (``5`` -> ``"5"``)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return "" if value is None else str(value).strip()


def _check_sentence(tokens: Any, tags: Any, classes: datasets.ClassLabel | None, index: dict[str, int],
                    d: TokenClassificationData) -> tuple[list[str], str | None]:
    """(tag names, problem or None) of one row."""
    if not isinstance(tokens, list) or not tokens:
        return [], f"empty sentence: no words in column {d.tokens_column!r}"
    for i, word in enumerate(tokens):
        if not isinstance(word, str) or not word.strip():
            return [], f"word {i + 1} is empty or not text ({word!r}) in column {d.tokens_column!r}"
    if not isinstance(tags, list):
        return [], f"column {d.tags_column!r} must hold a list of tags, one per word; got {tags!r}"
    if len(tags) != len(tokens):
        return [], (f"{len(tokens)} words in column {d.tokens_column!r} but {len(tags)} tags in column "
                    f"{d.tags_column!r}: one tag per word")
    names = []
    for i, tag in enumerate(tags):
        if classes is not None and isinstance(tag, int) and 0 <= tag < classes.num_classes:
            names.append(classes.int2str(tag))
        else:
            names.append(_tag_name(tag))
        if names[-1] not in index:
            known = ", ".join(list(index)[:12]) + (", ..." if len(index) > 12 else "")
            return [], (f"tag {names[-1]!r} of word {i + 1} ({tokens[i]!r}) is not among the training split's tags "
                        f"({known})")
    return names, None


def word_starts(tokens: Sequence[str], text: Any, column: str | None) -> tuple[str, list[int], str | None]:
    """(sentence text, first character of each word in it, problem or None). Without a text, the words are
    joined with single spaces; with one, each word must occur in it after the previous word."""
    if column is None:
        starts, position = [], 0
        for word in tokens:
            starts.append(position)
            position += len(word) + 1
        return " ".join(tokens), starts, None
    if not isinstance(text, str) or not text.strip():
        return "", [], f"empty or missing text in column {column!r}"
    starts, position = [], 0
    for i, word in enumerate(tokens):
        found = text.find(word, position)
        if found < 0:
            return "", [], f"word {i + 1} ({word!r}) does not occur in column {column!r} after character {position}"
        starts.append(found)
        position = found + len(word)
    return text, starts, None


def count_stray_tags(tags: Sequence[str]) -> int:
    """Entity-inside tags (I-X, E-X) that follow neither B-X nor I-X: conlleval starts an entity there."""
    stray, previous = 0, "O"
    for tag in tags:
        if tag[:2] in ("I-", "E-") and previous not in (f"B-{tag[2:]}", f"I-{tag[2:]}"):
            stray += 1
        previous = tag
    return stray


def split_words(text: str) -> tuple[list[str], list[int]]:
    """Words of a raw text and their first characters: white-space separated chunks with leading
    ``OPENERS`` and trailing ``CLOSERS`` split off, one character each (``"(Paris)."`` -> ``( Paris ) .``)."""
    words, starts = [], []
    for chunk in _CHUNK.finditer(text):
        start, end = chunk.span()
        trailing = []
        while start < end and text[start] in OPENERS:
            words.append(text[start])
            starts.append(start)
            start += 1
        while end > start and text[end - 1] in CLOSERS:
            end -= 1
            trailing.insert(0, end)
        if start < end:
            words.append(text[start:end])
            starts.append(start)
        for position in trailing:
            words.append(text[position])
            starts.append(position)
    return words, starts


# --- tokenizer -------------------------------------------------------------------------------------------
_PROBE = ("Hello", "world")


def words_match_running_text(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether a word given as a pre-split word gets the sub-tokens it has inside running text (a word after
    a space), e.g. ``Ġworld`` for byte-level BPE."""
    alone = tokenizer(list(_PROBE), is_split_into_words=True, add_special_tokens=False)
    second_alone = [t for t, w in zip(alone["input_ids"], alone.word_ids()) if w == 1]
    running = tokenizer(" ".join(_PROBE), add_special_tokens=False, return_offsets_mapping=True)
    second_running = [t for t, (start, end) in zip(running["input_ids"], running["offset_mapping"])
                      if end > len(_PROBE[0])]
    return second_alone == second_running


def add_word_prefix(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make every pre-split word start as after a space: ``add_prefix_space`` for byte-level BPE pre-tokenizers
    (GPT-2, RoBERTa, Llama 3, SmolLM), a ``▁`` before every word for SentencePiece (Metaspace) ones. The change
    lives in the tokenizer's ``tokenizer.json``, so the tokenizer saved with a run keeps it."""
    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer
    pre = backend.pre_tokenizer
    parts = []
    if isinstance(pre, pre_tokenizers.Sequence):
        while True:
            try:
                parts.append(pre[len(parts)])
            except IndexError:
                break
    elif pre is not None:
        parts = [pre]
    for part in parts:
        if isinstance(part, pre_tokenizers.ByteLevel):
            part.add_prefix_space = True
        elif isinstance(part, pre_tokenizers.Metaspace):
            part.prepend_scheme = "always"
    backend.pre_tokenizer = pre
    if hasattr(tokenizer, "add_prefix_space"):
        tokenizer.add_prefix_space = True
        tokenizer.init_kwargs["add_prefix_space"] = True


def special_tokens_around(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a sentence (``[CLS]``, ``[SEP]``; ``<s>``, ``</s>``)."""
    encoded = tokenizer(["a"], is_split_into_words=True)
    inside = [i for i, word in enumerate(encoded.word_ids()) if word is not None]
    ids = encoded["input_ids"]
    return list(ids[:inside[0]]), list(ids[inside[-1] + 1:])


# --- windows ---------------------------------------------------------------------------------------------
def plan_windows(word_lengths: Sequence[int], budget: int, stride: int) -> list[tuple[int, int, int]]:
    """Cut a sentence between words into windows of at most ``budget`` sub-tokens: ``(first, own, end)`` per
    window, where words ``own`` to ``end - 1`` are the window's own (labelled, predicted) and ``first`` to
    ``own - 1`` context repeated from before (at most ``stride`` sub-tokens). Own words tile the sentence: each
    word is own in exactly one window. A word longer than ``budget`` alone is its own window (it is cut)."""
    windows: list[tuple[int, int, int]] = []
    own, n = 0, len(word_lengths)
    while own < n:
        first, used = own, 0
        if windows:
            while first > 0 and used + word_lengths[first - 1] <= stride:
                first -= 1
                used += word_lengths[first]
        if used + word_lengths[own] > budget:  # no room for the next word after the context: drop it
            first, used = own, 0
        end = own
        while end < n and used + word_lengths[end] <= budget:
            used += word_lengths[end]
            end += 1
        end = max(end, own + 1)
        windows.append((first, own, end))
        own = end
    return windows


def encode_windows(tokenizer: PreTrainedTokenizerBase, sentences: Sequence[Sequence[str]],
                   tags: Sequence[Sequence[int]] | None, *, max_length: int, stride: int,
                   specials: tuple[Sequence[int], Sequence[int]], continuation: Sequence[int] | None = None,
                   ) -> dict[str, list]:
    """Sentences (lists of words) -> window features: ``input_ids`` (specials + the window's sub-tokens),
    ``labels`` (the tag id on each own word's first sub-token; on its other sub-tokens the ``continuation`` of
    that tag, or -100 without one; -100 on context words and specials; all -100 without ``tags``),
    ``word_index`` (the word on each own word's first sub-token, else -1), ``example`` (the sentence's position
    in ``sentences``) and ``length``."""
    prefix, suffix = list(specials[0]), list(specials[1])
    budget = max_length - len(prefix) - len(suffix)
    fallback = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.pad_token_id
    encoded = tokenizer([list(words) for words in sentences], is_split_into_words=True, add_special_tokens=False)
    out: dict[str, list] = {"input_ids": [], "labels": [], "word_index": [], "example": [], "length": []}
    for i, words in enumerate(sentences):
        pieces: list[list[int]] = [[] for _ in words]
        for token, word in zip(encoded["input_ids"][i], encoded.word_ids(i)):
            if word is not None:
                pieces[word].append(token)
        pieces = [piece or [fallback] for piece in pieces]  # a word the tokenizer drops still gets a token
        for first, own, end in plan_windows([len(p) for p in pieces], budget, stride):
            ids, labels, word_index = list(prefix), [IGNORE_INDEX] * len(prefix), [-1] * len(prefix)
            for w in range(first, end):
                piece = pieces[w][:budget]
                ids += piece
                if w < own:
                    labels += [IGNORE_INDEX] * len(piece)
                    word_index += [-1] * len(piece)
                    continue
                word_index += [w] + [-1] * (len(piece) - 1)
                if tags is None:
                    labels += [IGNORE_INDEX] * len(piece)
                else:
                    tag = tags[i][w]
                    rest = continuation[tag] if continuation is not None else IGNORE_INDEX
                    labels += [tag] + [rest] * (len(piece) - 1)
            ids += suffix
            labels += [IGNORE_INDEX] * len(suffix)
            word_index += [-1] * len(suffix)
            for key, value in zip(out, (ids, labels, word_index, i, len(ids))):
                out[key].append(value)
    return out


def _encode_batch(batch: dict[str, list], indices: list[int], tokenizer: PreTrainedTokenizerBase,
                  **settings: Any) -> dict[str, list]:
    """``datasets.map`` over prepared examples: :func:`encode_windows`, ``example`` = the row in the split."""
    encoded = encode_windows(tokenizer, batch["tokens"], batch["tags"], **settings)
    encoded["example"] = [indices[i] for i in encoded["example"]]
    return encoded


# --- predictions -------------------------------------------------------------------------------------------
def word_predictions(predicted: np.ndarray, scores: np.ndarray, feature_example: Sequence[int],
                     feature_word_index: Sequence[Sequence[int]],
                     sentence_lengths: Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-position predictions of all features (rows in feature order) -> one tag id and its probability per
    word of each sentence. Every word must be predicted exactly once."""
    if len(predicted) != len(feature_example):
        raise FinetuneError(f"got {len(predicted)} prediction rows for {len(feature_example)} features")
    tags = [np.full(n, -1, dtype=np.int64) for n in sentence_lengths]
    probs = [np.zeros(n, dtype=np.float64) for n in sentence_lengths]
    for row, (example, word_index) in enumerate(zip(feature_example, feature_word_index)):
        word_index = np.asarray(word_index)
        positions = np.nonzero(word_index >= 0)[0]
        words = word_index[positions]
        if (tags[example][words] >= 0).any():
            raise FinetuneError(f"sentence {example + 1}: a word is predicted by two windows")
        tags[example][words] = predicted[row, positions]
        probs[example][words] = scores[row, positions]
    for example, row in enumerate(tags):
        if (row < 0).any():
            raise FinetuneError(f"sentence {example + 1}: word {int(np.argmax(row < 0)) + 1} has no prediction")
    return tags, probs


def entity_spans(tags: Sequence[str], scores: Sequence[float], text: str, starts: Sequence[int],
                 tokens: Sequence[str]) -> list[dict[str, Any]]:
    """Entities of a tag sequence (seqeval's reading: a stray I-X starts one) as character spans of ``text``,
    each with the mean probability of its words' tags."""
    from seqeval.metrics.sequence_labeling import get_entities

    spans = []
    for kind, first, last in get_entities(list(tags)):
        start, end = starts[first], starts[last] + len(tokens[last])
        spans.append({"text": text[start:end], "type": kind, "start": start, "end": end,
                      "score": round(float(np.mean(scores[first:last + 1])), 6)})
    return spans
