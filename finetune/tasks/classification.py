"""Text classification with BERT-style encoders: single texts or sentence pairs, one label per text
(``single_label``), any number of labels per text (``multi_label``: sigmoid outputs, binary cross-entropy, one
threshold per label tuned on the validation split) or a number (``regression``).

The problem type comes from the data (a list column or ``data.label_separator``: multi-label; a column of
non-integer numbers: regression; anything else: classes) or from ``data.problem_type``. Beside every test result:
a constant baseline (majority class, best constant label set, training mean) and a TF-IDF (word 1-2 grams) +
linear model trained on the same training split and scored on the same test rows.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification

from finetune.config import Config, DataConfig, EvalConfig, check
from finetune.data import GROUP, INPUT_LENGTH, auto_max_length, describe_split, require_columns, training_split
from finetune.errors import ConfigError, DataError
from finetune.metrics import load_metric
from finetune.models import Checkpoint, load_tokenizer
from finetune.tasks.base import Learned, Task

PROBLEM_TYPES = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
                 "regression": "regression"}
"""``data.problem_type`` -> transformers' ``problem_type`` of the model config."""
METRICS = {
    "single_label": {"loss": False, "accuracy": True, "macro_f1": True},
    "multi_label": {"loss": False, "micro_f1": True, "macro_f1": True, "samples_f1": True, "subset_accuracy": True},
    "regression": {"loss": False, "mse": False, "mae": False, "pearson": True, "spearman": True},
}
"""Validation metrics per problem type (``train.metric_for_best``), higher-is-better."""
LENGTH_SAMPLE = 10_000
"""``data.max_length: auto`` measures at most this many (seeded) training texts."""
THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)
"""Candidate multi-label thresholds tuned on validation."""


@dataclass
class ClassificationData(DataConfig):
    """``data`` keys of the classification task."""

    measures_lengths = True
    keeps_groups = True

    text_column: str = "text"
    text_pair_column: str | None = None
    """Second text for sentence-pair classification or regression (e.g. similarity scores)."""
    label_column: str = "label"
    problem_type: Literal["auto", "single_label", "multi_label", "regression"] = "auto"
    """``auto``: multi-label when the label column holds lists (or ``label_separator`` is set), regression when it
    holds non-integer numbers, else one class per row."""
    label_separator: str | None = None
    """Multi-label from text: the labels of a row are its label value split on this (e.g. ``,`` or ``|``)."""
    max_length: int | Literal["auto"] = "auto"
    """Tokens per example (text and pair together); ``auto``: the smallest multiple of 8 covering the 95th
    percentile of the training texts, capped by the model's limit."""

    def validate(self) -> None:
        super().validate()
        check(self.label_separator is None or self.label_separator != "", "data.label_separator",
              "a non-empty string or null", self.label_separator)
        check(self.label_separator is None or self.problem_type in ("auto", "multi_label"), "data.label_separator",
              f"null when data.problem_type is {self.problem_type}", self.label_separator)


@dataclass
class ClassificationEval(EvalConfig):
    """``eval`` keys of the classification task."""

    tfidf_baseline: bool = True
    """Also train TF-IDF (word 1-2 grams) + a linear model on the training split and score it on the test split."""
    mistakes: int = 50
    """How many of the most confident wrong test predictions go to ``mistakes_test.jsonl`` (0: none)."""

    def validate(self) -> None:
        super().validate()
        check(self.mistakes >= 0, "eval.mistakes", ">= 0", self.mistakes)


@dataclass(frozen=True)
class ClassificationLearned(Learned):
    labels: tuple[str, ...]
    """Class names in head order: the training split's ClassLabel names, or its label values sorted (numbers
    as numbers); empty for regression."""
    problem_type: str = "single_label"
    """``single_label``, ``multi_label`` or ``regression``."""
    max_length: int = 128
    """Tokens per example: ``data.max_length``, or what ``auto`` chose from the training texts."""
    thresholds: tuple[float, ...] = ()
    """Multi-label: one decision threshold per label, tuned on the validation split after training (empty before:
    0.5 is used)."""
    target_mean: float = 0.0
    """Regression: the training labels' mean and standard deviation; the model learns standardized targets."""
    target_std: float = 1.0


