"""The run folder: the one place that names its files, and the rules for creating one.

    runs/<recipe>-<data>-<time>/   (or run.name)
        config.yaml             the resolved config (``finetune train config.yaml`` repeats the run)
        source.json             where the base checkpoint came from
        train_log.jsonl         one record per logging step and per validation
        before_training.json    test metrics of the untouched base model (eval.before_training)
        checkpoints/step-N/     resumable checkpoints (accelerate state + trainer_state.json; with a frozen base,
                                trainable.safetensors instead of the whole model); a finished run keeps
                                train.keep_checkpoints of them (none by default)
        best/trainable.safetensors   the best trainable weights so far
        adapter/ or model/      the trained weights, tokenizer and task.json (what the task learned)
        predictions_test.jsonl  one prediction per test example
        mistakes_test.jsonl     the most confident wrong test predictions (tasks that pick them)
        confusion_matrix.png    test labels against predictions (tasks that count them)
        curves.png, README.md   training curves; the model card
        report.html             one self-contained page to look at the run (``finetune.report_page``)
        failure.json            only when an error ended the run
        metrics.json            written last: its presence marks a finished run
        export/                 `finetune export`: model-<dtype>.gguf, onnx/ (model.onnx, tokenizer,
                                config.yaml and task.json: predict and serve run it without the run)

A run pushed to the Hub keeps the weights folder's files at the repo root (see ``finetune.hub``), so the
same class reads a pulled snapshot: :meth:`RunFolder.weights` is then the folder itself.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml

from finetune.config import DataConfig
from finetune.errors import RunFolderError

TASK_FILE = "task.json"
"""In the weights folder: the task's name and what it learned from the training data."""
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
CHECKPOINT_STATE = "trainer_state.json"
"""In a checkpoint folder, written last: step, epoch, position in the epoch, best metric."""
TRAINABLE_WEIGHTS = "trainable.safetensors"
"""The trainable weights only (LoRA + head): in ``best/``, and in the checkpoints of a run with a frozen base."""


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
    best_weights = property(lambda self: self.path / "best" / TRAINABLE_WEIGHTS)
    tracker_logs = property(lambda self: self.path / "logs")
    lock_file = property(lambda self: self.path / ".lock")
    """Held (``flock``) by the process that trains into the folder; says who holds it."""

    def entries(self) -> set[str]:
        """The names a run folder may hold at its top level."""
        names = set()
        for value in vars(RunFolder).values():
            path = value.fget(self) if isinstance(value, property) else None
            if isinstance(path, Path) and self.path in path.parents:
                names.add(path.relative_to(self.path).parts[0])
        return names
    report = property(lambda self: self.path / "report.html")
    """One self-contained page: curves, metrics beside baselines, per-class results, the worst errors, config."""
    failure = property(lambda self: self.path / "failure.json")
    """Written when an error ends the run (what failed, at which step, how to resume); gone once it resumes."""
    exports = property(lambda self: self.path / "export")
    """``finetune export``'s default destination."""

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}"

    def complete_checkpoints(self) -> list[Path]:
        """Whole checkpoints (renamed into place, with their state file), oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if p.is_dir() and p.name.startswith("step-")
                      and "." not in p.name and (p / CHECKPOINT_STATE).is_file())

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

    def foreign_entries(self) -> list[str]:
        """What the folder holds that no run writes (a user's own files): never deleted, never adopted."""
        known = self.entries()
        return sorted(p.name + ("/" if p.is_dir() else "") for p in self.path.iterdir()
                      if p.name not in known and not p.name.endswith((".tmp", ".deleting")))

    def is_run(self) -> bool:
        """Recognisably one of our runs: its ``config.yaml`` names a task, and it holds nothing else."""
        try:
            config = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return False
        run = config.get("run") if isinstance(config, dict) else None
        return isinstance(run, dict) and isinstance(run.get("task"), str) and not self.foreign_entries()

    def has_checkpoint(self) -> bool:
        return self.checkpoints.is_dir() and any(
            (p / CHECKPOINT_STATE).is_file() for p in self.checkpoints.iterdir() if "." not in p.name)

    def open_for_training(self, overwrite: bool, resume: str | None) -> RunLock:
        """Take the folder for a training run and return its lock (held until the run ends).

        Only a folder that is recognisably a run is ever cleared or resumed; a user's own folder is refused
        untouched. A finished run is replaced only with ``overwrite``; an unfinished one with a checkpoint is
        continued with ``resume`` or replaced with ``overwrite``; one that never saved a checkpoint (a run
        that failed while starting) holds nothing to resume and is replaced. ``resume="auto"`` needs the run
        to exist; resuming from a checkpoint path may start a new run folder."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path} exists and is not a folder; choose another run.name or run.output_dir")
        existing = self.path.is_dir() and any(p.name != self.lock_file.name for p in self.path.iterdir())
        if existing and not self.is_run():
            listed = ", ".join(self.foreign_entries()[:4]) or f"no {self.config.name} naming a task"
            raise RunFolderError(f"{self.path} is not a finetune run folder ({listed}); it is left as it is: "
                                 f"choose another run.name or run.output_dir")
        if resume == "auto" and not existing:
            raise RunFolderError(f"--resume: there is no run at {self.path} to resume; leave out --resume to "
                                 f"start a new run")
        if existing and self.is_finished() and not overwrite:  # said before the lock file is touched
            raise self._finished(resume is not None)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"cannot create the run folder {self.path} (run.output_dir): "
                                 f"{exc.strerror or exc}") from None
        lock = RunLock.take(self.lock_file)
        try:
            self._clear_if_allowed(existing, overwrite, resume is not None)
        except BaseException:
            lock.release()
            raise
        return lock

    def _clear_if_allowed(self, existing: bool, overwrite: bool, resume: bool) -> None:
        if not existing:
            return
        if self.is_finished() and not overwrite:  # it finished between the first look and the lock
            raise self._finished(resume)
        if resume and not overwrite:
            return
        if not overwrite and self.has_checkpoint():
            raise RunFolderError(f"{self.path} holds an unfinished run; pass --resume auto to continue it, "
                                 f"or --overwrite to start again")
        for entry in self.path.iterdir():  # all ours (is_run), but the lock we hold
            if entry.name != self.lock_file.name:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def _finished(self, resume: bool) -> RunFolderError:
        what = "nothing to resume" if resume else "choose another run.name or pass --overwrite"
        return RunFolderError(f"{self.path} holds a finished run; {what}")


class RunLock:
    """An exclusive ``flock`` on a run folder's lock file. The kernel drops it when the holding process dies,
    however it dies, so a killed run never leaves its folder locked; the file only says who held it last."""

    def __init__(self, path: Path, handle: TextIO):
        self.path, self.handle = path, handle

    @classmethod
    def take(cls, path: Path) -> RunLock:
        handle = path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderError(f"{path.parent} is in use by {holder}; wait for it to end, or choose another "
                                 f"run.name") from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started} "
                     f"({' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]})\n")
        handle.flush()
        return cls(path, handle)

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def default_run_name(recipe_name: str, data: DataConfig) -> str:
    """``<recipe>-<data name>-<time>``: a folder says what it holds, and names sort by time within a recipe+data."""
    return f"{recipe_name}-{data_name(data)}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def data_name(data: DataConfig) -> str:
    """A short name of a run's data for folder names: the built-in set, the training file's stem, or the Hub
    dataset's name (with its configuration)."""
    if data.source == "files":
        file = data.train_file or data.test_file or "files"
        name = Path(file).stem
    elif data.source.startswith("builtin:"):
        name = data.source.removeprefix("builtin:")
    else:
        name = data.source.rsplit("/", 1)[-1] + (f"-{data.hub_config}" if data.hub_config else "")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:40] or "data"


def write_failure(run: RunFolder, exc: BaseException, step: int, elapsed_seconds: float, process: int) -> None:
    """``failure.json``: the error that ended a run, where, and how to resume once its cause is fixed."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    record = {"error": message[:500], "type": type(exc).__name__, "step": step, "process": process,
              "elapsed_seconds": elapsed_seconds, "time": datetime.datetime.now().isoformat(timespec="seconds"),
              "resume": resume_command(run)}
    if run.path.is_dir():
        tmp = run.failure.with_name(f"{run.failure.name}.tmp{process}")
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, run.failure)


def read_failure(run: RunFolder) -> dict[str, Any] | None:
    try:
        return json.loads(run.failure.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def clear_failure(run: RunFolder) -> None:
    run.failure.unlink(missing_ok=True)


def resume_command(run: RunFolder) -> str:
    return f"finetune train {run.config} --resume auto"


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
