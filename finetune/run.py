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
    """The folder holding the trained weights of a run (adapter or full model)."""
    for name in (ADAPTER_DIR, MODEL_DIR):
        if (run_dir / name).is_dir():
            return run_dir / name
    raise RunFolderError(f"{run_dir} is not a finished run: no {ADAPTER_DIR}/ or {MODEL_DIR}/ folder")


@dataclass
class TrainedRun:
    config: Config
    task: Task
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase


def load_run(run_dir: Path, overrides: list[str] | None = None) -> TrainedRun:
    """Load a finished run for evaluation or prediction: its config, task, tokenizer and weights."""
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder not found: {run_dir}")
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunFolderError(f"{run_dir} is not a run folder: no {CONFIG_FILE}")
    config = load_config(run_dir / CONFIG_FILE, overrides)
    task = TASKS[config.run.task](config)
    folder = weights_dir(run_dir)
    task.load_artifacts(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if folder.name == ADAPTER_DIR:
        base = task.load_model(resolve_checkpoint(config.model))
        model = load_adapter(base, folder)
    else:
        model = task.auto_class.from_pretrained(str(folder), use_safetensors=True)
    model.eval()
    return TrainedRun(config, task, model, tokenizer)