class ClassificationTask(Task):
    name = "classification"
    Data = ClassificationData
    Eval = ClassificationEval
    Learned = ClassificationLearned
    auto_class = AutoModelForSequenceClassification
    peft_task_type = "SEQ_CLS"
    # The pooler (BERT's dense + tanh over [CLS]) is trained fully with the head: a sentence-embedding checkpoint
    # (all-MiniLM-L6-v2 was trained through mean pooling) never trained it, and LoRA alone adapts it slowly
    # (Brown sentences by genre, 150 steps: test accuracy 0.33 against 0.25, macro-F1 0.23 against 0.13).
    modules_to_save = ["classifier", "score", "pooler"]
    metrics_higher_is_better = {k: v for metrics in METRICS.values() for k, v in metrics.items()}
    input_columns = ("text", "text_pair")
    stratify_column = "label"
    pipeline_tag = "text-classification"
    streams = True
    predict_example = '--text "what a lovely day"'
    data: ClassificationData
    eval: ClassificationEval
    learned: ClassificationLearned

    @classmethod
    def validate_config(cls, config: Config) -> None:
        super().validate_config(config)
        kind = config.data.problem_type
        if kind != "auto":
            _check_metric_for_best(config.train.metric_for_best, kind)

    # --- what depends on the problem type -----------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.learned.problem_type

    @property
    def headline_metrics(self) -> list[str]:  # type: ignore[override]
        return {"single_label": ["accuracy", "macro_f1"], "multi_label": ["micro_f1", "macro_f1", "samples_f1",
                "subset_accuracy"], "regression": ["mse", "mae", "pearson", "spearman"]}[self.kind]

    @property
    def calibrates(self) -> bool:  # type: ignore[override]
        return self.kind == "multi_label"

    # --- learn -----------------------------------------------------------------------------------
    def learn(self, raw: datasets.DatasetDict, checkpoint: Checkpoint) -> ClassificationLearned:
        """The problem type, the label names (at least two classes) or the target's scale, and the max length."""
        d = self.data
        train, where = training_split(raw, d)
        require_columns(train, self._column_keys(), where)
        kind = self._problem_type(train, where)
        _check_metric_for_best(self.config.train.metric_for_best, kind, d.label_column)
        values = train[d.label_column][:]
        labels: list[str] = []
        mean, std = 0.0, 1.0
        if kind == "regression":
            targets = np.array([_number(v, row, d.label_column, where) for row, v in enumerate(values)])
            mean, std = float(targets.mean()), float(targets.std()) or 1.0
        elif kind == "multi_label":
            labels = sorted({name for row, v in enumerate(values) for name in self._label_list(v, row, where)},
                            key=_label_order)
            if len(labels) < 2:
                raise DataError(f"{where}: label column {d.label_column!r} has {len(labels)} distinct label(s) "
                                f"({', '.join(labels)}); multi-label needs at least 2")
        else:
            labels = _label_names(train, d.label_column, where)
            if len(labels) < 2:
                raise DataError(f"{where}: label column {d.label_column!r} has {len(labels)} class "
                                f"({', '.join(labels)}); need at least 2")
        max_length = self._max_length(train, checkpoint)
        return ClassificationLearned(tuple(labels), kind, max_length, target_mean=mean, target_std=std)

    def _column_keys(self) -> dict[str, str]:
        d = self.data
        keys = {d.text_column: "data.text_column", d.label_column: "data.label_column"}
        if d.text_pair_column:
            keys[d.text_pair_column] = "data.text_pair_column"
        if d.group_column:
            keys[d.group_column] = "data.group_column"
        return keys

    def _problem_type(self, train: datasets.Dataset, where: str) -> str:
        d = self.data
        if d.problem_type != "auto":
            return d.problem_type
        feature = train.features[d.label_column]
        if d.label_separator is not None or _is_list_feature(feature):
            return "multi_label"
        if isinstance(feature, datasets.Value) and feature.dtype.startswith("float"):
            if any(v is not None and not float(v).is_integer() for v in train[d.label_column][:]):
                return "regression"
        return "single_label"

    def _max_length(self, train: datasets.Dataset, checkpoint: Checkpoint) -> int:
        """``data.max_length``, or the ``auto`` choice from (a seeded sample of) the training texts."""
        d = self.data
        tokenizer = load_tokenizer(checkpoint, self.config.model)
        limit = model_length_limit(tokenizer, checkpoint, self.config.model)
        if d.max_length != "auto":
            if int(d.max_length) > limit:  # an explicit length is never cut silently
                raise ConfigError(f"config key 'data.max_length' must be at most {limit}, the positions this model "
                                  f"has (or its tokenizer's model_max_length); got {d.max_length}")
            self.length_note = f"data.max_length={d.max_length}"
            return int(d.max_length)
        sample = train if len(train) <= LENGTH_SAMPLE else train.shuffle(seed=self.config.run.seed).select(
            range(LENGTH_SAMPLE))
        texts = [t if isinstance(t, str) else "" for t in sample[d.text_column][:]]
        pairs = [t if isinstance(t, str) else "" for t in sample[d.text_pair_column][:]] if d.text_pair_column else None
        lengths = token_counts(tokenizer, texts, pairs)
        chosen = auto_max_length(lengths, limit)
        p95 = float(np.percentile(lengths, 95))
        self.length_note = (f"data.max_length=auto -> {chosen} tokens (p95 of {len(lengths):,} training texts is "
                            f"{p95:g}; the smallest multiple of 8 covering it" + (
                                f", capped by the model's limit of {limit})" if chosen == limit and p95 > limit
                                else f"; model limit {limit})"))
        return chosen

    def _label_list(self, value: Any, row: int, where: str) -> list[str]:
        """The labels of one multi-label row: a list, or a string split on ``data.label_separator``; empty
        allowed."""
        d = self.data
        if value is None:
            return []
        if isinstance(value, (list, tuple)):
            names = [_label_name(v) for v in value]
        elif isinstance(value, str) and d.label_separator is not None:
            names = [part.strip() for part in value.split(d.label_separator)]
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            names = [_label_name(value)]
        else:
            raise DataError(f"{where}: row {row + 1}, column {d.label_column!r}: expected a list of labels, got "
                            f"{value!r}")
        return list(dict.fromkeys(n for n in names if n))

    # --- data ------------------------------------------------------------------------------------
    def prepare(self, raw: datasets.DatasetDict) -> datasets.DatasetDict:
        """Keep text(s), label (and group); check texts; encode labels with what was learned."""
        d = self.data
        columns = [d.text_column] + ([d.text_pair_column] if d.text_pair_column else [])
        result = {}
        for split, dataset in raw.items():
            where = describe_split(raw, split, d)
            # Groups matter where held-out splits are carved (train, checked in learn); a test file needs none.
            grouped = d.group_column is not None and d.group_column in dataset.column_names
            require_columns(dataset, {k: v for k, v in self._column_keys().items() if v != "data.group_column"}, where)
            keep = list(dict.fromkeys(columns + [d.label_column] + ([d.group_column] if grouped else [])))
            dataset = dataset.select_columns(keep)
            for column in columns:
                _check_texts(dataset, column, where)
            result[split] = self._encode(dataset, where)
        return datasets.DatasetDict(result)

    def _encode(self, dataset: datasets.Dataset, where: str) -> datasets.Dataset:
        d, names = self.data, list(self.learned.labels)
        values = dataset[d.label_column][:]
        if self.kind == "regression":
            encoded, feature = [_number(v, row, d.label_column, where) for row, v in enumerate(values)], \
                datasets.Value("float64")
        elif self.kind == "multi_label":
            index = {name: i for i, name in enumerate(names)}
            encoded, feature = [], datasets.Sequence(datasets.Value("float32"))
            for row, value in enumerate(values):
                hot = [0.0] * len(names)
                for name in self._label_list(value, row, where):
                    if name not in index:
                        raise DataError(f"{where}: row {row + 1}, column {d.label_column!r}: label {name!r} is not "
                                        f"among the training labels ({', '.join(names)})")
                    hot[index[name]] = 1.0
                encoded.append(hot)
        else:
            index = {name: i for i, name in enumerate(names)}
            source = dataset.features[d.label_column]
            if not isinstance(source, datasets.ClassLabel):
                _check_single_labels(values, d.label_column, where)
            labels = [source.int2str(v) if isinstance(source, datasets.ClassLabel) else _label_name(v) for v in values]
            for row, value in enumerate(labels):
                if value not in index:
                    raise DataError(f"{where}: row {row + 1}, column {d.label_column!r}: label {value!r} is not among "
                                    f"the training labels ({', '.join(names)})")
            encoded, feature = [index[v] for v in labels], datasets.ClassLabel(names=names)
        grouped = d.group_column is not None and d.group_column in dataset.column_names
        group = dataset[d.group_column][:] if grouped else None
        dataset = dataset.remove_columns([d.label_column] + ([d.group_column] if grouped else []))
        renames = {d.text_column: "text"} | ({d.text_pair_column: "text_pair"} if d.text_pair_column else {})
        dataset = dataset.rename_columns({k: v for k, v in renames.items() if k != v})
        if group is not None:
            dataset = dataset.add_column(GROUP, [None if g is None else str(g) for g in group])
        return dataset.add_column("label", encoded, feature=feature)

    def prepare_stream(self, stream: datasets.IterableDataset, where: str) -> datasets.IterableDataset:
        """:meth:`prepare` row by row: texts checked, labels encoded with the names learned from the first
        streamed rows (a label that appears only later stops the run, naming it)."""
        d, names = self.data, list(self.learned.labels)
        index = {name: i for i, name in enumerate(names)}
        renames = {d.text_column: "text"} | ({d.text_pair_column: "text_pair"} if d.text_pair_column else {})
        selected = list(renames) + [d.label_column]

        def check_row(row: dict[str, Any]) -> dict[str, Any]:
            for column in renames:
                if not isinstance(row[column], str) or not row[column].strip():
                    raise DataError(f"{where}: a streamed row has an empty or missing text in column {column!r} "
                                    f"({row[column]!r}); row: {_shorten(row)}")
            value = row[d.label_column]
            if isinstance(value, (list, tuple, dict)) or _label_name(value) not in index:
                raise DataError(f"{where}: a streamed row has label {value!r} (column {d.label_column!r}), not "
                                f"among the labels of the first streamed rows ({', '.join(names)}); row: "
                                f"{_shorten(row)}")
            return {new: row[old] for old, new in renames.items()} | {"label": index[_label_name(value)]}

        features = datasets.Features({new: datasets.Value("string") for new in renames.values()}
                                     | {"label": datasets.ClassLabel(names=names)})
        return stream.select_columns(selected).map(
            check_row, features=features, remove_columns=[c for c in selected if c not in features])

    def describe(self, splits: datasets.DatasetDict) -> list[str]:
        lines = [getattr(self, "length_note", f"data.max_length={self.learned.max_length}")]
        for name, split in splits.items():
            text = f"{name}: {len(split)} examples"
            if GROUP in split.column_names:
                text += f" in {len(set(split[GROUP][:]))} groups"
            if self.kind == "regression":
                y = np.asarray(split["label"][:], dtype=float)
                text += f" (label mean {y.mean():.4g}, std {y.std():.4g}, min {y.min():.4g}, max {y.max():.4g})"
            elif self.kind == "multi_label":
                hot = np.asarray(split["label"][:]).reshape(len(split), -1)
                counts = hot.sum(0).astype(int)
                parts = ", ".join(f"{label} {c}" for label, c in zip(self.learned.labels, counts))
                text += (f" ({hot.sum(1).mean():.2f} labels each, {int((hot.sum(1) == 0).sum())} with none; "
                         f"{parts})")
            else:
                counts = collections.Counter(split["label"][:])
                text += " (" + ", ".join(f"{label} {counts.get(i, 0)}" for i, label in
                                         enumerate(self.learned.labels)) + ")"
            lines.append(text)
        return lines

    def features(self, examples: datasets.Dataset, split: str) -> datasets.Dataset:
        max_length, tokenizer = self.learned.max_length, self.tokenizer
        has_pair = "text_pair" in examples.column_names

        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            pairs = batch["text_pair"] if has_pair else None
            encoded = tokenizer(batch["text"], pairs, truncation=True, max_length=max_length)
            encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
            encoded[INPUT_LENGTH] = token_counts(tokenizer, batch["text"], pairs)
            return encoded

        # A stream (data.streaming) is tokenized lazily, as it is read; it has no progress bar.
        progress = {"desc": f"tokenizing {split}"} if isinstance(examples, datasets.Dataset) else {}
        return examples.map(tokenize, batched=True, remove_columns=[c for c in examples.column_names if c != "label"],
                            **progress)

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        keep = [{k: v for k, v in f.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                for f in features]
        batch = self.tokenizer.pad(keep, padding=True, pad_to_multiple_of=self.config.train.pad_to_multiple_of,
                                   return_tensors="pt")
        labels = [f["label"] for f in features]
        if self.kind == "single_label":
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        elif self.kind == "multi_label":
            batch["labels"] = torch.tensor(labels, dtype=torch.float32)
        else:  # the model learns standardized targets
            y = torch.tensor(labels, dtype=torch.float32)
            batch["labels"] = (y - self.learned.target_mean) / self.learned.target_std
        return dict(batch)

    # --- model -----------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        kind = PROBLEM_TYPES[self.kind]
        if self.kind == "regression":
            return {"num_labels": 1, "problem_type": kind}
        id2label = dict(enumerate(self.learned.labels))
        return {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()},
                "problem_type": kind}

    # --- evaluation ------------------------------------------------------------------------------
    def eval_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if self.kind == "multi_label":
            loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(-1)
        elif self.kind == "regression":
            logits = logits[:, 0]
            loss = (logits - labels) ** 2
        else:
            loss = F.cross_entropy(logits, labels, reduction="none")
        return {"loss": loss, "logits": logits, "labels": labels}

    def compute_metrics(self, outputs: dict[str, np.ndarray], examples: datasets.Dataset,
                        features: datasets.Dataset) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        metrics: dict[str, Any] = {"loss": float(outputs["loss"].mean())}
        references = examples["label"][:]
        pairs = examples["text_pair"][:] if "text_pair" in examples.column_names else None
        rows = [{"text": text} | ({"text_pair": pairs[i]} if pairs is not None else {})
                for i, text in enumerate(examples["text"][:])]
        if self.kind == "regression":
            predictions = self._destandardize(outputs["logits"])
            truth = np.asarray(references, dtype=np.float64)
            metrics.update(regression_scores(predictions, truth))
            for name in ("pearson", "spearman"):  # constant predictions: no correlation (a number, to rank checkpoints)
                metrics[name] = 0.0 if metrics[name] is None else metrics[name]
            for row, y, p in zip(rows, truth, predictions):
                row.update(label=float(y), prediction=round(float(p), 6), error=round(float(p - y), 6))
        elif self.kind == "multi_label":
            probabilities = _sigmoid(outputs["logits"])
            truth = np.asarray(references).reshape(len(examples), -1).astype(bool)
            thresholds = np.asarray(self.learned.thresholds or (0.5,) * len(self.learned.labels))
            predicted = probabilities >= thresholds
            metrics.update(multi_label_scores(predicted, truth, self.learned.labels))
            metrics["thresholds"] = ("tuned on the validation split" if self.learned.thresholds
                                     else "0.5 (not tuned yet)")
            for name, t in zip(self.learned.labels, thresholds):
                metrics["per_label"][name]["threshold"] = float(t)
            names = np.asarray(self.learned.labels)
            for row, t, p, probs in zip(rows, truth, predicted, probabilities):
                row.update(labels=names[t].tolist(), prediction=names[p].tolist(),
                           scores={n: round(float(x), 6) for n, x in zip(names, probs)})
        else:
            predictions = outputs["logits"].argmax(-1)
            truth = np.asarray(references)
            metrics.update(self._scores(predictions, truth))
            metrics["confusion_matrix"] = confusion_matrix(predictions, truth, self.learned.labels)
            probabilities = _softmax(outputs["logits"])
            for row, y, p, probs in zip(rows, truth, predictions, probabilities):
                row.update(label=self.learned.labels[int(y)], prediction=self.learned.labels[int(p)],
                           score=round(float(probs[p]), 6))
        return metrics, rows

    def _destandardize(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64) * self.learned.target_std + self.learned.target_mean

    def _scores(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, Any]:
        """Accuracy, macro-F1 and per-class precision/recall/F1 through ``evaluate``."""
        labels = list(range(len(self.learned.labels)))
        kwargs = {"predictions": predictions.tolist(), "references": references.tolist()}
        scores: dict[str, Any] = {
            "accuracy": float(load_metric("accuracy").compute(**kwargs)["accuracy"]),
            "macro_f1": float(load_metric("f1").compute(**kwargs, average="macro", labels=labels)["f1"]),
        }
        per_class = {
            name: np.atleast_1d(load_metric(name).compute(**kwargs, average=None, labels=labels, zero_division=0)[name])
            for name in ("precision", "recall", "f1")
        }
        scores["per_class"] = {
            label: {name: float(per_class[name][i]) for name in per_class} for i, label in enumerate(self.learned.labels)
        }
        return scores

    @property
    def _threshold_objective(self) -> str:
        """What multi-label thresholds maximise on validation: ``train.metric_for_best``, or micro-F1 for loss."""
        metric = self.config.train.metric_for_best
        return metric if metric in METRICS["multi_label"] and metric != "loss" else "micro_f1"

    def calibrate(self, outputs: dict[str, np.ndarray]) -> None:
        """Multi-label: one threshold per label tuned on the validation outputs for ``_threshold_objective``."""
        if self.kind != "multi_label":
            return
        thresholds = tune_thresholds(_sigmoid(outputs["logits"]), outputs["labels"] > 0.5, self._threshold_objective)
        self._relearn(dataclasses.replace(self.learned, thresholds=tuple(float(t) for t in thresholds)))

    # --- baselines -------------------------------------------------------------------------------
    def baselines(self, splits: datasets.DatasetDict) -> list[dict[str, Any]]:
        """A constant baseline, and TF-IDF (word 1-2 grams) + a linear model trained on the training split (its
        regularisation picked on the validation split) scored on the same test rows."""
        found = [self.baseline(splits["train"], splits["test"])]
        if self.eval.tfidf_baseline:
            found.append(self.tfidf_baseline(splits["train"], splits["validation"], splits["test"]))
        return found

    def baseline(self, train: datasets.Dataset, test: datasets.Dataset,
                 validation: datasets.Dataset | None = None) -> dict[str, Any]:
        """Majority class; multi-label: the constant label set best by training micro-F1; regression: the training
        mean. Predicted for every test example."""
        if self.kind == "regression":
            mean = float(np.mean(np.asarray(train["label"][:], dtype=np.float64)))
            truth = np.asarray(test["label"][:], dtype=np.float64)
            scores = regression_scores(np.full_like(truth, mean), truth)
            return {"name": f"training mean ({mean:.4g})", **{k: scores[k] for k in ("mse", "mae", "rmse")}}
        if self.kind == "multi_label":
            frequencies = np.asarray(train["label"][:]).reshape(len(train), -1).mean(0)
            chosen = best_constant_labels(frequencies)
            truth = np.asarray(test["label"][:]).reshape(len(test), -1).astype(bool)
            scores = multi_label_scores(np.broadcast_to(chosen, truth.shape), truth, self.learned.labels)
            names = [n for n, c in zip(self.learned.labels, chosen) if c]
            return {"name": f"constant label set ({', '.join(names) or 'none'}) by training frequency",
                    **{k: scores[k] for k in METRICS["multi_label"] if k in scores}}
        majority = collections.Counter(train["label"][:]).most_common(1)[0][0]
        references = np.array(test["label"][:])
        scores = self._scores(np.full_like(references, majority), references)
        return {"name": f"majority class ({self.learned.labels[majority]})", "accuracy": scores["accuracy"],
                "macro_f1": scores["macro_f1"]}

    @classmethod
    def worst_predictions(cls, rows: list[dict[str, Any]], count: int) -> tuple[str, list[dict[str, Any]]]:
        """Wrong labels, the most confident first."""
        wrong = [row for row in rows if row.get("prediction") != row.get("label")]
        worst = sorted(wrong, key=lambda row: -float(row.get("score", 0)))[:count]
        return f"wrong labels, most confident first ({len(wrong)} of {len(rows)} test examples wrong)", worst

    def tfidf_baseline(self, train: datasets.Dataset, validation: datasets.Dataset,
                       test: datasets.Dataset) -> dict[str, Any]:
        """TF-IDF of word 1-2 grams (whole texts, untruncated; a pair's texts vectorized apart) + logistic
        regression (one per label for multi-label, thresholds tuned on validation) or ridge regression; the
        regularisation strength is picked on the validation split."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression, Ridge

        vectorize = _tfidf(train)
        x_train, x_valid, x_test = vectorize(train), vectorize(validation), vectorize(test)
        name = "TF-IDF (word 1-2 grams) + "
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self.kind == "regression":
                y = np.asarray(train["label"][:], dtype=np.float64)
                y_valid = np.asarray(validation["label"][:], dtype=np.float64)
                best = min(((Ridge(alpha=a).fit(x_train, y), a) for a in (0.3, 1.0, 3.0)),
                           key=lambda m: float(np.mean((m[0].predict(x_valid) - y_valid) ** 2)))
                scores = regression_scores(best[0].predict(x_test), np.asarray(test["label"][:], dtype=np.float64))
                return {"name": name + f"ridge regression (alpha {best[1]:g})",
                        **{k: scores[k] for k in ("mse", "mae", "rmse", "pearson", "spearman")}}
            if self.kind == "multi_label":
                y = np.asarray(train["label"][:]).reshape(len(train), -1).astype(int)
                valid_truth = np.asarray(validation["label"][:]).reshape(len(validation), -1).astype(bool)
                valid_probs, test_probs = np.zeros(valid_truth.shape), np.zeros((len(test), y.shape[1]))
                for j in range(y.shape[1]):
                    if y[:, j].min() == y[:, j].max():  # a label always (or never) present in train: a constant
                        valid_probs[:, j] = test_probs[:, j] = float(y[0, j])
                        continue
                    model = LogisticRegression(C=4.0, solver="saga", max_iter=1000, random_state=0).fit(x_train, y[:, j])
                    valid_probs[:, j] = model.predict_proba(x_valid)[:, 1]
                    test_probs[:, j] = model.predict_proba(x_test)[:, 1]
                thresholds = tune_thresholds(valid_probs, valid_truth, self._threshold_objective)
                truth = np.asarray(test["label"][:]).reshape(len(test), -1).astype(bool)
                scores = multi_label_scores(test_probs >= thresholds, truth, self.learned.labels)
                return {"name": name + "logistic regression per label (thresholds tuned on validation)",
                        **{k: scores[k] for k in METRICS["multi_label"] if k in scores}}
            y, y_valid = np.asarray(train["label"][:]), np.asarray(validation["label"][:])
            metric = self.config.train.metric_for_best if self.config.train.metric_for_best != "loss" else "macro_f1"
            fitted = [LogisticRegression(C=c, solver="saga", max_iter=1000, random_state=0).fit(x_train, y) for c in (1.0, 4.0, 16.0)]
            best = max(fitted, key=lambda m: self._scores(m.predict(x_valid), y_valid)[metric])
            scores = self._scores(best.predict(x_test), np.asarray(test["label"][:]))
            return {"name": name + f"logistic regression (C {best.C:g})", "accuracy": scores["accuracy"],
                    "macro_f1": scores["macro_f1"]}

    def mistakes(self, predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Wrong test predictions, the most confident first (regression: the largest errors first)."""
        if self.kind == "regression":
            ranked = sorted(predictions, key=lambda r: -abs(r["error"]))
        elif self.kind == "multi_label":
            wrong = [r for r in predictions if set(r["labels"]) != set(r["prediction"])]
            thresholds = dict(zip(self.learned.labels, self.learned.thresholds or (0.5,) * len(self.learned.labels)))

            def confidence(row: dict[str, Any]) -> float:
                missed = set(row["labels"]) ^ set(row["prediction"])
                return max(abs(row["scores"][n] - thresholds[n]) for n in missed)

            ranked = sorted(wrong, key=lambda r: -confidence(r))
        else:
            ranked = sorted((r for r in predictions if r["prediction"] != r["label"]), key=lambda r: -r["score"])
        return ranked[:self.eval.mistakes]

    # --- inference -------------------------------------------------------------------------------
    def predict_columns(self) -> dict[str, str]:
        d = self.data
        return {"text": d.text_column} | ({"text_pair": d.text_pair_column} if d.text_pair_column else {})

    def predict(self, model: torch.nn.Module, inputs: list[dict[str, Any]],
                stream: TextIO | None = None) -> list[dict[str, Any]]:
        for row, item in enumerate(inputs):
            if not isinstance(item.get("text"), str) or not item["text"].strip():
                raise DataError(f"input {row + 1}: a classification input needs a non-empty 'text'")
            if self.data.text_pair_column and not isinstance(item.get("text_pair"), str):
                raise DataError(f"input {row + 1}: this run was trained on sentence pairs: give a 'text_pair' "
                                f"(column {self.data.text_pair_column!r}) too")
        results = []
        device = next(model.parameters()).device
        batch_size = self.config.eval.batch_size
        names = self.learned.labels
        thresholds = self.learned.thresholds or (0.5,) * len(names)
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            texts = [item["text"] for item in chunk]
            pairs = [item["text_pair"] for item in chunk] if all("text_pair" in item for item in chunk) else None
            batch = self.tokenizer(texts, pairs, truncation=True, max_length=self.learned.max_length, padding=True,
                                   return_tensors="pt").to(device)
            with torch.no_grad():
                logits = model(**batch).logits.float().cpu().numpy()
            for item, row in zip(chunk, logits):
                if self.kind == "regression":
                    results.append({**item, "prediction": round(float(self._destandardize(row[:1])[0]), 6)})
                elif self.kind == "multi_label":
                    probs = _sigmoid(row)
                    scores = {n: round(float(p), 6) for n, p in zip(names, probs)}
                    results.append({**item, "labels": [n for n, p, t in zip(names, probs, thresholds) if p >= t],
                                    "scores": scores})
                else:
                    scores = {n: round(float(p), 6) for n, p in zip(names, _softmax(row))}
                    label = max(scores, key=scores.get)
                    results.append({**item, "label": label, "score": scores[label], "scores": scores})
        return results


