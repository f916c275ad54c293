"""The one training loop, for every task, on Accelerate.

Read it top to bottom like a ``run_*_no_trainer.py`` script: data -> model -> LoRA -> dataloaders ->
optimizer and schedule -> (resume) -> loop with accumulation, clipping, logging, evaluation, best
checkpoint and early stopping -> test evaluation of the best weights -> run folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler

from finetune import report
from finetune.config import Config, dump_config, resolve_mixed_precision
from finetune.data import load_splits
from finetune.errors import FinetuneError
from finetune.evaluation import EvalResult, eval_dataloader, evaluate
from finetune.models import apply_lora, count_parameters, resolve_checkpoint, write_source
from finetune.run import ADAPTER_DIR, CONFIG_FILE, MODEL_DIR, default_run_name, prepare_run_dir
from finetune.tasks import TASKS, Task

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"  # written last inside a checkpoint: marks it complete
BEST_DIR = "best"
LOG_FILE = "train_log.jsonl"


# --- data ---------------------------------------------------------------------------------------------
class LengthGroupedBatchSampler:
    """Seeded batches of indices, reproducible for a (seed, epoch): shuffled, and when grouping by
    length, sorted inside chunks of 50 batches so a batch holds similar lengths (less padding)
    while the batch order stays random. Resume skips batches of this exact order."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).numpy()
        if self.group_by_length:
            chunk = self.batch_size * 50
            order = np.concatenate([
                part[np.argsort(-self.lengths[part], kind="stable")]
                for part in np.split(order, range(chunk, len(order), chunk))
            ])
        batches = [order[i:i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        if self.group_by_length:
            batch_order = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in batch_order]
        yield from batches


def train_dataloader(task: Task, features: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                     config: Config) -> DataLoader:
    t = config.train
    sampler = LengthGroupedBatchSampler(features["length"], t.batch_size, config.run.seed, t.group_by_length)
    return DataLoader(features, batch_sampler=sampler, collate_fn=lambda rows: task.collate(rows, tokenizer),
                      num_workers=t.num_workers, pin_memory=torch.cuda.is_available(),
                      # its own generator: creating an iterator must not draw from the global RNG,
                      # or a resumed run's dropout masks would differ from an uninterrupted one
                      generator=torch.Generator().manual_seed(config.run.seed))


# --- optimisation ------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.train.learning_rate)


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


# --- checkpoints -------------------------------------------------------------------------------------
def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainerState, keep: int) -> Path:
    """Write a resumable checkpoint atomically: into a temporary folder, renamed when complete."""
    final = run_dir / CHECKPOINTS_DIR / f"step-{state.global_step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a folder without its state file is half-written)."""
    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("step-") and not p.name.endswith(".tmp")
                  and (p / STATE_FILE).is_file())


def find_resume_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """``auto`` -> the newest complete checkpoint of this run (None if there is none), else a path."""
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FinetuneError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE})")
        return path
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save_trainable(model: torch.nn.Module, path: Path) -> None:
    """The trainable weights (LoRA + head, or everything for full fine-tuning) as safetensors."""
    tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def load_trainable(model: torch.nn.Module, path: Path) -> None:
    missing = set(load_file(str(path))) - {name for name, _ in model.named_parameters()}
    if missing:
        raise FinetuneError(f"{path}: weights do not match the model ({sorted(missing)[:3]} ...)")
    model.load_state_dict(load_file(str(path)), strict=False)


