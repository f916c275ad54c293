"""The run folder: the one place that names its files, and the rules for creating one.

    runs/<name>/
        config.yaml             the resolved config (``finetune train config.yaml`` repeats the run)
        source.json             where the base checkpoint came from
        train_log.jsonl         one record per logging step and per validation
        before_training.json    test metrics of the untouched base model (eval.before_training)
        checkpoints/step-N/     resumable checkpoints (accelerate state + trainer_state.json)
        best/trainable.safetensors   the best trainable weights so far
        adapter/ or model/      the trained weights, tokenizer and task.json (what the task learned)
        predictions_test.jsonl  one prediction per test example
        mistakes_test.jsonl     the most confident wrong test predictions (tasks that pick them)
        confusion_matrix.png    test labels against predictions (tasks that count them)
        curves.png, README.md   training curves; the model card
        metrics.json            written last: its presence marks a finished run

A run pushed to the Hub keeps the weights folder's files at the repo root (see ``finetune.hub``), so the
same class reads a pulled snapshot: :meth:`RunFolder.weights` is then the folder itself.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path
from typing import Any

from finetune.errors import RunFolderError

TASK_FILE = "task.json"
"""In the weights folder: the task's name and what it learned from the training data."""
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
CHECKPOINT_STATE = "trainer_state.json"
"""In a checkpoint folder, written last: step, epoch, position in the epoch, best metric."""


class RunFolder:
    """Paths of one run's files (each a property); nothing outside this module spells a file name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.json")
    log = property(lambda self: self.path / "train_log.jsonl")
    curves = property(lambda self: self.path / "curves.png")
    predictions = property(lambda self: self.path / "predictions_test.jsonl")
    mistakes = property(lambda self: self.path / "mistakes_test.jsonl")
    confusion_matrix = property(lambda self: self.path / "confusion_matrix.png")
    card = property(lambda self: self.path / "README.md")
    source = property(lambda self: self.path / "source.json")
    before_training = property(lambda self: self.path / "before_training.json")
    adapter = property(lambda self: self.path / "adapter")
    """LoRA runs: the peft adapter (with the task head), tokenizer and task file."""
    model = property(lambda self: self.path / "model")
    """Full fine-tuning runs: the whole model, tokenizer and task file."""
    checkpoints = property(lambda self: self.path / "checkpoints")
    best_weights = property(lambda self: self.path / "best" / "trainable.safetensors")
    tracker_logs = property(lambda self: self.path / "logs")

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}"

    def weights_for(self, method: str) -> Path:
        """Where a run of this ``lora.method`` writes its weights."""
        return self.adapter if method == "lora" else self.model

    def is_finished(self) -> bool:
        return self.metrics.is_file()

    def weights(self) -> Path:
        """The folder holding the trained weights: ``adapter/`` or ``model/``, or the folder itself for a run
        pulled from the Hub (weights at the repo root)."""
        for folder in (self.adapter, self.model):
            if folder.is_dir():
                return folder
        if is_adapter(self.path) or (self.path / MODEL_CONFIG).is_file():
            return self.path
        raise RunFolderError(f"{self.path} is not a finished run: no {self.adapter.name}/ or {self.model.name}/ "
                             f"folder")

    def create(self, overwrite: bool, resume: bool) -> None:
        """Create the folder; refuse to overwrite a finished run or silently reuse an unfinished one."""
        if self.path.exists() and any(self.path.iterdir()):
            if overwrite:
                shutil.rmtree(self.path)
            elif self.is_finished():
                raise RunFolderError(f"{self.path} holds a finished run; choose another run.name or pass --overwrite")
            elif not resume:
                raise RunFolderError(f"{self.path} holds an unfinished run; pass --resume auto to continue it, "
                                     f"or --overwrite to start again")
        self.path.mkdir(parents=True, exist_ok=True)


def default_run_name(recipe_name: str) -> str:
    return f"{recipe_name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def is_adapter(folder: Path) -> bool:
    """Whether a weights folder holds a peft adapter (else a whole transformers model)."""
    return (folder / ADAPTER_CONFIG).is_file()


def write_task_file(folder: Path, task: str, learned: dict[str, Any]) -> None:
    """``task.json`` in a weights folder: which task, and what it learned from the training data."""
    text = json.dumps({"task": task, "learned": learned}, indent=2, ensure_ascii=False) + "\n"
    (folder / TASK_FILE).write_text(text, encoding="utf-8")


def read_task_file(folder: Path) -> tuple[str, dict[str, Any]]:
    """(task name, what it learned) from a weights folder; one-line errors for a missing or damaged file."""
    path = folder / TASK_FILE
    if not path.is_file():
        raise RunFolderError(f"{folder} has no {TASK_FILE} (what the task learned from its training data): "
                             f"not a complete run, or one made by an older finetune")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("task"), str) \
            or not isinstance(data.get("learned"), dict):
        raise RunFolderError(f"{path}: expected {{\"task\": NAME, \"learned\": {{...}}}}")
    return data["task"], data["learned"]