# --- scores --------------------------------------------------------------------------------------------
def regression_scores(predictions: np.ndarray, references: np.ndarray) -> dict[str, Any]:
    """MSE, MAE, RMSE, and Pearson and Spearman correlations (None where undefined: constant predictions)."""
    from scipy import stats

    predictions, references = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
    error = predictions - references
    scores: dict[str, Any] = {"mse": float(np.mean(error ** 2)), "mae": float(np.mean(np.abs(error))),
                              "rmse": float(math.sqrt(np.mean(error ** 2)))}
    constant = np.ptp(predictions) == 0 or np.ptp(references) == 0
    scores["pearson"] = None if constant else float(stats.pearsonr(predictions, references)[0])
    scores["spearman"] = None if constant else float(stats.spearmanr(predictions, references)[0])
    return scores


def multi_label_scores(predicted: np.ndarray, truth: np.ndarray, labels: tuple[str, ...]) -> dict[str, Any]:
    """Micro-, macro- and samples-F1, subset accuracy, and per label precision/recall/F1 and tp/fp/fn/tn counts.

    Samples-F1 averages each example's F1 of its predicted against its true label set, counting an example with
    no true and no predicted label as 1 (a correct empty answer)."""
    predicted, truth = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    tp = (predicted & truth).sum(0)
    fp = (predicted & ~truth).sum(0)
    fn = (~predicted & truth).sum(0)
    tn = (~predicted & ~truth).sum(0)
    per_f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(len(tp)), where=(2 * tp + fp + fn) > 0)
    micro_denominator = 2 * tp.sum() + fp.sum() + fn.sum()
    both = (predicted & truth).sum(1)
    sizes = predicted.sum(1) + truth.sum(1)
    samples = np.where(sizes == 0, 1.0, np.divide(2 * both, sizes, out=np.zeros(len(sizes)), where=sizes > 0))
    per_label = {}
    for i, name in enumerate(labels):
        per_label[name] = {"precision": float(tp[i] / (tp[i] + fp[i])) if tp[i] + fp[i] else 0.0,
                           "recall": float(tp[i] / (tp[i] + fn[i])) if tp[i] + fn[i] else 0.0,
                           "f1": float(per_f1[i]), "support": int(truth[:, i].sum()),
                           "tp": int(tp[i]), "fp": int(fp[i]), "fn": int(fn[i]), "tn": int(tn[i])}
    return {"micro_f1": float(2 * tp.sum() / micro_denominator) if micro_denominator else 0.0,
            "macro_f1": float(per_f1.mean()), "samples_f1": float(samples.mean()),
            "subset_accuracy": float((predicted == truth).all(1).mean()),
            "examples_without_labels": int((truth.sum(1) == 0).sum()), "per_label": per_label}


