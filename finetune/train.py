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
import signal
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import (DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list,
                               parse_flag_from_env, set_seed)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler

from finetune import report
from finetune.checkpoints import (GracefulStop, TrainerState, TrainingInterrupted, inject_fault, load_checkpoint,
                                  load_trainable, save_checkpoint, save_trainable)
from finetune.config import Config, dump_config, resolve_mixed_precision
from finetune.data import load_splits
from finetune.errors import FinetuneError
from finetune.evaluation import EvalResult, eval_dataloader, evaluate, make_accelerator
from finetune.models import apply_lora, count_parameters, resolve_checkpoint, write_source
from finetune.run import ADAPTER_DIR, CONFIG_FILE, MODEL_DIR, default_run_name, prepare_run_dir
from finetune.speed import (enable_tf32, fuse_lora_layers, make_adamw, store_frozen_linear_in_bf16,
                            use_cpu_training_attention, use_fast_dropout)
from finetune.tasks import TASKS, Task

logger = logging.getLogger(__name__)

BEST_DIR = "best"
LOG_FILE = "train_log.jsonl"
BEFORE_FILE = "before_training.json"


# --- data ---------------------------------------------------------------------------------------------
class LengthGroupedBatchSampler:
    """Seeded batches of indices, reproducible for a (seed, epoch): shuffled, and when grouping by
    length, sorted inside chunks of 50 batches so a batch holds similar lengths (less padding)
    while the batch order stays random. Resume skips batches of this exact order.

    With several processes only full batches are kept, as many as a multiple of the process count:
    accelerate then deals them out round-robin without padding the epoch with repeated examples, so
    no example is seen twice in an epoch (the few left over change from epoch to epoch)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool,
                 num_processes: int = 1):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.num_processes = num_processes
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.num_processes > 1:
            return len(self.lengths) // self.batch_size // self.num_processes * self.num_processes
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
        if self.num_processes > 1:
            batches = [b for b in batches if len(b) == self.batch_size][:len(self)]
        yield from batches


def train_dataloader(task: Task, features: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                     config: Config, num_processes: int = 1) -> DataLoader:
    t = config.train
    sampler = LengthGroupedBatchSampler(features["length"], t.batch_size, config.run.seed, t.group_by_length,
                                        num_processes)
    workers = dataloader_workers(config)
    return DataLoader(features, batch_sampler=sampler, collate_fn=lambda rows: task.collate(rows, tokenizer),
                      num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None,
                      # its own generator: creating an iterator must not draw from the global RNG,
                      # or a resumed run's dropout masks would differ from an uninterrupted one
                      generator=torch.Generator().manual_seed(config.run.seed))


def dataloader_workers(config: Config) -> int:
    """``train.num_workers``, or its default: 2 prefetching workers on a GPU, none on CPUs."""
    if config.train.num_workers is not None:
        return config.train.num_workers
    return 2 if torch.cuda.is_available() else 0


# --- optimisation ------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return make_adamw(groups, config.train.learning_rate, config.train.fused_optimizer)


def apply_speed_options(model: torch.nn.Module, config: Config, mixed_precision: str, accelerator) -> None:
    """The result-preserving speed options of ``train`` (see ``finetune.speed``), announced in one line."""
    t, notes = config.train, []
    if t.fast_dropout and not torch.cuda.is_available():
        notes.append(f"fast dropout ({use_fast_dropout(model)} layers)")
    if t.base_in_bf16 and mixed_precision == "bf16" and config.lora.method == "lora":
        notes.append(f"frozen base in bf16 ({store_frozen_linear_in_bf16(model) / 1e6:.1f}M weights)")
    if t.fast_attention and not torch.cuda.is_available() and use_cpu_training_attention(model):
        notes.append("CPU training attention")
    if t.fused_lora and config.lora.method == "lora":
        notes.append(f"fused LoRA ({fuse_lora_layers(model)} layers)")
    if t.compile:
        notes.append("torch.compile")
    if notes:
        accelerator.print("speed: " + ", ".join(notes))


# --- the loop ----------------------------------------------------------------------------------------
def train(config: Config, recipe_name: str, overwrite: bool = False, resume: str | None = None) -> Path:
    """Train, evaluate on the test split, and write the run folder. Returns the run folder."""
    t = config.train
    # The process group first: every process must agree on the run folder before anything is written.
    # cpu=: PartialState, unlike Accelerator, does not read ACCELERATE_USE_CPU itself (accelerate 1.15), and
    # without it a torchrun launch on CPUs is a single process each.
    processes = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != processes.num_processes:
        # e.g. `accelerate launch --multi_gpu` on a machine without GPUs: every process would train alone
        # and all of them would write the same run folder.
        raise FinetuneError(f"launched as {launched} processes but Accelerate runs {processes.num_processes}: "
                            f"without GPUs use ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {launched} -m finetune "
                            f"train ... (or make finetune NPROC={launched})")
    if resume is not None and config.run.name is None:
        config.run.name = latest_unfinished_run(Path(config.run.output_dir), recipe_name)
    name = [config.run.name or default_run_name(recipe_name)]
    broadcast_object_list(name)
    config.run.name = name[0]
    run_dir = Path(config.run.output_dir) / config.run.name
    if processes.is_main_process:
        prepare_run_dir(run_dir, overwrite=overwrite, resume=resume is not None)
        if resume is not None:
            check_same_config(run_dir / CONFIG_FILE, config)
        dump_config(config, run_dir / CONFIG_FILE)
    processes.wait_for_everyone()

    mixed_precision = resolve_mixed_precision(t.mixed_precision)
    accelerator = make_accelerator(
        mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=t.trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False),
        dynamo_backend="inductor" if t.compile else None,
    )
    if t.tf32:
        enable_tf32()
    set_seed(config.run.seed)
    task = TASKS[config.run.task](config)
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
    apply_speed_options(model, config, mixed_precision, accelerator)

    train_dl = train_dataloader(task, features["train"], tokenizer, config, accelerator.num_processes)
    valid_dl = eval_dataloader(task, features["validation"], tokenizer, config.eval.batch_size)
    test_dl = eval_dataloader(task, features["test"], tokenizer, config.eval.batch_size)
    optimizer = make_optimizer(model, config)
    model, optimizer, train_dl, valid_dl, test_dl = accelerator.prepare(model, optimizer, train_dl, valid_dl,
                                                                        test_dl)

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

    state, resumed_from = TrainerState(), None
    if resume is not None:
        state, resumed_from = load_checkpoint(accelerator, run_dir, resume)
        if resumed_from is None:
            accelerator.print("no complete checkpoint to resume from; starting from the beginning")
        else:
            accelerator.print(f"resumed from {resumed_from} (step {state.global_step}, epoch {state.epoch}, "
                              f"batch {state.batches_in_epoch})")
    if config.eval.before_training and resumed_from is None:
        # LoRA starts as an identity (B = 0), so this is the base model (with a fresh head for classifiers).
        before = evaluate(task, model, test_dl, accelerator, splits["test"], features["test"])
        accelerator.print("test before training: " + report.format_metrics(before.metrics))
        if accelerator.is_main_process:
            (run_dir / BEFORE_FILE).write_text(json.dumps(before.metrics, indent=2), encoding="utf-8")
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
    # Throughput counts training only: time spent evaluating or writing checkpoints is left out. Token counts
    # stay tensors on the device until logged, so counting adds no host synchronisation per step.
    total_tokens, total_samples, paused_seconds, paused_cpu = 0, 0, 0.0, 0.0

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
        accelerator.print(f"step {state.global_step}: validation " + report.format_metrics(result.metrics)
                          + (" (best)" if improved else ""))

    done = state.global_step >= max_steps
    model.train()
    loop_start, loop_cpu = time.perf_counter(), time.process_time()
    with GracefulStop() as stop:
        for epoch in range(state.epoch, num_epochs):
            if done:
                break
            train_dl.set_epoch(epoch)
            skip = state.batches_in_epoch if epoch == state.epoch else 0
            # skip_first_batches drops indices from the batch sampler: no data is loaded for skipped batches.
            epoch_dl = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
            state.epoch, state.batches_in_epoch = epoch, skip
            for batch in epoch_dl:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    loss_value = loss.detach().float().item()
                    if math.isfinite(loss_value):
                        accelerator.backward(loss)
                    elif t.on_nonfinite_loss == "skip":
                        state.skipped_batches += 1
                        print(f"step {state.global_step + 1}, process {accelerator.process_index}: loss is "
                              f"{loss_value}; batch skipped ({state.skipped_batches} so far)")
                    else:
                        raise FinetuneError(f"loss is {loss_value} at step {state.global_step + 1} (epoch {epoch}, "
                                            f"batch {state.batches_in_epoch + 1}); lower train.learning_rate, check "
                                            f"the data, or set train.on_nonfinite_loss=skip")
                    if accelerator.sync_gradients and t.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                state.batches_in_epoch += 1
                if math.isfinite(loss_value):
                    window_loss += loss_value
                    window_batches += 1
                batch_tokens = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
                window_tokens += batch_tokens
                total_tokens += batch_tokens
                window_samples += batch["input_ids"].shape[0]
                total_samples += batch["input_ids"].shape[0]
                if not accelerator.sync_gradients:
                    continue
                state.global_step += 1
                progress.update(1)
                if state.global_step % t.log_every_steps == 0 or state.global_step == max_steps:
                    elapsed = time.perf_counter() - window_start
                    # Throughput of the whole job: every process processed its own share.
                    tokens = accelerator.reduce(torch.as_tensor(window_tokens, device=accelerator.device), "sum").item()
                    samples = accelerator.reduce(torch.tensor(window_samples, device=accelerator.device),
                                                 "sum").item()
                    record = {"step": state.global_step, "epoch": round(state.global_step / steps_per_epoch, 4),
                              "loss": round(window_loss / max(window_batches, 1), 6), "lr": scheduler.get_last_lr()[0],
                              "tokens_per_second": round(tokens / elapsed, 1),
                              "samples_per_second": round(samples / elapsed, 2)}
                    if state.skipped_batches:
                        record["skipped_batches"] = state.skipped_batches
                    if accelerator.is_main_process:
                        report.append_log(run_dir / LOG_FILE, record)
                    accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"},
                                    step=state.global_step)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
                    window_loss, window_batches, window_tokens, window_samples = 0.0, 0, 0, 0
                    window_start = time.perf_counter()
                end_of_epoch = state.batches_in_epoch == len(train_dl)
                done = state.global_step >= max_steps
                pause_start, pause_cpu = time.perf_counter(), time.process_time()
                if (t.eval_every_steps and state.global_step % t.eval_every_steps == 0) or end_of_epoch or done:
                    run_validation()
                    if t.early_stopping_patience and state.evals_without_improvement >= t.early_stopping_patience:
                        accelerator.print(f"early stopping: no improvement of {t.metric_for_best} in "
                                          f"{state.evals_without_improvement} evaluations")
                        done = True
                if end_of_epoch:
                    state.epoch, state.batches_in_epoch = epoch + 1, 0
                # Every process must agree to stop, or the others would wait forever in the next collective.
                stopping = bool(accelerator.reduce(torch.tensor(int(stop.requested), device=accelerator.device),
                                                   "max").item())
                if (t.save_every_steps and state.global_step % t.save_every_steps == 0) or end_of_epoch or done \
                        or stopping:
                    saved = save_checkpoint(accelerator, run_dir, state, t.keep_checkpoints)
                    if stopping:
                        progress.close()
                        signum = stop.signal or 15
                        raise TrainingInterrupted(
                            f"stopped by {signal_name(signum)} at step {state.global_step}; checkpoint {saved}. "
                            f"Resume with: finetune train {run_dir / CONFIG_FILE} --resume auto", signum)
                paused = time.perf_counter() - pause_start
                paused_seconds += paused
                paused_cpu += time.process_time() - pause_cpu
                window_start += paused
                inject_fault("kill-after-step", state.global_step)
                if done:
                    break
    progress.close()
    throughput = measured_throughput(accelerator, time.perf_counter() - loop_start - paused_seconds, total_tokens,
                                     total_samples, time.process_time() - loop_cpu - paused_cpu)

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
        summary["throughput"] = throughput
        if (run_dir / BEFORE_FILE).is_file():
            summary["before_training"] = json.loads((run_dir / BEFORE_FILE).read_text(encoding="utf-8"))
        report.write_run(run_dir, config, task, result, summary)
        report.print_summary(task, summary)
        for line in task.preview(result.predictions):
            print(line)
    accelerator.end_training()
    return run_dir


def latest_unfinished_run(output_dir: Path, recipe_name: str) -> str:
    """The newest ``<recipe>-<timestamp>`` run folder without ``metrics.json`` (what ``--resume`` continues
    when no ``run.name`` is given)."""
    from finetune.run import METRICS_FILE

    candidates = sorted(p for p in output_dir.glob(f"{recipe_name}-*")
                        if p.is_dir() and not (p / METRICS_FILE).exists())
    if not candidates:
        raise FinetuneError(f"--resume: no unfinished {recipe_name}-* run in {output_dir}; name it with "
                            f"run.name=NAME, or resume from its config: finetune train RUN/config.yaml --resume auto")
    return candidates[-1].name


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def check_same_config(saved_path: Path, config: Config) -> None:
    """Resuming with another recipe would silently mix two runs: refuse, naming the keys that differ."""
    from finetune.config import load_config

    if not saved_path.is_file():
        return
    saved = report.flatten(load_config(saved_path).to_dict())
    now = report.flatten(config.to_dict())
    differ = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ[:5])
        raise FinetuneError(f"--resume with a config that differs from {saved_path} ({shown}); resume with the "
                            f"same settings: finetune train {saved_path} --resume auto")


def measured_throughput(accelerator, seconds: float, tokens: int | torch.Tensor, samples: int,
                        cpu_seconds: float) -> dict[str, float]:
    """Training throughput of this session (all processes): non-pad tokens and examples per second of
    training time, evaluation and checkpoint writing excluded. ``train_cpu_seconds`` is this process's CPU
    time over the same span (on a shared machine it counts only the time the process actually ran)."""
    tokens = int(accelerator.reduce(torch.as_tensor(tokens, device=accelerator.device), "sum").item())
    samples = int(accelerator.reduce(torch.as_tensor(samples, device=accelerator.device), "sum").item())
    seconds = max(seconds, 1e-9)
    return {"train_seconds": round(seconds, 3), "train_cpu_seconds": round(cpu_seconds, 3), "tokens": tokens,
            "samples": samples, "tokens_per_second": round(tokens / seconds, 1),
            "samples_per_second": round(samples / seconds, 2)}


def finish_metrics(result: EvalResult, baseline: dict[str, Any], splits: datasets.DatasetDict,
                   state: TrainerState, config: Config, trainable: int, total: int) -> dict[str, Any]:
    """The content of ``metrics.json``."""
    return {
        "test": result.metrics,
        "baseline": baseline,
        "best_step": state.best_step,
        "best_validation": {config.train.metric_for_best: state.best_metric},
        "global_step": state.global_step,
        "skipped_batches": state.skipped_batches,
        "split_sizes": {name: len(split) for name, split in splits.items()},
        "parameters": {"trainable": trainable, "total": total},
    }
