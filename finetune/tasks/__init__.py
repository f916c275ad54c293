"""The task registry (``run.task`` names one of these), and a finished run's task restored from its files."""

from __future__ import annotations

from pathlib import Path

import datasets
from transformers import AutoTokenizer

from finetune.config import Config
from finetune.errors import ConfigError, RunFolderError
from finetune.models import Checkpoint, load_tokenizer
from finetune.run_folder import TASK_FILE, read_task_file
from finetune.tasks.base import Task
from finetune.tasks.classification import ClassificationTask
from finetune.tasks.generation import GenerationTask
from finetune.tasks.question_answering import QuestionAnsweringTask
from finetune.tasks.summarization import SummarizationTask
from finetune.tasks.token_classification import TokenClassificationTask
from finetune.tasks.translation import TranslationTask

TASKS: dict[str, type[Task]] = {
    ClassificationTask.name: ClassificationTask,
    GenerationTask.name: GenerationTask,
    QuestionAnsweringTask.name: QuestionAnsweringTask,
    SummarizationTask.name: SummarizationTask,
    TokenClassificationTask.name: TokenClassificationTask,
    TranslationTask.name: TranslationTask,
}


def task_class(name: str) -> type[Task]:
    """The registered task called ``name``; a one-line error naming the known ones."""
    if name not in TASKS:
        raise ConfigError(f"config key 'run.task' must be one of {', '.join(sorted(TASKS))}; got {name!r}")
    return TASKS[name]


def new_task(config: Config, checkpoint: Checkpoint, raw: datasets.DatasetDict) -> Task:
    """The task of a new run: built from the config, taught by the source's training split (and the
    checkpoint), bound to the checkpoint's tokenizer."""
    task = task_class(config.run.task)(config)
    task.bind(task.learn(raw, checkpoint), load_tokenizer(checkpoint, config.model))
    return task


def load_task(config: Config, weights: Path) -> Task:
    """The task of a finished run, bound to what it learned in training (the weights folder's task file)
    and to the tokenizer saved beside the weights."""
    name, learned = read_task_file(weights)
    if name != config.run.task:
        raise RunFolderError(f"{weights / TASK_FILE} is for task {name}, but the run's config says {config.run.task}")
    task = task_class(name)(config)
    tokenizer = AutoTokenizer.from_pretrained(str(weights), trust_remote_code=config.model.trust_remote_code)
    task.bind(task.Learned.from_dict(learned, str(weights / TASK_FILE)), tokenizer)
    return task


__all__ = ["TASKS", "Task", "load_task", "new_task", "task_class"]