def tune_thresholds(probabilities: np.ndarray, truth: np.ndarray, objective: str = "micro_f1") -> np.ndarray:
    """One threshold per label from ``THRESHOLD_GRID`` (ties: the one closest to 0.5).

    ``macro_f1``: each label's own best F1 (0.5 for a label with no positive example). Otherwise (``micro_f1``,
    ``samples_f1``, ``subset_accuracy``) coordinate ascent on that metric over all labels, from 0.5, two passes:
    a label the model did not learn then keeps a threshold that does not flood every example with it (its own
    best F1 would often be "predict it everywhere")."""
    probabilities, truth = np.asarray(probabilities, dtype=np.float64), np.asarray(truth, dtype=bool)
    chosen = np.full(probabilities.shape[1], 0.5)
    order = sorted(THRESHOLD_GRID, key=lambda t: abs(t - 0.5))
    if objective == "macro_f1":
        for j in range(probabilities.shape[1]):
            if not truth[:, j].any():
                continue
            best = -1.0
            for t in order:
                predicted = probabilities[:, j] >= t
                f1 = 2 * int((predicted & truth[:, j]).sum()) / (predicted.sum() + truth[:, j].sum())
                if f1 > best + 1e-12:
                    best, chosen[j] = f1, float(t)
        return chosen
    labels = tuple(str(j) for j in range(probabilities.shape[1]))
    best = multi_label_scores(probabilities >= chosen, truth, labels)[objective]
    for _ in range(2):
        for j in range(probabilities.shape[1]):
            current = chosen[j]
            for t in order:
                chosen[j] = t
                score = multi_label_scores(probabilities >= chosen, truth, labels)[objective]
                if score > best + 1e-12:
                    best, current = score, float(t)
            chosen[j] = current
    return chosen


