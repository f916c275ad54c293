"""Text classification (single texts or sentence pairs) with BERT-style encoders."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, TextIO

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from finetune.config import DataConfig
from finetune.data import describe_split, require_columns, training_split
from finetune.errors import DataError
from finetune.metrics import load_metric
from finetune.models import Checkpoint
from finetune.tasks.base import Learned, Task


@dataclass
class ClassificationData(DataConfig):
    """``data`` keys of the classification task."""

    text_column: str = "text"
    text_pair_column: str | None = None
    """Second text for sentence-pair classification."""
    label_column: str = "label"


@dataclass(frozen=True)
class ClassificationLearned(Learned):
    labels: tuple[str, ...]
    """Class names in head order: the training split's ClassLabel names, or its label values sorted (numbers
    as numbers)."""


class ClassificationTask(Task):
    name = "classification"
    Data = ClassificationData
    Learned = ClassificationLearned
    auto_class = AutoModelForSequenceClassification
    peft_task_type = "SEQ_CLS"
    modules_to_save = ["classifier", "score"]
    metrics_higher_is_better = {"loss": False, "accuracy": True, "macro_f1": True}
    headline_metrics = ["accuracy", "macro_f1"]
    input_columns = ("text", "text_pair")
    stratify_column = "label"
    pipeline_tag = "text-classification"
    streams = True
    predict_example = '--text "what a lovely day"'
    data: ClassificationData

    # --- learn -----------------------------------------------------------------------------------
    def learn(self, raw: datasets.DatasetDict, checkpoint: Checkpoint) -> ClassificationLearned:
        """The class names of the training split (at least two)."""
        train, where = training_split(raw, self.data)
        require_columns(train, self._column_keys(), where)
        labels = _label_names(train, self.data.label_column, where)
        if len(labels) < 2:
            raise DataError(f"{where}: label column {self.data.label_column!r} has {len(labels)} class "
                            f"({', '.join(labels)}); need at least 2")
        return ClassificationLearned(tuple(labels))

    def _column_keys(self) -> dict[str, str]:
        d = self.data
        keys = {d.text_column: "data.text_column", d.label_column: "data.label_column"}
        if d.text_pair_column:
            keys[d.text_pair_column] = "data.text_pair_column"
        return keys

    # --- data ------------------------------------------------------------------------------------
    def prepare(self, raw: datasets.DatasetDict) -> datasets.DatasetDict:
        """Keep text(s) and label; check texts; encode labels with the learned names (a ClassLabel)."""
        d = self.data
        columns = [d.text_column] + ([d.text_pair_column] if d.text_pair_column else [])
        result = {}
        for split, dataset in raw.items():
            where = describe_split(raw, split, d)
            require_columns(dataset, self._column_keys(), where)
            dataset = dataset.select_columns(columns + [d.label_column])
            for column in columns:
                _check_texts(dataset, column, where)
            result[split] = self._encode_labels(dataset, where)
        return datasets.DatasetDict(result)

    def _encode_labels(self, dataset: datasets.Dataset, where: str) -> datasets.Dataset:
        d, names = self.data, list(self.learned.labels)
        index = {name: i for i, name in enumerate(names)}
        feature = dataset.features[d.label_column]
        if not isinstance(feature, datasets.ClassLabel):
            _check_single_labels(dataset[d.label_column], d.label_column, where)
        values = [feature.int2str(v) if isinstance(feature, datasets.ClassLabel) else _label_name(v)
                  for v in dataset[d.label_column]]
        for row, value in enumerate(values):
            if value not in index:
                raise DataError(f"{where}: row {row + 1}, column {d.label_column!r}: label {value!r} is not among "
                                f"the training labels ({', '.join(names)})")
        dataset = dataset.remove_columns(d.label_column)
        renames = {d.text_column: "text"} | ({d.text_pair_column: "text_pair"} if d.text_pair_column else {})
        dataset = dataset.rename_columns({k: v for k, v in renames.items() if k != v})
        return dataset.add_column("label", [index[v] for v in values], feature=datasets.ClassLabel(names=names))

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
        lines = []
        for name, split in splits.items():
            counts = collections.Counter(split["label"])
            parts = ", ".join(f"{label} {counts.get(i, 0)}" for i, label in enumerate(self.learned.labels))
            lines.append(f"{name}: {len(split)} examples ({parts})")
        return lines

    def features(self, examples: datasets.Dataset, split: str) -> datasets.Dataset:
        max_length, tokenizer = self.data.max_length, self.tokenizer
        has_pair = "text_pair" in examples.column_names

        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            encoded = tokenizer(batch["text"], batch["text_pair"] if has_pair else None,
                                truncation=True, max_length=max_length)
            encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
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
        batch["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
        return dict(batch)

    # --- model -----------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        id2label = dict(enumerate(self.learned.labels))
        return {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}

    # --- evaluation ------------------------------------------------------------------------------
    def eval_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        return {"loss": F.cross_entropy(logits, labels, reduction="none"), "logits": logits, "labels": labels}

    def compute_metrics(self, outputs: dict[str, np.ndarray], examples: datasets.Dataset,
                        features: datasets.Dataset) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        predictions = outputs["logits"].argmax(-1)
        metrics = {"loss": float(outputs["loss"].mean())}
        metrics.update(self._scores(predictions, outputs["labels"]))
        probabilities = torch.softmax(torch.from_numpy(outputs["logits"]), -1).numpy()
        rows = []
        for i, (pred, label) in enumerate(zip(predictions, outputs["labels"])):
            row = {"text": examples[i]["text"]}
            if "text_pair" in examples.column_names:
                row["text_pair"] = examples[i]["text_pair"]
            row.update(label=self.learned.labels[int(label)], prediction=self.learned.labels[int(pred)],
                       score=round(float(probabilities[i, pred]), 6))
            rows.append(row)
        return metrics, rows

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

    def baseline(self, train: datasets.Dataset, test: datasets.Dataset,
                 validation: datasets.Dataset | None = None) -> dict[str, Any]:
        """Majority class of the training split, predicted for every test example."""
        majority = collections.Counter(train["label"]).most_common(1)[0][0]
        references = np.array(test["label"])
        scores = self._scores(np.full_like(references, majority), references)
        return {"name": f"majority class ({self.learned.labels[majority]})", "accuracy": scores["accuracy"],
                "macro_f1": scores["macro_f1"]}

    @classmethod
    def worst_predictions(cls, rows: list[dict[str, Any]], count: int) -> tuple[str, list[dict[str, Any]]]:
        """Wrong labels, the most confident first."""
        wrong = [row for row in rows if row.get("prediction") != row.get("label")]
        worst = sorted(wrong, key=lambda row: -float(row.get("score", 0)))[:count]
        return f"wrong labels, most confident first ({len(wrong)} of {len(rows)} test examples wrong)", worst

    # --- inference -------------------------------------------------------------------------------
    def predict(self, model: torch.nn.Module, inputs: list[dict[str, Any]],
                stream: TextIO | None = None) -> list[dict[str, Any]]:
        for row, item in enumerate(inputs):
            if not isinstance(item.get("text"), str) or not item["text"].strip():
                raise DataError(f"input {row + 1}: a classification input needs a non-empty 'text'")
        results = []
        device = next(model.parameters()).device
        batch_size = self.config.eval.batch_size
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            texts = [item["text"] for item in chunk]
            pairs = [item["text_pair"] for item in chunk] if all("text_pair" in item for item in chunk) else None
            batch = self.tokenizer(texts, pairs, truncation=True, max_length=self.data.max_length, padding=True,
                                   return_tensors="pt").to(device)
            with torch.no_grad():
                probabilities = torch.softmax(model(**batch).logits.float(), -1)
            for item, probs in zip(chunk, probabilities):
                scores = {name: round(float(p), 6) for name, p in zip(self.learned.labels, probs)}
                label = max(scores, key=scores.get)
                results.append({**item, "label": label, "score": scores[label], "scores": scores})
        return results


def _label_name(value: Any) -> str:
    """Labels are kept as names: numbers become their text (``5`` -> ``"5"``)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return "" if value is None else str(value).strip()


