"""Crash-safe, resumable checkpoints and graceful stops.

A checkpoint is ``RunFolder.checkpoint(step)`` (``checkpoints/step-NNNNNNNN/``): what
``accelerator.save_state`` writes (model, optimizer, scheduler, grad scaler, every RNG state) plus the trainer
state file (step, epoch, batches of the epoch already consumed, best metric, patience). It is written into
``step-N.tmp`` and renamed when complete, so a folder without ``.tmp`` and with its state file is whole;
anything else is ignored.

A model with frozen weights (LoRA) is checkpointed by its trainable weights only
(:func:`checkpoint_trainable_only`): the frozen base is the pretrained checkpoint, reloaded by the resumed run
anyway, and for SmolLM2 it would be 500 MB per checkpoint. While training, the newest
max(``train.keep_checkpoints``, 2) checkpoints are kept; a finished run keeps ``train.keep_checkpoints``
(:func:`prune_checkpoints`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from finetune.errors import FinetuneError
from finetune.run_folder import CHECKPOINT_STATE, TRAINABLE_WEIGHTS, RunFolder

logger = logging.getLogger(__name__)

FAULT_ENV = "FINETUNE_FAULT"
"""Fault injection for the crash tests: ``kill-after-step:N`` or ``kill-in-checkpoint:N`` sends SIGKILL
to this process at that point. Unset in normal use."""


@dataclass
class TrainerState:
    """Everything besides model/optimizer/scheduler/RNG (saved by accelerate) needed to resume."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed."""
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    last_eval_step: int = -1
    skipped_batches: int = 0
    """Micro-batches skipped for a non-finite loss (``train.on_nonfinite_loss: skip``)."""
    elapsed_seconds: float = 0.0
    """Wall time of the run up to this checkpoint (what ``finetune runs`` shows for a stopped run)."""

    def improves(self, value: float, higher_is_better: bool) -> bool:
        """Whether a validation metric ``value`` beats the best so far."""
        if self.best_metric is None:
            return True
        return value > self.best_metric if higher_is_better else value < self.best_metric