def best_constant_labels(frequencies: np.ndarray) -> np.ndarray:
    """The label set to predict for every example with the best micro-F1 given the training frequencies: labels
    added in order of frequency while that raises micro-F1 = 2 * sum(f in set) / (|set| + sum(all f))."""
    frequencies = np.asarray(frequencies, dtype=np.float64)
    chosen = np.zeros(len(frequencies), dtype=bool)
    total, taken, best = frequencies.sum(), 0.0, 0.0
    for j in np.argsort(-frequencies, kind="stable"):
        score = 2 * (taken + frequencies[j]) / (chosen.sum() + 1 + total)
        if score <= best:
            break
        chosen[j], taken, best = True, taken + frequencies[j], score
    return chosen


def confusion_matrix(predictions: np.ndarray, references: np.ndarray, labels: tuple[str, ...]) -> dict[str, Any]:
    """Counts of (true, predicted) class pairs: rows are the true classes, columns the predicted ones."""
    counts = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(counts, (np.asarray(references, dtype=int), np.asarray(predictions, dtype=int)), 1)
    return {"labels": list(labels), "counts": counts.tolist()}


def model_length_limit(tokenizer: Any, checkpoint: Checkpoint, model_config: Any) -> int:
    """The most tokens the model takes: its position embeddings and the tokenizer's ``model_max_length``."""
    limits = []
    if 0 < getattr(tokenizer, "model_max_length", 0) < 100_000:
        limits.append(int(tokenizer.model_max_length))
    try:
        config = AutoConfig.from_pretrained(checkpoint.path, revision=checkpoint.revision,
                                            trust_remote_code=model_config.trust_remote_code)
        positions = getattr(config, "max_position_embeddings", None)
        if positions:
            # RoBERTa-style models offset positions by the padding index.
            offset = (config.pad_token_id + 1) if getattr(config, "model_type", "") in ("roberta", "xlm-roberta",
                                                                                         "camembert") else 0
            limits.append(int(positions) - offset)
    except (OSError, ValueError):
        pass
    return min(limits) if limits else 512


