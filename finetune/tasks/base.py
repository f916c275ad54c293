"""What a task supplies to the one training loop: the parts that differ between tasks.

The loop (``finetune.train``) and the evaluation (``finetune.evaluation``) call only these methods.
A task decides which Auto class to load, how examples become features, how a batch is collated,
what one evaluation step returns per example, and how those outputs become metric inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TextIO

import datasets
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finetune.config import Config
from finetune.models import Checkpoint, load_pretrained, load_tokenizer


class Task:
    """Base class; subclasses live one per file in ``finetune/tasks/``."""

    name: ClassVar[str]
    auto_class: ClassVar[type]
    peft_task_type: ClassVar[str]
    modules_to_save: ClassVar[list[str]] = []
    """Head modules trained fully and saved with a LoRA adapter."""
    metrics_higher_is_better: ClassVar[dict[str, bool]] = {"loss": False}
    """Validation metrics that can pick the best checkpoint (``train.metric_for_best``)."""
    headline_metrics: ClassVar[list[str]] = ["loss"]
    """Metrics printed at the end of a run and put in the model card."""
    stratify_column: ClassVar[str | None] = None
    """A ClassLabel column that held-out splits are stratified on."""
    pipeline_tag: ClassVar[str] = ""
    stream: TextIO | None = None
    """Where a task that generates text writes tokens as they come during ``predict`` (``finetune predict
    --stream``); None: no streaming. Tasks that do not generate ignore it."""

    def __init__(self, config: Config):
        self.config = config

    # --- configuration ---------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: Config) -> None:
        """Reject recipe values this task cannot use (raise ConfigError naming the key)."""
        from finetune.errors import ConfigError

        if config.train.metric_for_best not in cls.metrics_higher_is_better:
            raise ConfigError(f"config key 'train.metric_for_best' must be one of "
                              f"{', '.join(cls.metrics_higher_is_better)} for task {cls.name}; "
                              f"got {config.train.metric_for_best!r}")

    # --- data ------------------------------------------------------------------------------------
    def prepare_raw(self, raw: datasets.DatasetDict) -> datasets.DatasetDict:
        """Check columns and normalise examples before held-out splits are made."""
        return raw

    def describe(self, splits: datasets.DatasetDict) -> list[str]:
        """Lines describing the splits (sizes, label counts) printed before training."""
        return [f"{name}: {len(split)} examples" for name, split in splits.items()]

    def preprocess(self, examples: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                   split: str) -> datasets.Dataset:
        """Examples -> model features (tokenized). Must add a ``length`` column (tokens per feature)."""
        raise NotImplementedError

    def collate(self, features: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
        """Features -> a padded batch of tensors the model accepts."""
        raise NotImplementedError

    # --- model -----------------------------------------------------------------------------------
    def load_tokenizer(self, checkpoint: Checkpoint) -> PreTrainedTokenizerBase:
        return load_tokenizer(checkpoint, self.config.model)

    def load_model(self, checkpoint: Checkpoint) -> PreTrainedModel:
        return load_pretrained(self.auto_class, checkpoint, self.config.model, **self.base_model_kwargs())

    def base_model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments the base model is loaded with (e.g. ``num_labels``): shown in the model
        card's loading code, since a head of another shape cannot take the saved adapter."""
        return {}

    def save_artifacts(self, folder: Path) -> None:
        """Write what inference needs besides weights and tokenizer (e.g. the label map)."""

    def load_artifacts(self, folder: Path) -> None:
        """Read back what :meth:`save_artifacts` wrote."""

    # --- evaluation ------------------------------------------------------------------------------
    def begin_evaluation(self, split: str) -> None:
        """Called before each evaluation pass with what is evaluated (``validation``, ``test`` or a file
        name), so that a task can skip costly work where nothing needs it (e.g. generation)."""

    def eval_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-example outputs of one batch (first dimension = examples); must include ``loss``
        (per-example loss) when the task has one. Tensors of rank >= 2 are padded across processes."""
        raise NotImplementedError

    def compute_metrics(self, outputs: dict[str, np.ndarray], examples: datasets.Dataset,
                        features: datasets.Dataset) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Gathered per-feature outputs (in feature order) -> (metrics, one prediction row per example)."""
        raise NotImplementedError

    def baseline(self, splits: datasets.DatasetDict, test_examples: datasets.Dataset) -> dict[str, Any]:
        """Metrics of a simple baseline that needs no training, on the test examples."""
        return {}

    def preview(self, predictions: list[dict[str, Any]]) -> list[str]:
        """Lines showing a few test predictions, printed at the end of a run (e.g. sample generations)."""
        return []

    # --- inference -------------------------------------------------------------------------------
    def predict(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Raw user inputs -> predictions (used by ``finetune predict``)."""
        raise NotImplementedError