def _label_names(dataset: datasets.Dataset, column: str, where: str) -> list[str]:
    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    _check_single_labels(dataset[column], column, where)
    names = {_label_name(v) for v in dataset[column]}
    if "" in names:
        row = next(i for i, v in enumerate(dataset[column]) if _label_name(v) == "")
        raise DataError(f"{where}: row {row + 1}, column {column!r}: empty label")
    # Numeric labels sort as numbers ("2" before "10"), names alphabetically.
    return sorted(names, key=lambda n: (0, float(n), n) if _is_number(n) else (1, 0.0, n))


def _check_single_labels(values: list[Any], column: str, where: str) -> None:
    """One label per row: a list or mapping is refused, naming the row."""
    for row, value in enumerate(values):
        if isinstance(value, (list, tuple, dict)):
            raise DataError(f"{where}: row {row + 1}, column {column!r}: a label must be one value, got {value!r} "
                            f"(several labels per row is multi-label classification, which this task does not do)")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _check_texts(dataset: datasets.Dataset, column: str, where: str) -> None:
    """Texts must be strings; an empty or missing text is a user error naming the row."""
    for row, value in enumerate(dataset[column]):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: row {row + 1}, column {column!r}: empty or missing text ({value!r})")


def _shorten(row: dict[str, Any], limit: int = 120) -> str:
    """A row for an error message, cut to ``limit`` characters."""
    text = repr(row)
    return text if len(text) <= limit else text[:limit] + "..."