def token_counts(tokenizer: Any, texts: list[str], pairs: list[str] | None = None) -> list[int]:
    """Tokens of each (text, pair) with special tokens, before any truncation."""
    return [len(ids) for ids in tokenizer(texts, pairs, truncation=False, verbose=False)["input_ids"]]


def _tfidf(train: datasets.Dataset):
    """A function Dataset -> TF-IDF matrix fit on ``train``'s texts (and pairs, vectorized apart)."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    columns = ["text"] + (["text_pair"] if "text_pair" in train.column_names else [])
    fitted = {c: TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1).fit(train[c][:]) for c in columns}

    def vectorize(dataset: datasets.Dataset):
        parts = [fitted[c].transform(dataset[c][:]) for c in columns]
        return parts[0] if len(parts) == 1 else hstack(parts).tocsr()

    return vectorize


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _check_metric_for_best(metric: str, kind: str, column: str | None = None) -> None:
    if metric not in METRICS[kind]:
        why = f" (label column {column!r} makes this {kind})" if column else ""
        raise ConfigError(f"config key 'train.metric_for_best' must be one of {', '.join(METRICS[kind])} for "
                          f"{kind}{why}; got {metric!r}")


def _is_list_feature(feature: Any) -> bool:
    return isinstance(feature, list) or type(feature).__name__ in ("List", "Sequence", "LargeList")


def _number(value: Any, row: int, column: str, where: str) -> float:
    """A regression target: a finite number (or a numeric string); anything else names the row."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number is None or not math.isfinite(number):
        raise DataError(f"{where}: row {row + 1}, column {column!r}: {value!r} is not a number (regression needs a "
                        f"number in every row)")
    return number