def inject_fault(point: str, step: int) -> None:
    """Kill this process hard at a named point when the crash tests ask for it."""
    if os.environ.get(FAULT_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


KEPT_WHILE_TRAINING = 2
"""At least this many checkpoints stay while a run trains: resuming falls back past a damaged newest one."""


def checkpoint_trainable_only(accelerator: Accelerator) -> None:
    """Make ``save_state`` / ``load_state`` write and read only the trainable weights of a model that has frozen
    ones (LoRA), as ``trainable.safetensors``; optimizer, scheduler and RNG states are saved as before.

    Through accelerate's state hooks: the model's entry is taken out of what accelerate saves or loads (FSDP and
    DeepSpeed save their models themselves and are left alone). A checkpoint holding a whole model (written
    before this existed) still loads through accelerate."""

    def save(models: list[torch.nn.Module], weights: list[dict[str, torch.Tensor]], folder: str) -> None:
        if len(models) != 1 or len(weights) != 1 or not _has_frozen_weights(models[0]):
            return
        weights.pop()
        if accelerator.is_main_process:
            save_trainable(accelerator.unwrap_model(models[0]), Path(folder) / TRAINABLE_WEIGHTS)

    def load(models: list[torch.nn.Module], folder: str) -> None:
        if len(models) == 1 and (Path(folder) / TRAINABLE_WEIGHTS).is_file():
            load_trainable(accelerator.unwrap_model(models.pop()), Path(folder) / TRAINABLE_WEIGHTS)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _has_frozen_weights(model: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def save_checkpoint(accelerator: Accelerator, run: RunFolder, state: TrainerState, keep: int) -> Path:
    """Write a resumable checkpoint atomically and keep only the newest max(``keep``, 2)."""
    final = run.checkpoint(state.global_step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        # Created before the barrier: save_state writes each process's RNG state into it, and only the
        # main process would create it (a race other processes lose).
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # Every process has written its part (its RNG state; its shards under FSDP / DeepSpeed) before the folder is
    # renamed: accelerate's save_state ends without a barrier, and a slower process would write into a folder
    # that is gone (or re-create it as a stray .tmp).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        inject_fault("kill-in-checkpoint", state.global_step)
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run)[:-max(keep, KEPT_WHILE_TRAINING)]:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run: RunFolder, keep: int) -> None:
    """After a clean finish: keep the newest ``keep`` whole checkpoints, remove the rest (and any half-written
    one); with none left, the checkpoints folder goes too."""
    whole = complete_checkpoints(run)
    for old in whole[:len(whole) - keep] + incomplete_checkpoints(run):
        if old.is_dir():
            _remove(old)
        else:
            old.unlink()
    if run.checkpoints.is_dir() and not any(run.checkpoints.iterdir()):
        run.checkpoints.rmdir()


def _remove(folder: Path) -> None:
    """Rename first (atomic), then delete: a kill mid-delete never leaves a folder that looks whole."""
    trash = folder.with_name(folder.name + ".deleting")
    os.replace(folder, trash)
    shutil.rmtree(trash)


def complete_checkpoints(run: RunFolder) -> list[Path]:
    """Whole checkpoints, oldest first."""
    return run.complete_checkpoints()


def incomplete_checkpoints(run: RunFolder) -> list[Path]:
    folder = run.checkpoints
    if not folder.is_dir():
        return []
    whole = set(complete_checkpoints(run))
    return sorted(p for p in folder.iterdir() if p.name.startswith("step-") and p not in whole)


def check_checkpoint(path: Path) -> Path:
    """``path`` if it is a complete checkpoint folder (``--resume PATH``), else a one-line error."""
    if not (path / CHECKPOINT_STATE).is_file():
        raise FinetuneError(f"--resume {path}: not a complete checkpoint (no {CHECKPOINT_STATE})")
    return path


def load_checkpoint(accelerator: Accelerator, run: RunFolder, resume: str) -> tuple[TrainerState, Path | None]:
    """Restore the newest whole checkpoint (``auto``) or a given one; returns the state and its folder.

    With ``auto``, a half-written folder is skipped, and one that fails to load (truncated files) makes
    it fall back to the previous whole checkpoint; each is said out loud."""
    if resume != "auto":
        path = check_checkpoint(Path(resume))
        return _restore(accelerator, path), path
    for skipped in incomplete_checkpoints(run):
        accelerator.print(f"ignoring incomplete checkpoint {skipped} (it was being written when the run stopped)")
    candidates = complete_checkpoints(run)
    for path in reversed(candidates):
        try:
            return _restore(accelerator, path), path
        except FinetuneError as exc:
            accelerator.print(f"{exc}; falling back to the previous checkpoint")
    if candidates:
        raise FinetuneError(f"no checkpoint of {run.path} could be loaded; start again with --overwrite")
    return TrainerState(), None


def _restore(accelerator: Accelerator, path: Path) -> TrainerState:
    try:
        state = TrainerState(**json.loads((path / CHECKPOINT_STATE).read_text(encoding="utf-8")))
        accelerator.load_state(str(path))
    except Exception as exc:  # truncated safetensors / pickle files raise many different types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FinetuneError(f"checkpoint {path} is damaged ({first[:200]})") from None
    return state


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the model's parameters may live in shards across processes (FSDP, DeepSpeed): then reading or
    writing whole weights is a collective that every process must enter."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def trainable_state(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor] | torch.nn.Module:
    """What :func:`save_trainable` writes, called on every process. Sharded (FSDP2 DTensors, ZeRO-3 partitions):
    the trainable weights gathered whole by ``accelerator.get_state_dict`` (under FSDP2 only the main process
    receives them); otherwise the unwrapped model itself."""
    unwrapped = accelerator.unwrap_model(model)
    if not is_sharded(accelerator):
        return unwrapped
    names = [name for name, p in unwrapped.named_parameters() if p.requires_grad]
    state = accelerator.get_state_dict(model) or {}
    return {name: state[name] for name in names if name in state}


def save_trainable(model: torch.nn.Module | dict[str, torch.Tensor], path: Path) -> None:
    """The trainable weights (LoRA + head, or everything for full fine-tuning), written atomically: a model's
    parameters that require gradients, or the tensors :func:`trainable_state` gathered."""
    if isinstance(model, dict):
        tensors = {name: t.detach().cpu().contiguous() for name, t in model.items()}
    else:
        tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_trainable(model: torch.nn.Module, path: Path) -> None:
    weights = load_file(str(path))
    unknown = set(weights) - {name for name, _ in model.named_parameters()}
    if unknown:
        raise FinetuneError(f"{path}: weights do not match the model ({sorted(unknown)[:3]} ...)")
    model.load_state_dict(weights, strict=False)


def load_trainable_everywhere(accelerator: Accelerator, model: torch.nn.Module, path: Path) -> None:
    """:func:`load_trainable` on every process, into sharded parameters too: FSDP2 scatters the whole tensors to
    its DTensor shards (``set_model_state_dict``), DeepSpeed ZeRO-3 gathers its partitions, lets the main process
    write them, and partitions them again."""
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        names = set(load_file(str(path)))
        params = [p for name, p in unwrapped.named_parameters() if name in names]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if accelerator.is_main_process:
                load_trainable(unwrapped, path)
    elif accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        weights = load_file(str(path))
        unknown = set(weights) - {name for name, _ in unwrapped.named_parameters()}
        if unknown:
            raise FinetuneError(f"{path}: weights do not match the model ({sorted(unknown)[:3]} ...)")
        set_model_state_dict(unwrapped, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        load_trainable(unwrapped, path)


class GracefulStop:
    """SIGINT / SIGTERM ask the loop to stop at the next optimizer step (after a checkpoint);
    a second signal exits at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker): no handlers
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signal is not None:
            os._exit(128 + signum)  # second signal: no cleanup, as asked
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the next step, then stopping "
              f"(send it again to exit at once)", flush=True)

    @property
    def requested(self) -> bool:
        return self.signal is not None


class TrainingInterrupted(FinetuneError):
    """Stopped by a signal after saving a checkpoint; the message says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
