"""What a task supplies to the one training loop: the parts that differ between tasks.

A task is one file in ``finetune/tasks/`` plus its line in the registry (``finetune/tasks/__init__.py``).
It owns its settings: ``Data`` and ``Eval``, subclasses of the common :class:`~finetune.config.DataConfig`
and :class:`~finetune.config.EvalConfig` with its own keys (recipes write them as ``data.<key>`` and
``eval.<key>``), each checking its values in ``validate``.

The lifecycle, in the order the loop (``finetune.train``) and inference (``finetune.trained_run``) call it:

1. **build**: ``task = Task(config)``; settings only, nothing learned yet.
2. **learn**: ``learned = task.learn(raw, checkpoint)`` returns the one frozen value a task learns
   before training (label names, the data shape, the model kind). It is saved into the run folder's
   ``task.json`` and read back at inference time (``Task.Learned`` is its type).
3. **bind**: ``task.bind(learned, tokenizer)``, once; the task adapts or checks the tokenizer there
   (:meth:`prepare_tokenizer`). What follows may use ``self.learned`` and ``self.tokenizer``.
4. **prepare**: ``task.prepare(raw)``: check each row of each split of the source and normalise columns.
5. **features**: ``task.features(examples, split)``: tokenized features, with a ``length`` column.
6. **collate** a list of features into a batch; **loss** of a batch (training).
7. **evaluate**: ``begin_evaluation`` -> ``eval_step`` per batch -> ``compute_metrics`` on the gathered
   outputs; a task that ``calibrates`` (e.g. decision thresholds) tunes on the validation outputs after training
   (``calibrate``, which updates what it learned) before the test split is scored; ``baselines`` score references
   that need no (or cheap) training on the same test examples; ``mistakes`` picks the test predictions worth a
   look. The prediction rows become ``predictions_test.jsonl``; the report page picks the worst of them with the
   class method ``worst_predictions`` (default: highest ``loss``), and shows what else the files hold by itself
   (``per_class`` metrics as a table, rows with ``label`` and ``prediction`` as a confusion matrix).
8. **predict** on raw user inputs (``finetune predict``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, TextIO

import datasets
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finetune.config import Config, DataConfig, EvalConfig, check
from finetune.errors import RunFolderError
from finetune.models import Checkpoint, load_pretrained
from finetune.run_folder import write_task_file

NON_PAD_TOKENS = "non_pad_tokens"
"""Batch key: how many of a batch's input tokens are real, for a batch that has no attention mask to count them
(packed rows). The loop's throughput reads it; :func:`model_inputs` leaves it out of what the model gets."""
PACKED_SAMPLES = "packed_samples"
"""Batch key: how many samples a batch of packed rows holds (its rows count them otherwise); like
:data:`NON_PAD_TOKENS`, for the loop's throughput only."""


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What of a collated batch goes to the model (all but the loop's own keys)."""
    return {k: v for k, v in batch.items() if k not in (NON_PAD_TOKENS, PACKED_SAMPLES)}


@dataclasses.dataclass(frozen=True)
class Learned:
    """What a task learned before training; subclasses add fields (JSON values: str, int, bool, float,
    tuples of them)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> Learned:
        """Read back what ``dataclasses.asdict`` wrote (lists become tuples); ``where`` names the file."""
        names = {f.name for f in dataclasses.fields(cls)}
        if set(values) != names:
            raise RunFolderError(f"{where}: expected the keys {', '.join(sorted(names)) or 'none'}; got "
                                 f"{', '.join(sorted(values)) or 'none'}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


class Task:
    """Base class; subclasses live one per file in ``finetune/tasks/``."""

    name: ClassVar[str]
    Data: ClassVar[type[DataConfig]] = DataConfig
    """The ``data`` section of this task's recipes."""
    Eval: ClassVar[type[EvalConfig]] = EvalConfig
    """The ``eval`` section of this task's recipes."""
    Learned: ClassVar[type[Learned]] = Learned
    auto_class: ClassVar[type]
    peft_task_type: ClassVar[str]
    modules_to_save: ClassVar[list[str]] = []
    """Head modules trained fully and saved with a LoRA adapter."""
    metrics_higher_is_better: ClassVar[dict[str, bool]] = {"loss": False}
    """Validation metrics that can pick the best checkpoint (``train.metric_for_best``)."""
    headline_metrics: ClassVar[list[str]] = ["loss"]
    """Metrics printed at the end of a run and put in the model card."""
    input_columns: ClassVar[tuple[str, ...]] = ()
    """Columns of prepared examples that hold the model's input: a test example whose input also appears in
    train is counted and reported (it measures memory, not generalisation)."""
    stratify_column: ClassVar[str | None] = None
    """A ClassLabel column of prepared examples that held-out splits are stratified on."""
    eval_pad_values: ClassVar[dict[str, float]] = {}
    """Value that pads each ``eval_step`` output of rank >= 2 across batches and processes (default 0)."""
    pipeline_tag: ClassVar[str] = ""
    streams: ClassVar[bool] = False
    """Whether the task can train on a stream (``data.streaming``): it implements :meth:`prepare_stream`."""
    predict_example: ClassVar[str] = "--input inputs.jsonl"
    """Arguments of an example ``finetune predict`` command, printed at the end of a run."""
    calibrates: ClassVar[bool] = False
    """Whether :meth:`calibrate` tunes something on the validation outputs after training."""

    def __init__(self, config: Config):
        if not isinstance(config.data, self.Data) or not isinstance(config.eval, self.Eval):
            raise TypeError(f"task {self.name} needs a config built with its sections (finetune.recipes.load_config)")
        self.config = config
        self.data = config.data
        """This task's ``data`` section (its own subclass of DataConfig)."""
        self.eval = config.eval
        """This task's ``eval`` section (its own subclass of EvalConfig)."""
        self._learned: Learned | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    # --- 1. build: settings ---------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: Config) -> None:
        """Checks that span sections (each section checks its own keys); raise ConfigError naming the key."""
        check(config.train.metric_for_best in cls.metrics_higher_is_better, "train.metric_for_best",
              f"one of {', '.join(cls.metrics_higher_is_better)} for task {cls.name}", config.train.metric_for_best)
        if config.data.streaming:
            check(cls.streams, "data.streaming", f"false: task {cls.name} does not stream its data (yet)", True)
            check(config.train.max_steps is not None, "train.max_steps",
                  "a number of optimizer steps when data.streaming is true (a stream has no length)", None)

    # --- 2. learn, 3. bind ------------------------------------------------------------------------
    def learn(self, raw: datasets.DatasetDict, checkpoint: Checkpoint) -> Learned:
        """What the source's training split (``finetune.data.training_split(raw, ...)``, before held-out splits
        are carved from it) or the checkpoint teach the task, e.g. the label names."""
        return self.Learned()

    def bind(self, learned: Learned, tokenizer: PreTrainedTokenizerBase) -> None:
        """Fix what was learned and the tokenizer for the rest of the task's life (once)."""
        if self._learned is not None:
            raise RuntimeError(f"task {self.name} is already bound")
        if not isinstance(learned, self.Learned):
            raise TypeError(f"task {self.name} expects {self.Learned.__name__}, got {type(learned).__name__}")
        self._learned = learned
        self._tokenizer = self.prepare_tokenizer(tokenizer)

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        """Adapt or check the tokenizer at bind time (e.g. a pad token, language codes, a fast tokenizer)."""
        return tokenizer

    def save(self, folder: Path) -> None:
        """Write what the task learned into a weights folder (``task.json``); ``finetune.tasks.load_task``
        reads it back."""
        write_task_file(folder, self.name, self.learned.to_dict())

    @property
    def learned(self) -> Learned:
        if self._learned is None:
            raise RuntimeError(f"task {self.name} is not bound yet: call bind(learned, tokenizer) first")
        return self._learned

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        self.learned  # the same error before bind
        return self._tokenizer

    # --- 4. prepare, 5. features, 6. collate and loss -----------------------------------------------
    def prepare(self, raw: datasets.DatasetDict) -> datasets.DatasetDict:
        """Check every row of every split the source has and normalise columns, before held-out splits
        are made. Errors name the file or split, the row and the column."""
        return raw

    def prepare_stream(self, stream: datasets.IterableDataset, where: str) -> datasets.IterableDataset:
        """``data.streaming``: :meth:`prepare` for the training stream, row by row as it is read (lazily, with
        known features so that :meth:`features` can tokenize it on the fly). Errors name ``where`` and the row's
        content (a shuffled stream has no row numbers)."""
        raise NotImplementedError

    def describe(self, splits: datasets.DatasetDict) -> list[str]:
        """Lines describing the splits (sizes, label counts) printed before training."""
        return [f"{name}: {len(split)} examples" for name, split in splits.items()]

    def features(self, examples: datasets.Dataset, split: str) -> datasets.Dataset:
        """Examples -> model features (tokenized). Must add a ``length`` column (tokens per feature)."""
        raise NotImplementedError

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Features -> a padded batch of tensors the model accepts."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss of one batch: the model's own by default."""
        return model(**model_inputs(batch)).loss

    def loss_weight(self, batch: dict[str, Any]) -> int | None:
        """How many items ``loss`` averages over in ``batch`` (e.g. its target tokens), so that the loop can
        train a batch in several passes (``train.max_tokens_per_pass``) weighted by their shares, with the same
        gradient as one pass. None (the default): batches of this task are trained in one pass."""
        return None

    # --- the model --------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments the base model is loaded with (e.g. ``num_labels``): shown in the model
        card's loading code, since a head of another shape cannot take the saved adapter."""
        return {}

    def load_model(self, checkpoint: Checkpoint, **extra: Any) -> PreTrainedModel:
        """The base model; ``extra`` goes to ``from_pretrained`` (e.g. a quantization config for QLoRA)."""
        return load_pretrained(self.auto_class, checkpoint, self.config.model, **self.model_kwargs(), **extra)

    # --- 7. evaluation ------------------------------------------------------------------------------
    def begin_evaluation(self, split: str) -> None:
        """Called before each evaluation pass with what is evaluated (``validation``, ``test`` or a file
        name), so that a task can skip costly work where nothing needs it (e.g. generation)."""

    def eval_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-example outputs of one batch (first dimension = examples); must include ``loss``
        (per-example loss) when the task has one. Tensors of rank >= 2 are padded across processes
        with ``eval_pad_values``."""
        raise NotImplementedError

    def compute_metrics(self, outputs: dict[str, np.ndarray], examples: datasets.Dataset,
                        features: datasets.Dataset) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Gathered per-feature outputs (in feature order) -> (metrics, one prediction row per example)."""
        raise NotImplementedError

    def calibrate(self, outputs: dict[str, np.ndarray]) -> None:
        """Tune what is decided on top of the model's outputs (e.g. thresholds) on the gathered validation outputs of
        the best weights; replaces ``self.learned`` with what was tuned, so that it is saved with the run."""

    def _relearn(self, learned: Learned) -> None:
        """What the task learned, updated after training (by :meth:`calibrate`)."""
        if not isinstance(learned, self.Learned):
            raise TypeError(f"task {self.name} expects {self.Learned.__name__}, got {type(learned).__name__}")
        self._learned = learned

    def baselines(self, splits: datasets.DatasetDict) -> list[dict[str, Any]]:
        """Every reference scored beside the model on the test split, the simplest first (``metrics.json``
        ``baselines``; the first is also ``baseline``). Each: ``name`` and the metrics it has."""
        baseline = self.baseline(splits["train"], splits["test"], splits["validation"])
        return [baseline] if baseline else []

    def mistakes(self, predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The wrong test predictions worth a look, the most confident first (written to the run folder)."""
        return []

    def predict_columns(self) -> dict[str, str]:
        """Input field -> the column of the run's data that holds it (``finetune predict --input`` reads a file in
        the training format through this); empty when inputs are read as they are."""
        return {}

    def baseline(self, train: datasets.Dataset, test: datasets.Dataset,
                 validation: datasets.Dataset | None = None) -> dict[str, Any]:
        """Metrics of a simple baseline that needs no training, on ``test``: fit on ``train`` if at all, any
        setting of it chosen on ``validation`` (never on ``test``)."""
        return {}

    @classmethod
    def worst_predictions(cls, rows: list[dict[str, Any]], count: int) -> tuple[str, list[dict[str, Any]]]:
        """The report page's worst errors (``finetune.report_page``): up to ``count`` rows of the run's
        ``predictions_test.jsonl``, worst first, as the fields to show (a per-row measure may be added), and a
        line saying how they were picked. It reads the rows only (no model, no tokenizer), so the page can be
        written for any finished run. Default: the rows with the highest ``loss``."""
        scored = [row for row in rows if isinstance(row.get("loss"), (int, float))]
        worst = sorted(scored, key=lambda row: -row["loss"])[:count]
        return f"the {len(worst)} test rows with the highest loss, of {len(rows)}", worst

    def preview(self, predictions: list[dict[str, Any]]) -> list[str]:
        """Lines showing a few test predictions, printed at the end of a run (e.g. sample generations)."""
        return []

    # --- 8. inference -------------------------------------------------------------------------------
    def predict(self, model: torch.nn.Module, inputs: list[dict[str, Any]],
                stream: TextIO | None = None) -> list[dict[str, Any]]:
        """Raw user inputs -> predictions (``finetune predict``). A task that generates text writes tokens to
        ``stream`` as they come (``--stream``); the others ignore it."""
        raise NotImplementedError
