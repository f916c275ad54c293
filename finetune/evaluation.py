"""Held-out evaluation: length-sorted batches, per-example outputs gathered across processes exactly
once (``gather_for_metrics``), then the task turns them into metrics and prediction rows."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from finetune.accelerator import make_accelerator
from finetune.batching import INDEX, eval_dataloader
from finetune.data import load_raw, load_splits
from finetune.speed import apply_speed_options
from finetune.tasks.base import Task


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    """The gathered per-feature outputs of ``Task.eval_step`` (what ``Task.calibrate`` tunes on)."""


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
                    value = accelerator.pad_across_processes(value, dim=1, pad_index=task.eval_pad_values.get(key, 0))
                collected.setdefault(key, []).append(accelerator.gather_for_metrics(value).cpu().numpy())
    model.train()
    merged = {key: _concatenate(parts, task.eval_pad_values.get(key, 0)) for key, parts in collected.items()}
    # Feature order, each feature once: np.unique keeps the first copy should a repeated example
    # that evened out the last round across processes ever survive the gathering.
    index, first = np.unique(merged.pop(INDEX), return_index=True)
    if len(index) != len(features):
        raise RuntimeError(f"evaluation gathered {len(index)} of {len(features)} features")
    merged = {key: value[first] for key, value in merged.items()}
    metrics, predictions = task.compute_metrics(merged, examples, features)
    metrics["eval_seconds"] = round(time.perf_counter() - started, 3)
    return EvalResult(metrics, predictions, merged)


def _concatenate(parts: list[np.ndarray], pad_value: float) -> np.ndarray:
    """Concatenate batches whose trailing dimension may differ (padded to the longest)."""
    if parts[0].ndim >= 2:
        width = max(p.shape[1] for p in parts)
        parts = [np.pad(p, [(0, 0), (0, width - p.shape[1])] + [(0, 0)] * (p.ndim - 2), constant_values=pad_value)
                 for p in parts]
    return np.concatenate(parts, axis=0)


def evaluate_run(run: Any, split: str = "test", file: Path | None = None) -> EvalResult:
    """Evaluate a loaded run (``finetune.trained_run.TrainedRun``) on one of its held-out splits, rebuilt
    exactly as in training (same seed, same caps), or on a labelled file.

    The test split gives ``metrics.json``'s test metrics exactly on the machine that trained the run: the same
    examples in the same batches (``eval.batch_size``, sorted by length), the same mixed precision and the same
    speed options (kernels). Elsewhere (another CPU or GPU, another thread count) matrix sums may be
    reduced in another order, so losses can differ in the last digits."""
    config, task = run.config, run.task
    if file is not None:
        # The same task, with the file as its data source: messages about a row name the file.
        data = replace(config.data, source="files", train_file=None, validation_file=None, test_file=str(file))
        task = type(task)(replace(config, data=data))
        task.bind(run.task.learned, run.task.tokenizer)
        examples = task.prepare(load_raw(data, config.run.seed))[data.test_split]
    else:
        examples = load_splits(task, config)[split]
    features = task.features(examples, split)
    accelerator = make_accelerator(config.train.mixed_precision)
    # The same kernels as the evaluation at the end of training: under bf16 the fused LoRA layers round
    # differently from peft's own (4th decimal of the loss); the other options leave evaluation unchanged.
    apply_speed_options(run.model, config.train, config.lora, accelerator.mixed_precision,
                        on_gpu=accelerator.device.type == "cuda")
    model, dataloader = accelerator.prepare(run.model, eval_dataloader(task, features, config.eval.batch_size))
    return evaluate(task, model, dataloader, accelerator, examples, features, split=str(file or split))
