"""The task registry: ``run.task`` names one of these."""

from __future__ import annotations

from finetune.tasks.base import Task
from finetune.tasks.classification import ClassificationTask
from finetune.tasks.generation import GenerationTask
from finetune.tasks.question_answering import QuestionAnsweringTask
from finetune.tasks.translation import TranslationTask

TASKS: dict[str, type[Task]] = {
    ClassificationTask.name: ClassificationTask,
    GenerationTask.name: GenerationTask,
    QuestionAnsweringTask.name: QuestionAnsweringTask,
    TranslationTask.name: TranslationTask,
}

__all__ = ["TASKS", "Task"]