def _label_name(value: Any) -> str:
    """Labels are kept as names: numbers become their text (``5`` -> ``"5"``)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return "" if value is None else str(value).strip()


def _label_order(name: str) -> tuple[int, float, str]:
    """Numeric labels sort as numbers ("2" before "10"), names alphabetically."""
    return (0, float(name), name) if _is_number(name) else (1, 0.0, name)


def _label_names(dataset: datasets.Dataset, column: str, where: str) -> list[str]:
    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    _check_single_labels(dataset[column][:], column, where)
    names = {_label_name(v) for v in dataset[column][:]}
    if "" in names:
        row = next(i for i, v in enumerate(dataset[column][:]) if _label_name(v) == "")
        raise DataError(f"{where}: row {row + 1}, column {column!r}: empty label")
    return sorted(names, key=_label_order)


def _check_single_labels(values: list[Any], column: str, where: str) -> None:
    """One label per row: a list or mapping is refused, naming the row."""
    for row, value in enumerate(values):
        if isinstance(value, (list, tuple, dict)):
            raise DataError(f"{where}: row {row + 1}, column {column!r}: a label must be one value, got {value!r}; "
                            f"for several labels per row use data.problem_type=multi_label")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _check_texts(dataset: datasets.Dataset, column: str, where: str) -> None:
    """Texts must be strings; an empty or missing text is a user error naming the row."""
    for row, value in enumerate(dataset[column][:]):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: row {row + 1}, column {column!r}: empty or missing text ({value!r})")


def _shorten(row: dict[str, Any], limit: int = 120) -> str:
    """A row for an error message, cut to ``limit`` characters."""
    text = repr(row)
    return text if len(text) <= limit else text[:limit] + "..."
