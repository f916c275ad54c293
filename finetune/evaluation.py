"""Held-out evaluation: length-sorted batches, per-example outputs gathered across processes exactly
once (``gather_for_metrics``), then the task turns them into metrics and prediction rows."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from finetune.config import resolve_mixed_precision
from finetune.data import load_file, load_splits
from finetune.tasks.base import Task

INDEX = "feature_index"


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)


class LengthSortedBatches:
    """Batches of feature indices, longest first (memory peaks at once, little padding). All batches
    are full but the last, and ``batch_size`` is exposed, which is what accelerate needs to shard
    them and to drop the examples it repeats to even out the last round (``gather_for_metrics``)."""

    drop_last = False

    def __init__(self, lengths: list[int], batch_size: int):
        self.order = np.argsort(-np.asarray(lengths), kind="stable").tolist()
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.order), self.batch_size):
            yield self.order[start:start + self.batch_size]


def eval_dataloader(task: Task, features: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                    batch_size: int) -> DataLoader:
    """Length-sorted batches; each carries its feature indices so outputs go back in dataset order."""
    indexed = features.add_column(INDEX, list(range(len(features))))

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = task.collate(rows, tokenizer)
        batch[INDEX] = torch.tensor([row[INDEX] for row in rows], dtype=torch.long)
        return batch

    return DataLoader(indexed, batch_sampler=LengthSortedBatches(features["length"], batch_size), collate_fn=collate)


def evaluate(task: Task, model: torch.nn.Module, dataloader: DataLoader, accelerator: Accelerator,
             examples: datasets.Dataset, features: datasets.Dataset, split: str = "test") -> EvalResult:
    """Run the task's eval step over a prepared dataloader; metrics count each feature once."""
    task.begin_evaluation(split)
    model.eval()
    collected: dict[str, list[np.ndarray]] = {}
    started = time.perf_counter()
    with torch.no_grad():
        for batch in dataloader:
            index = batch.pop(INDEX)
            outputs = task.eval_step(model, batch)
            outputs[INDEX] = index
            for key, value in outputs.items():
                if value.dim() >= 2:  # e.g. token logits: lengths differ between processes
                    value = accelerator.pad_across_processes(value, dim=1, pad_index=task_pad_value(task, key))
                collected.setdefault(key, []).append(accelerator.gather_for_metrics(value).cpu().numpy())
    model.train()
    merged = {key: _concatenate(parts, task_pad_value(task, key)) for key, parts in collected.items()}
    # Feature order, each feature once: np.unique keeps the first copy should a repeated example
    # that evened out the last round across processes ever survive the gathering.
    index, first = np.unique(merged.pop(INDEX), return_index=True)
    if len(index) != len(features):
        raise RuntimeError(f"evaluation gathered {len(index)} of {len(features)} features")
    merged = {key: value[first] for key, value in merged.items()}
    metrics, predictions = task.compute_metrics(merged, examples, features)
    metrics["eval_seconds"] = round(time.perf_counter() - started, 3)
    return EvalResult(metrics, predictions)


def make_accelerator(mixed_precision: str, **kwargs: Any) -> Accelerator:
    """A fresh Accelerator (see :func:`reset_accelerator_state`)."""
    reset_accelerator_state()
    return Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision), **kwargs)


def reset_accelerator_state() -> None:
    """Accelerate keeps its settings in process-wide singletons that refuse a second mixed-precision mode,
    so a second run in one process (tests, notebooks, the bench's Trainer) clears them first; the process
    group of a distributed launch (PartialState) is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def task_pad_value(task: Task, key: str) -> float:
    return getattr(task, "eval_pad_values", {}).get(key, 0)


def _concatenate(parts: list[np.ndarray], pad_value: float) -> np.ndarray:
    """Concatenate batches whose trailing dimension may differ (padded to the longest)."""
    if parts[0].ndim >= 2:
        width = max(p.shape[1] for p in parts)
        parts = [np.pad(p, [(0, 0), (0, width - p.shape[1])] + [(0, 0)] * (p.ndim - 2), constant_values=pad_value)
                 for p in parts]
    return np.concatenate(parts, axis=0)


def evaluate_run(run, split: str = "test", file=None) -> EvalResult:
    """Evaluate a loaded run (``finetune.run.TrainedRun``) on one of its held-out splits, rebuilt
    exactly as in training (same seed, same caps), or on a labelled file."""

    config, task = run.config, run.task
    if file is not None:
        raw = datasets.DatasetDict({config.data.test_split: load_file(file)})
        examples = task.prepare_raw(raw)[config.data.test_split]
    else:
        examples = load_splits(task, config)[split]
    features = task.preprocess(examples, run.tokenizer, split)
    accelerator = make_accelerator(config.train.mixed_precision)
    model, dataloader = accelerator.prepare(run.model, eval_dataloader(task, features, run.tokenizer,
                                                                       config.eval.batch_size))
    return evaluate(task, model, dataloader, accelerator, examples, features, split=str(file or split))
