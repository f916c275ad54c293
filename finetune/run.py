"""The run folder: create it without clobbering a finished run, and load a trained run back."""

from __future__ import annotations

import datetime
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from finetune.config import Config, load_config
from finetune.errors import RunFolderError
from finetune.models import load_adapter, resolve_checkpoint
from finetune.tasks import TASKS, Task

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"  # written last: its presence marks a finished run
ADAPTER_DIR = "adapter"  # LoRA runs: peft adapter + tokenizer + task artifacts
MODEL_DIR = "model"  # full fine-tuning runs: the whole model + tokenizer + task artifacts


def default_run_name(recipe_name: str) -> str:
    return f"{recipe_name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """Create the folder; refuse to overwrite a finished run or silently reuse an unfinished one."""
    if run_dir.exists() and any(run_dir.iterdir()):
        finished = (run_dir / METRICS_FILE).is_file()
        if overwrite:
            shutil.rmtree(run_dir)
        elif finished:
            raise RunFolderError(f"{run_dir} holds a finished run; choose another run.name or pass --overwrite")
        elif not resume:
            raise RunFolderError(f"{run_dir} holds an unfinished run; pass --resume auto to continue it, "
                                 f"or --overwrite to start again")
    run_dir.mkdir(parents=True, exist_ok=True)


def weights_dir(run_dir: Path) -> Path:
    """The folder holding the trained weights of a run: ``adapter/`` or ``model/`` in a run folder, the
    folder itself for a run pulled from the Hub (weights at the repo root, see ``finetune.hub``)."""
    for name in (ADAPTER_DIR, MODEL_DIR):
        if (run_dir / name).is_dir():
            return run_dir / name
    if is_adapter(run_dir) or (run_dir / "config.json").is_file():
        return run_dir
    raise RunFolderError(f"{run_dir} is not a finished run: no {ADAPTER_DIR}/ or {MODEL_DIR}/ folder")


def is_adapter(folder: Path) -> bool:
    """Whether a weights folder holds a peft adapter (else a whole transformers model)."""
    return (folder / "adapter_config.json").is_file()


def locate_run(ref: str | Path, revision: str | None = None) -> Path:
    """A local run folder, or a Hub id (``org/name``) of a pushed run: downloaded into the Hub cache
    (or found there when offline)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if revision is not None:
            raise RunFolderError(f"--revision {revision} applies to Hub ids; {ref} is a local folder")
        return path
    from finetune.hub import looks_like_hub_id, pull  # late: the Hub client is only needed for ids

    if looks_like_hub_id(str(ref)):
        return pull(str(ref), revision)
    raise RunFolderError(f"run folder not found: {ref} (and it is not an ORG/NAME Hub id)")


@dataclass
class TrainedRun:
    config: Config
    task: Task
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase


def load_run(run_dir: str | Path, overrides: list[str] | None = None, revision: str | None = None) -> TrainedRun:
    """Load a finished run for evaluation or prediction: its config, task, tokenizer and weights.
    ``run_dir`` is a run folder or the Hub id of a pushed run (``revision``: its branch, tag or commit)."""
    run_dir = locate_run(run_dir, revision)
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunFolderError(f"{run_dir} is not a run folder: no {CONFIG_FILE}")
    config = load_config(run_dir / CONFIG_FILE, overrides)
    task = TASKS[config.run.task](config)
    folder = weights_dir(run_dir)
    task.load_artifacts(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if is_adapter(folder):
        base = task.load_model(resolve_checkpoint(config.model))
        model = load_adapter(base, folder)
    else:
        model = task.auto_class.from_pretrained(str(folder), use_safetensors=True)
    model.eval()
    return TrainedRun(config, task, model, tokenizer)
