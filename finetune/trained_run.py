"""A finished run loaded back for evaluation, prediction, merging, export or serving: its config, its
task bound to what it learned, its tokenizer and its weights. The run is a local folder or the Hub id of
a pushed run (pulled by ``finetune.hub``).

A run's own ``config.yaml`` is data, not a recipe the user wrote: the settings that would run code or
unpickle files (:data:`CODE_SETTINGS`) are never taken from it, only from the user's own command line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from finetune.config import Config, parse_override
from finetune.errors import ModelError, RunFolderError
from finetune.models import Checkpoint, load_adapter, load_pretrained, resolve_checkpoint
from finetune.recipes import load_config
from finetune.report import read_source
from finetune.run_folder import RunFolder, is_adapter
from finetune.tasks import Task, load_task


logger = logging.getLogger(__name__)

CODE_SETTINGS = ("trust_remote_code", "allow_pickle")
"""``model.*`` keys that let loading run code shipped with a checkpoint or unpickle weights."""


@dataclass
class TrainedRun:
    config: Config
    task: Task
    """Bound to what it learned in training and to the run's tokenizer."""
    model: torch.nn.Module

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.task.tokenizer


def locate_run(ref: str | Path, revision: str | None = None) -> RunFolder:
    """A local run folder, or a Hub id (``org/name``) of a pushed run: downloaded into the Hub cache
    (or found there when offline)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if revision is not None:
            raise RunFolderError(f"--revision {revision} applies to Hub ids; {ref} is a local folder")
        return RunFolder(path)
    from finetune.hub import looks_like_hub_id, pull  # late: the Hub client is only needed for ids

    if looks_like_hub_id(str(ref)):
        return RunFolder(pull(str(ref), revision))
    raise RunFolderError(f"run folder not found: {ref} (and it is not an ORG/NAME Hub id)")


def load_run(ref: str | Path, overrides: list[str] | None = None, revision: str | None = None) -> TrainedRun:
    """Load a finished run for evaluation or prediction: its config, task, tokenizer and weights.
    ``ref`` is a run folder or the Hub id of a pushed run (``revision``: its branch, tag or commit)."""
    run = locate_run(ref, revision)
    if not run.config.is_file():
        raise RunFolderError(f"{run.path} is not a run folder: no {run.config.name}")
    if not run.is_finished():
        raise RunFolderError(f"{run.path} is not a finished run (no {run.metrics.name}): it was stopped or failed "
                             f"before its end; resume it with: finetune train {run.config} --resume auto")
    config = without_code_settings(load_config(run.config, overrides), overrides or [], run)
    if not any(o.startswith("model.name_or_path=") for o in overrides or []):
        _check_local_base(ref, run, config)
    folder = run.weights()
    task = load_task(config, folder)
    if is_adapter(folder):
        model = load_adapter(task.load_model(resolve_checkpoint(config.model)), folder)
    else:
        model = load_pretrained(task.auto_class, Checkpoint(str(folder), str(folder), "local"), config.model)
    model.eval()
    return TrainedRun(config, task, model)


def without_code_settings(config: Config, overrides: list[str], run: RunFolder) -> Config:
    """The run's config with :data:`CODE_SETTINGS` off unless the user's own overrides turn them on."""
    given = {parse_override(item)[0] for item in overrides}
    asked = [key for key in CODE_SETTINGS if getattr(config.model, key) and f"model.{key}" not in given]
    for key in asked:
        logger.warning("note: %s sets model.%s: true; a run's own config is not trusted to run or unpickle code, "
                       "so it is off (pass model.%s=true yourself if you trust this run)", run.config, key, key)
    return replace(config, model=replace(config.model, **{key: False for key in asked}))


def _check_local_base(ref: str | Path, run: RunFolder, config: Config) -> None:
    """A run trained from a local base folder needs that folder; a run pulled from the Hub names only the
    folder (no path of the trainer's machine is published), so the user says where their copy is."""
    source = read_source(run)
    name = config.model.name_or_path
    if source and source.get("source") == "local" and not Path(name).expanduser().exists():
        raise ModelError(f"{ref} was trained from a local base model folder named {Path(name).name!r}, which is "
                         f"not here: give model.name_or_path=PATH (where your copy of it is)")