# --- the loop ----------------------------------------------------------------------------------------
def train(config: Config, recipe_name: str, overwrite: bool = False, resume: str | None = None) -> Path:
    """Train, evaluate on the test split, and write the run folder. Returns the run folder."""
    t = config.train
    mixed_precision = resolve_mixed_precision(t.mixed_precision)
    accelerator = Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=t.trackers or None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False),
    )
    set_seed(config.run.seed)
    task = TASKS[config.run.task](config)

    # Run folder: the main process names it; every process must use the same name.
    name = [config.run.name or default_run_name(recipe_name)]
    broadcast_object_list(name)
    config.run.name = name[0]
    run_dir = Path(config.run.output_dir) / config.run.name
    if accelerator.is_main_process:
        prepare_run_dir(run_dir, overwrite=overwrite, resume=resume is not None)
        dump_config(config, run_dir / CONFIG_FILE)
    accelerator.wait_for_everyone()
    accelerator.print(f"run folder: {run_dir}")

    # Checkpoint, tokenizer and data.
    checkpoint = resolve_checkpoint(config.model)
    accelerator.print(f"model: {checkpoint.requested} ({checkpoint.source}: {checkpoint.path})")
    tokenizer = task.load_tokenizer(checkpoint)
    with accelerator.main_process_first():
        splits = load_splits(task, config)
        features = datasets.DatasetDict({name: task.preprocess(split, tokenizer, name)
                                         for name, split in splits.items()})
    for line in task.describe(splits):
        accelerator.print(line)

    # Model, with LoRA unless the recipe asks for full fine-tuning.
    model = task.load_model(checkpoint)
    model = apply_lora(model, config.lora, task.peft_task_type, task.modules_to_save)
    trainable, total = count_parameters(model)
    accelerator.print(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%), "
                      f"{config.lora.method}, mixed precision: {mixed_precision}")

    train_dl = train_dataloader(task, features["train"], tokenizer, config)
    valid_dl = eval_dataloader(task, features["validation"], tokenizer, config.eval.batch_size)
    optimizer = make_optimizer(model, config)
    model, optimizer, train_dl, valid_dl = accelerator.prepare(model, optimizer, train_dl, valid_dl)

    steps_per_epoch = math.ceil(len(train_dl) / t.gradient_accumulation_steps)
    max_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    # The prepared scheduler steps once per process per optimizer step, hence the scaling.
    scheduler = get_scheduler(t.scheduler, optimizer,
                              num_warmup_steps=int(t.warmup_ratio * max_steps) * accelerator.num_processes,
                              num_training_steps=max_steps * accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)
    if t.trackers:
        accelerator.init_trackers(config.run.name, config=report.flatten(config.to_dict()))

    test_dl = accelerator.prepare(eval_dataloader(task, features["test"], tokenizer, config.eval.batch_size))
    state = TrainerState()
    before: EvalResult | None = None
    if config.eval.before_training and resume is None:
        # LoRA starts as an identity (B = 0), so this is the base model (a fresh head for classifiers).
        before = evaluate(task, model, test_dl, accelerator, splits["test"], features["test"])
        accelerator.print("test before training: " + report.format_metrics(before.metrics))
    if resume is not None:
        found = find_resume_checkpoint(run_dir, resume)
        if found is None:
            accelerator.print("no complete checkpoint to resume from; starting from the beginning")
        else:
            accelerator.load_state(str(found))
            state = TrainerState(**json.loads((found / STATE_FILE).read_text(encoding="utf-8")))
            accelerator.print(f"resumed from {found} (step {state.global_step}, epoch {state.epoch}, "
                              f"batch {state.batches_in_epoch})")
    if accelerator.is_main_process:
        write_source(run_dir / "source.json", checkpoint)
        report.truncate_log(run_dir / LOG_FILE, state.global_step)

    effective_batch = t.batch_size * accelerator.num_processes * t.gradient_accumulation_steps
    accelerator.print(f"training: {max_steps} optimizer steps, {num_epochs} epoch(s) of {steps_per_epoch} steps, "
                      f"effective batch {effective_batch} = {t.batch_size} per device x "
                      f"{accelerator.num_processes} process(es) x {t.gradient_accumulation_steps} accumulation")

    higher_is_better = task.metrics_higher_is_better[t.metric_for_best]
    progress = tqdm(total=max_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc="training", dynamic_ncols=True)
    window_loss, window_batches, window_tokens, window_samples = 0.0, 0, 0, 0
    window_start = time.perf_counter()
    stop = state.global_step >= max_steps

    def run_validation() -> None:
        """Evaluate on validation, log, keep the best weights, count patience."""
        result = evaluate(task, model, valid_dl, accelerator, splits["validation"], features["validation"],
                          split="validation")
        value = float(result.metrics[t.metric_for_best])
        improved = state.best_metric is None or (value > state.best_metric if higher_is_better
                                                 else value < state.best_metric)
        if improved:
            state.best_metric, state.best_step, state.evals_without_improvement = value, state.global_step, 0
            if accelerator.is_main_process:
                save_trainable(accelerator.unwrap_model(model), run_dir / BEST_DIR / "trainable.safetensors")
        else:
            state.evals_without_improvement += 1
        state.last_eval_step = state.global_step
        record = {"step": state.global_step, "epoch": round(state.global_step / steps_per_epoch, 4),
                  "split": "validation", **report.scalars(result.metrics)}
        if accelerator.is_main_process:
            report.append_log(run_dir / LOG_FILE, record)
        accelerator.log({f"validation/{k}": v for k, v in report.scalars(result.metrics).items()},
                        step=state.global_step)
        progress.write(f"step {state.global_step}: validation " + report.format_metrics(result.metrics)
                       + (" (best)" if improved else ""))

    model.train()
    for epoch in range(state.epoch, num_epochs):
        if stop:
            break
        train_dl.set_epoch(epoch)
        skip = state.batches_in_epoch if epoch == state.epoch else 0
        # skip_first_batches drops indices from the batch sampler: no data is loaded for skipped batches.
        epoch_dl = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        state.epoch, state.batches_in_epoch = epoch, skip
        for batch in epoch_dl:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state.batches_in_epoch += 1
            window_loss += loss.detach().float().item()
            window_batches += 1
            window_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            window_samples += batch["input_ids"].shape[0]
            if not accelerator.sync_gradients:
                continue
            if not math.isfinite(window_loss):
                raise FinetuneError(f"loss is {window_loss} at step {state.global_step + 1}; lower "
                                    f"train.learning_rate or check the data")
            state.global_step += 1
            progress.update(1)
            if state.global_step % t.log_every_steps == 0 or state.global_step == max_steps:
                elapsed = time.perf_counter() - window_start
                # Throughput of the whole job: every process processed its own share.
                tokens = accelerator.reduce(torch.tensor(window_tokens, device=accelerator.device), "sum").item()
                samples = accelerator.reduce(torch.tensor(window_samples, device=accelerator.device), "sum").item()
                record = {"step": state.global_step, "epoch": round(state.global_step / steps_per_epoch, 4),
                          "loss": round(window_loss / window_batches, 6), "lr": scheduler.get_last_lr()[0],
                          "tokens_per_second": round(tokens / elapsed, 1),
                          "samples_per_second": round(samples / elapsed, 2)}
                if accelerator.is_main_process:
                    report.append_log(run_dir / LOG_FILE, record)
                accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=state.global_step)
                progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
                window_loss, window_batches, window_tokens, window_samples = 0.0, 0, 0, 0
                window_start = time.perf_counter()
            end_of_epoch = state.batches_in_epoch == len(train_dl)
            done = state.global_step >= max_steps
            if (t.eval_every_steps and state.global_step % t.eval_every_steps == 0) or end_of_epoch or done:
                run_validation()
                if t.early_stopping_patience and state.evals_without_improvement >= t.early_stopping_patience:
                    accelerator.print(f"early stopping: no improvement of {t.metric_for_best} in "
                                      f"{state.evals_without_improvement} evaluations")
                    done = True
            if end_of_epoch:
                state.epoch, state.batches_in_epoch = epoch + 1, 0
            if (t.save_every_steps and state.global_step % t.save_every_steps == 0) or end_of_epoch or done:
                save_checkpoint(accelerator, run_dir, state, t.keep_checkpoints)
            if done:
                stop = True
                break
    progress.close()

    # Final evaluation of the best weights on the test split, then the run folder.
    unwrapped = accelerator.unwrap_model(model)
    if (run_dir / BEST_DIR / "trainable.safetensors").is_file():
        load_trainable(unwrapped, run_dir / BEST_DIR / "trainable.safetensors")
        accelerator.print(f"best checkpoint: step {state.best_step} ({t.metric_for_best} {state.best_metric:.4f})")
    result = evaluate(task, model, test_dl, accelerator, splits["test"], features["test"])
    baseline = task.baseline(splits, splits["test"])
    if accelerator.is_main_process:
        out = run_dir / (ADAPTER_DIR if config.lora.method == "lora" else MODEL_DIR)
        unwrapped.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        task.save_artifacts(out)
        summary = finish_metrics(result, baseline, splits, state, config, trainable, total)
        if before is not None:
            summary["before_training"] = before.metrics
        report.write_run(run_dir, config, task, result, summary)
        report.print_summary(task, summary)
        for line in task.preview(result.predictions):
            print(line)
    accelerator.end_training()
    return run_dir


def finish_metrics(result: EvalResult, baseline: dict[str, Any], splits: datasets.DatasetDict,
                   state: TrainerState, config: Config, trainable: int, total: int) -> dict[str, Any]:
    """The content of ``metrics.json``."""
    return {
        "test": result.metrics,
        "baseline": baseline,
        "best_step": state.best_step,
        "best_validation": {config.train.metric_for_best: state.best_metric},
        "global_step": state.global_step,
        "split_sizes": {name: len(split) for name, split in splits.items()},
        "parameters": {"trainable": trainable, "total": total},
    }
