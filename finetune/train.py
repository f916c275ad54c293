"""The one training loop, for every task, on Accelerate.

Three phases, like a torchtune recipe, read top to bottom in :class:`TrainingRun`:

- ``setup``: the process group and the run folder, the checkpoint, what the task learns from the training
  data, the held-out splits and features, the model with LoRA, dataloaders, optimizer and schedule, and
  the state of an interrupted run when resuming;
- ``fit``: the loop, with accumulation (``accelerator.accumulate``), clipping, logging, validation that
  keeps the best weights and stops early, atomic checkpoints and graceful stops on SIGINT/SIGTERM;
- ``finish``: the best weights on the test split beside the task's baseline, and the run folder.

What the loop counts and decides lives in small helpers below the class (:class:`Throughput`,
:class:`Schedule`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import math
import re
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DistributedType, ProjectConfiguration, broadcast_object_list,
                               set_seed)
from tqdm.auto import tqdm
from transformers import get_scheduler

from finetune import report, report_page
from finetune.accelerator import make_accelerator, process_group, resolve_mixed_precision
from finetune.batching import StreamBatches, eval_dataloader, split_batch, train_dataloader
from finetune.checkpoints import (GracefulStop, TrainerState, TrainingInterrupted, check_checkpoint,
                                  checkpoint_trainable_only, inject_fault, is_sharded, load_checkpoint,
                                  load_trainable_everywhere, prune_checkpoints, save_checkpoint, save_trainable,
                                  trainable_state)
from finetune.config import Config, DataConfig, TrainConfig, dump_config
from finetune.data import INPUT_LENGTH, describe_stream, length_summary, load_raw, load_splits, load_stream, shared_inputs
from finetune.errors import ConfigError, FinetuneError
from finetune.evaluation import EvalResult, evaluate
from finetune.models import (apply_lora, check_length_fits, count_parameters, enable_gradient_checkpointing,
                             quantized_loading, resolve_checkpoint, write_source)
from finetune.recipes import load_config
from finetune.run_folder import RunFolder, RunLock, clear_failure, data_name, default_run_name, write_failure
from finetune.speed import apply_speed_options, enable_tf32, make_adamw
from finetune.tasks import Task, new_task
from finetune.tasks.base import NON_PAD_TOKENS, PACKED_SAMPLES


def train(config: Config, recipe_name: str, overwrite: bool = False, resume: str | None = None) -> Path:
    """Train, evaluate on the test split, and write the run folder. Returns the run folder."""
    run = TrainingRun(config, recipe_name)
    try:
        run.setup(overwrite=overwrite, resume=resume)
        run.fit()
        return run.finish()
    except TrainingInterrupted:
        raise  # stopped on request, with a checkpoint: resumable, not failed
    except Exception as exc:
        run.record_failure(exc)
        raise
    finally:
        run.cleanup()


class TrainingRun:
    """One training run: ``setup()``, ``fit()``, ``finish()``, in that order; ``cleanup()`` whatever happened."""

    def __init__(self, config: Config, recipe_name: str):
        self.config = config
        self.recipe_name = recipe_name
        self.task: Task | None = None
        """Made in setup, once the training data and the checkpoint are known."""
        self.state = TrainerState()
        self.lock: RunLock | None = None
        """The main process's hold on the run folder, from setup to cleanup."""
        self.opened = False
        """Whether this run made (or took over) its run folder: only then is a failure recorded there."""
        self.started = time.perf_counter()
        self.elapsed_before = 0.0
        """Wall seconds of the earlier segments of a resumed run (up to the checkpoint it resumed from)."""

    # --- setup -----------------------------------------------------------------------------------------
    def setup(self, overwrite: bool = False, resume: str | None = None) -> None:
        quantized_loading(self.config.lora, self.config.train.mixed_precision)  # QLoRA without a GPU: stop now
        self._open_run_folder(overwrite, resume)
        self._start_accelerator()
        self._load_data()
        self._build_model()
        self._build_loop()
        self._restore(resume)

    def _open_run_folder(self, overwrite: bool, resume: str | None) -> None:
        """Every process agrees on the run folder before anything is written."""
        config = self.config
        processes = process_group()
        if resume is not None and config.run.name is None:
            config.run.name = latest_unfinished_run(Path(config.run.output_dir), self.recipe_name, config.data)
        name = [config.run.name or default_run_name(self.recipe_name, config.data)]
        broadcast_object_list(name)
        config.run.name = name[0]
        self.run = RunFolder(Path(config.run.output_dir) / config.run.name)
        if processes.is_main_process:
            if resume not in (None, "auto"):
                check_checkpoint(Path(resume))
            self.lock = self.run.open_for_training(overwrite=overwrite, resume=resume)
            if resume is not None:
                check_same_config(self.run.config, config)
            dump_config(config, self.run.config)
            clear_failure(self.run)  # a failed run resumed after its cause was fixed
        self.opened = True
        processes.wait_for_everyone()

    def _start_accelerator(self) -> None:
        """The Accelerator (precision, accumulation, trackers), then the seed."""
        config, t = self.config, self.config.train
        missing = [name for name in t.trackers if importlib.util.find_spec(name) is None]
        if missing:
            raise FinetuneError(f"train.trackers: {', '.join(missing)} is not installed (pip install "
                                f"{' '.join(missing)}), or leave it out of train.trackers")
        self.mixed_precision = resolve_mixed_precision(t.mixed_precision)
        self.accelerator = make_accelerator(
            self.mixed_precision,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            log_with=t.trackers or None,
            project_config=ProjectConfiguration(project_dir=str(self.run.path), logging_dir=str(self.run.tracker_logs)),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False),
            dynamo_backend="inductor" if t.compile else None,
        )
        configure_deepspeed(self.accelerator, t)
        if t.tf32:
            enable_tf32()
        set_seed(config.run.seed)
        self.accelerator.print(f"run folder: {self.run.path}")

    def _load_data(self) -> None:
        """Checkpoint and tokenizer; the task learns from the training split and is bound; splits, features."""
        config, accelerator = self.config, self.accelerator
        self.checkpoint = resolve_checkpoint(config.model)
        accelerator.print(f"model: {self.checkpoint.requested} ({self.checkpoint.source}: {self.checkpoint.path})")
        self.stream = None
        """data.streaming: the training stream (``self.splits['train']`` is then the sample the task learned from)."""
        with accelerator.main_process_first():
            if config.data.streaming:
                raw, self.stream = load_stream(config.data)
            else:
                raw = load_raw(config.data, config.run.seed)
            self.task = task = new_task(config, self.checkpoint, raw)
            self.splits = load_splits(task, config, raw)
            self.features = datasets.DatasetDict({name: task.features(split, name)
                                                  for name, split in self.splits.items()})
        for line in task.describe(self.splits):
            accelerator.print(line)
        self.lengths = length_report(self.features)
        for line in describe_lengths(self.lengths):
            accelerator.print(line)
        self.shared = shared_inputs(self.splits["train"], self.splits["test"], task.input_columns)
        if self.shared:
            accelerator.print(f"note: {self.shared} of {len(self.splits['test'])} test examples have the same input as "
                              f"a training example (exact duplicates): their scores measure memory, not "
                              f"generalisation; deduplicate the data to remove them")
        self.warnings = held_out_warnings(self.splits, self.features)
        for warning in self.warnings:
            accelerator.print(f"warning: {warning}")

    def _build_model(self) -> None:
        """The task's model, with LoRA unless the recipe asks for full fine-tuning, and the speed options."""
        config = self.config
        model = self.task.load_model(self.checkpoint, **quantized_loading(config.lora, self.mixed_precision))
        # data.max_length=auto was resolved by the task when it learned (within the model's positions)
        check_length_fits(model, getattr(self.task.learned, "max_length", config.data.max_length))
        if config.lora.quantize:
            from peft import prepare_model_for_kbit_training

            # norms and head in fp32 for stability (peft's QLoRA recipe); checkpointing is switched on below
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if config.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.model = apply_lora(model, config.lora, self.task.peft_task_type, self.task.modules_to_save)
        self.trainable, self.total = count_parameters(self.model)
        self.accelerator.print(f"parameters: {self.trainable:,} trainable of {self.total:,} "
                               f"({100 * self.trainable / self.total:.2f}%), {config.lora.method}, "
                               f"mixed precision: {self.mixed_precision}")
        notes = apply_speed_options(self.model, config.train, config.lora, self.mixed_precision,
                                    on_gpu=torch.cuda.is_available())
        if config.train.gradient_checkpointing:
            notes.append("gradient checkpointing")
        if notes:
            self.accelerator.print("speed: " + ", ".join(notes))

    def _build_loop(self) -> None:
        """Dataloaders, optimizer, schedule, all prepared by Accelerate; trackers."""
        config, t, task, accelerator = self.config, self.config.train, self.task, self.accelerator
        valid_dl = eval_dataloader(task, self.features["validation"], config.eval.batch_size)
        test_dl = eval_dataloader(task, self.features["test"], config.eval.batch_size)
        optimizer = make_optimizer(self.model, t)
        if self.stream is not None:
            # A stream is sharded by StreamBatches itself: accelerate's dispatching would read it all on the main
            # process and send every batch over.
            self.model, self.optimizer, self.valid_dl, self.test_dl = accelerator.prepare(
                self.model, optimizer, valid_dl, test_dl)
            self.train_dl = StreamBatches(task, self.stream, config, accelerator, describe_stream(config.data))
            self.schedule = Schedule(t, None)
        else:
            train_dl = train_dataloader(task, self.features["train"], config, accelerator.num_processes)
            self.model, self.optimizer, self.train_dl, self.valid_dl, self.test_dl = accelerator.prepare(
                self.model, optimizer, train_dl, valid_dl, test_dl)
            self.schedule = Schedule(t, len(self.train_dl))
        # The prepared scheduler steps once per process per optimizer step, hence the scaling.
        scheduler = get_scheduler(t.scheduler, self.optimizer,
                                  num_warmup_steps=int(t.warmup_ratio * self.schedule.max_steps) * accelerator.num_processes,
                                  num_training_steps=self.schedule.max_steps * accelerator.num_processes)
        self.scheduler = accelerator.prepare(scheduler)
        checkpoint_trainable_only(accelerator)  # LoRA: checkpoints without the frozen base
        self.max_tokens_per_pass = tokens_per_pass(t, accelerator, task)
        if self.max_tokens_per_pass is not None:
            accelerator.print(f"memory: training batches in passes of at most {self.max_tokens_per_pass} tokens "
                              f"(train.max_tokens_per_pass), gradients added before each optimizer step")
        if t.trackers:
            accelerator.init_trackers(config.run.name, config=report.flatten(config.to_dict()))

    def _restore(self, resume: str | None) -> None:
        """An interrupted run's state when resuming; else, when asked, the base model on the test split."""
        accelerator, run, resumed_from = self.accelerator, self.run, None
        if resume is not None:
            self.state, resumed_from = load_checkpoint(accelerator, run, resume)
            self.elapsed_before = self.state.elapsed_seconds
            if resumed_from is None:
                accelerator.print("no complete checkpoint to resume from; starting from the beginning")
            else:
                accelerator.print(f"resumed from {resumed_from} (step {self.state.global_step}, epoch "
                                  f"{self.state.epoch}, batch {self.state.batches_in_epoch})")
        if self.config.eval.before_training and resumed_from is None:
            # LoRA starts as an identity (B = 0), so this is the base model (with a fresh head for classifiers).
            before = self._evaluate(self.test_dl, "test")
            accelerator.print("test before training: " + report.format_metrics(before.metrics))
            if accelerator.is_main_process:
                run.before_training.write_text(json.dumps(before.metrics, indent=2), encoding="utf-8")
        if accelerator.is_main_process:
            write_source(run.source, self.checkpoint)
            report.truncate_log(run.log, self.state.global_step)
        t, s = self.config.train, self.schedule
        epochs = (f"{s.num_epochs} epoch(s) of {s.steps_per_epoch} steps" if s.steps_per_epoch
                  else f"streamed from {describe_stream(self.config.data)}")
        accelerator.print(f"training: {s.max_steps} optimizer steps, {epochs}, effective batch {t.batch_size * accelerator.num_processes * t.gradient_accumulation_steps}"
                          f" = {t.batch_size} per device x {accelerator.num_processes} process(es) x "
                          f"{t.gradient_accumulation_steps} accumulation")
        accelerator.print(f"training length: {s.describe()}")

    # --- fit ---------------------------------------------------------------------------------------------
    def fit(self) -> None:
        """Train until ``max_steps``, early stopping or a signal; resumes mid-epoch at the exact next batch."""
        state, accelerator = self.state, self.accelerator
        self.progress = tqdm(total=self.schedule.max_steps, initial=state.global_step, desc="training",
                             disable=not accelerator.is_local_main_process, dynamic_ncols=True)
        self.throughput = Throughput(accelerator)
        done = state.global_step >= self.schedule.max_steps
        self.model.train()
        with GracefulStop() as stop:
            # A stream's epochs are counted as they end: the loop runs until max_steps.
            epochs = itertools.count(state.epoch) if self.stream is not None else range(state.epoch,
                                                                                          self.schedule.num_epochs)
            for epoch in epochs:
                if done:
                    break
                skip = state.batches_in_epoch if epoch == state.epoch else 0
                if self.stream is not None:
                    batches = self.train_dl.epoch(epoch, skip)
                else:
                    self.train_dl.set_epoch(epoch)
                    # skip_first_batches drops indices from the batch sampler: no data is loaded for skipped batches.
                    batches = accelerator.skip_first_batches(self.train_dl, skip) if skip else self.train_dl
                state.epoch, state.batches_in_epoch = epoch, skip
                self.schedule.epoch = epoch
                for batch in batches:
                    loss = self._train_step(batch)
                    state.batches_in_epoch += 1
                    self.throughput.count(batch, loss)
                    if accelerator.sync_gradients:
                        done = self._after_optimizer_step(epoch, stop)
                        if done:
                            break
                if self.stream is not None and not done:
                    if state.batches_in_epoch == 0:
                        raise FinetuneError(f"{describe_stream(self.config.data)}: the training stream has fewer "
                                            f"than train.batch_size x processes examples")
                    state.epoch, state.batches_in_epoch = epoch + 1, 0  # the stream ran out: the next epoch
        self.progress.close()

    def _train_step(self, batch: dict[str, Any]) -> float:
        """Forward and backward of one micro-batch; the optimizer steps when the accumulation window is full."""
        t, state, accelerator = self.config.train, self.state, self.accelerator
        with accelerator.accumulate(self.model):
            parts = self._passes(batch)
            value = 0.0
            for i, (part, share) in enumerate(parts):
                # Only the last pass may synchronise gradients across processes: the others add to them locally.
                with accelerator.no_sync(self.model) if i < len(parts) - 1 else contextlib.nullcontext():
                    loss = self.task.loss(self.model, part)
                    part_value = loss.detach().float().item()
                    if math.isfinite(part_value):
                        accelerator.backward(loss * share if share != 1 else loss)
                value += part_value * share
                if not math.isfinite(part_value):
                    break
            if not math.isfinite(value) and t.on_nonfinite_loss == "skip":
                state.skipped_batches += 1
                print(f"step {state.global_step + 1}, process {accelerator.process_index}: loss is {value}; "
                      f"batch skipped ({state.skipped_batches} so far)")
            elif not math.isfinite(value):
                raise FinetuneError(f"loss is {value} at step {state.global_step + 1} (epoch {state.epoch}, batch "
                                    f"{state.batches_in_epoch + 1}); lower train.learning_rate, check the data, or "
                                    f"set train.on_nonfinite_loss=skip")
            if accelerator.sync_gradients and t.max_grad_norm:
                accelerator.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        return value

    def _passes(self, batch: dict[str, Any]) -> list[tuple[dict[str, Any], float]]:
        """The parts of ``batch`` trained in one pass each (``train.max_tokens_per_pass``), with each part's
        share of what the loss averages over: their weighted losses give the whole batch's gradient."""
        budget = self.max_tokens_per_pass
        if budget is None or batch["input_ids"].numel() <= budget:
            return [(batch, 1.0)]
        total = self.task.loss_weight(batch)
        if not total:  # the task does not say, or nothing to average: one pass
            return [(batch, 1.0)]
        shares = [(part, self.task.loss_weight(part) / total) for part in split_batch(batch, budget)]
        return [(part, share) for part, share in shares if share]  # a part without targets adds nothing (its loss: nan)

    def _after_optimizer_step(self, epoch: int, stop: GracefulStop) -> bool:
        """Log, validate, checkpoint, stop: what follows an optimizer step. Returns whether training is done."""
        state, schedule, accelerator = self.state, self.schedule, self.accelerator
        state.global_step += 1
        self.progress.update(1)
        if schedule.log_now(state.global_step):
            self._log_training()
        # A stream's end is known only when it runs out (in fit).
        end_of_epoch = self.stream is None and state.batches_in_epoch == len(self.train_dl)
        done = state.global_step >= schedule.max_steps
        with self.throughput.paused():
            if schedule.validate_now(state.global_step, end_of_epoch, done):
                self._validate()
                if schedule.patience_spent(state.evals_without_improvement):
                    accelerator.print(f"early stopping: no improvement of {self.config.train.metric_for_best} in "
                                      f"{state.evals_without_improvement} evaluations")
                    done = True
            if end_of_epoch:
                state.epoch, state.batches_in_epoch = epoch + 1, 0
            # Every process must agree to stop, or the others would wait forever in the next collective.
            stopping = bool(accelerator.reduce(torch.tensor(int(stop.requested), device=accelerator.device),
                                               "max").item())
            if schedule.save_now(state.global_step, end_of_epoch, done) or stopping:
                state.elapsed_seconds = self.elapsed_seconds()
                saved = save_checkpoint(accelerator, self.run, state, self.config.train.keep_checkpoints)
                if stopping:
                    self.progress.close()
                    signum = stop.signal or signal.SIGTERM
                    raise TrainingInterrupted(
                        f"stopped by {signal.Signals(signum).name} at step {state.global_step}; checkpoint {saved}. "
                        f"Resume with: finetune train {self.run.config} --resume auto", signum)
        inject_fault("kill-after-step", state.global_step)
        return done

    def _log_training(self) -> None:
        state, window = self.state, self.throughput.window_record()
        record = {"step": state.global_step, "epoch": self.schedule.epoch_of(state.global_step), "loss": window["loss"],
                  "lr": self.scheduler.get_last_lr()[0], "tokens_per_second": window["tokens_per_second"],
                  "samples_per_second": window["samples_per_second"]}
        if state.skipped_batches:
            record["skipped_batches"] = state.skipped_batches
        if self.accelerator.is_main_process:
            report.append_log(self.run.log, record)
        self.accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=state.global_step)
        self.progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")

    def _validate(self) -> None:
        """Evaluate on validation, log, keep the best weights, count patience."""
        state, accelerator, t = self.state, self.accelerator, self.config.train
        result = self._evaluate(self.valid_dl, "validation")
        value = float(result.metrics[t.metric_for_best])
        improved = state.improves(value, self.task.metrics_higher_is_better[t.metric_for_best])
        if improved:
            state.best_metric, state.best_step, state.evals_without_improvement = value, state.global_step, 0
            best = trainable_state(accelerator, self.model)  # every process: a collective when sharded
            if accelerator.is_main_process:
                save_trainable(best, self.run.best_weights)
        else:
            state.evals_without_improvement += 1
        state.last_eval_step = state.global_step
        scalars = report.scalars(result.metrics)
        if accelerator.is_main_process:
            report.append_log(self.run.log, {"step": state.global_step,
                                             "epoch": self.schedule.epoch_of(state.global_step),
                                             "split": "validation", **scalars})
        accelerator.log({f"validation/{k}": v for k, v in scalars.items()}, step=state.global_step)
        accelerator.print(f"step {state.global_step}: validation " + report.format_metrics(result.metrics)
                          + (" (best)" if improved else ""))

    def _evaluate(self, dataloader: Any, split: str) -> EvalResult:
        return evaluate(self.task, self.model, dataloader, self.accelerator, self.splits[split],
                        self.features[split], split=split)

    # --- finish ------------------------------------------------------------------------------------------
    def finish(self) -> Path:
        """The best weights on the test split beside the baseline; the run folder, ``metrics.json`` last."""
        accelerator, run, state, task = self.accelerator, self.run, self.state, self.task
        throughput = self.throughput.summary()
        memory = peak_memory()  # training's peak, before the test evaluation
        unwrapped = accelerator.unwrap_model(self.model)
        if run.best_weights.is_file():
            load_trainable_everywhere(accelerator, self.model, run.best_weights)
            accelerator.print(f"best checkpoint: step {state.best_step} "
                              f"({self.config.train.metric_for_best} {state.best_metric:.4f})")
        if task.calibrates:
            # Decision thresholds and the like are tuned on validation only, then applied to the test split.
            task.calibrate(self._evaluate(self.valid_dl, "validation").outputs)
        result = self._evaluate(self.test_dl, "test")
        # Sharded weights are gathered whole first, by every process (under FSDP2 the main process receives them).
        whole = accelerator.get_state_dict(self.model) if is_sharded(accelerator) else None
        if accelerator.is_main_process:
            baselines = task.baselines(self.splits)  # TF-IDF fits take a while: once, where the report is written
            weights = run.weights_for(self.config.lora.method)
            unwrapped.save_pretrained(str(weights), safe_serialization=True, state_dict=whole)
            task.tokenizer.save_pretrained(str(weights))
            task.save(weights)
            summary = {**self._summary(result, baselines), "throughput": throughput, "peak_memory": memory}
            if self.stream is not None:  # the streamed examples trained on, not the sample the task learned from
                summary["split_sizes"]["train"] = throughput["samples"]
            if run.before_training.is_file():
                summary["before_training"] = json.loads(run.before_training.read_text(encoding="utf-8"))
            report.write_run(run, self.config, task, result, summary)
            prune_checkpoints(run, self.config.train.keep_checkpoints)  # after metrics.json: a finished run
            self._write_report_page()
            report.print_summary(task, summary)
            for line in task.preview(result.predictions):
                print(line)
            report.print_next_steps(run, task)
        accelerator.end_training()
        return run.path

    def cleanup(self) -> None:
        """Let go of the run folder (the lock), whether the run finished, failed or was stopped."""
        if self.lock is not None:
            self.lock.release()

    def _write_report_page(self) -> None:
        """report.html; the run is finished already, so a failure here is a warning, not a failed run."""
        try:
            report_page.write_report(self.run, self.task)
        except Exception as exc:  # noqa: BLE001 - the trained model must not be lost to a page
            print(f"warning: {self.run.report.name} not written ({type(exc).__name__}: {exc}); "
                  f"retry with: finetune report {self.run.path}")

    def elapsed_seconds(self) -> float:
        """Wall time of the run so far, over every segment of a resumed run."""
        return round(self.elapsed_before + time.perf_counter() - self.started, 1)

    def record_failure(self, exc: BaseException) -> None:
        """An error ended the run: say so in its folder (``finetune runs`` lists it as failed)."""
        if self.opened:
            write_failure(self.run, exc, self.state.global_step, self.elapsed_seconds(),
                          getattr(getattr(self, "accelerator", None), "process_index", 0))

    def _summary(self, result: EvalResult, baselines: list[dict[str, Any]]) -> dict[str, Any]:
        """The content of ``metrics.json`` (throughput and before-training results are added to it)."""
        state = self.state
        summary = {
            "test": result.metrics,
            "baseline": baselines[0] if baselines else {},
            "baselines": baselines,
            "best_step": state.best_step,
            "best_validation": {self.config.train.metric_for_best: state.best_metric},
            "global_step": state.global_step,
            "skipped_batches": state.skipped_batches,
            "split_sizes": {name: len(split) for name, split in self.splits.items()},
            "test_inputs_seen_in_train": self.shared,
            "warnings": self.warnings,
            "parameters": {"trainable": self.trainable, "total": self.total},
            "headline_metric": self.task.headline_metrics[0],
            "wall_seconds": self.elapsed_seconds(),
            "environment": report.environment(self.accelerator, self.mixed_precision),
            "training_length": self.schedule.describe(),
        }
        if self.lengths:
            # The number of tokens inputs were cut to (what data.max_length=auto chose, where the task learned one).
            chosen = getattr(self.task.learned, "max_length", self.config.data.max_length)
            summary["lengths"] = {"max_length": chosen, **self.lengths}
        return summary


def length_report(features: datasets.DatasetDict) -> dict[str, dict[str, Any]]:
    """Per split: token counts before truncation (median, p95, max) and how many inputs were cut, for tasks whose
    features carry ``INPUT_LENGTH`` beside the (truncated) ``length``."""
    report_ = {}
    for name, split in features.items():
        if INPUT_LENGTH in split.column_names:
            full, kept = np.asarray(split[INPUT_LENGTH][:]), np.asarray(split["length"][:])
            summary = length_summary(full)
            summary["truncated"] = int((full > kept).sum())
            report_[name] = summary
    return report_


def describe_lengths(lengths: dict[str, dict[str, Any]]) -> list[str]:
    """The printed form of :func:`length_report`."""
    lines = []
    for name, s in lengths.items():
        if s.get("examples"):
            lines.append(f"{name} lengths (tokens before truncation): median {s['median']:g}, p95 {s['p95']:g}, "
                         f"max {s['max']}; truncated: {s['truncated']} of {s['examples']} "
                         f"({100 * s['truncated'] / s['examples']:.1f}%)")
    return lines


# --- policies and counters ----------------------------------------------------------------------------
MIN_HELD_OUT_EXAMPLES = 20
MIN_HELD_OUT_ROWS = 5
"""Held-out splits smaller than this (examples, or evaluation rows such as blocks of plain text) are warned of."""


def held_out_warnings(splits: datasets.DatasetDict, features: datasets.DatasetDict) -> list[str]:
    """Warnings for validation and test splits too small for their numbers (and curves) to mean anything;
    printed before training and kept in ``metrics.json``."""
    warnings = []
    for name, key in (("validation", "validation_size"), ("test", "test_size")):
        examples, rows = len(splits[name]), len(features[name])
        if examples < MIN_HELD_OUT_EXAMPLES or rows < MIN_HELD_OUT_ROWS:
            warnings.append(f"the {name} split has only {examples} examples ({rows} evaluation rows): its metrics"
                            f"{' and the validation curve' if name == 'validation' else ''} are mostly noise; give "
                            f"more data, a data.{name}_file, or a larger data.{key}")
    return warnings


# ``train.epochs: auto``, tuned on data sets of several sizes (bench/auto_defaults.py prints the evidence):
AUTO_MIN_STEPS = 200
"""Floor: a small training split is seen for at least this many optimizer steps (several epochs)."""
AUTO_MAX_STEPS = 500
"""Cap: a large training split is not seen for more than this many optimizer steps (less than an epoch)."""
AUTO_MAX_EPOCHS = 20
"""The floor never makes more passes than this over a tiny training split."""
AUTO_VALIDATIONS = 10
"""Validations per auto-sized run (when ``train.eval_every_steps`` is not set)."""
AUTO_PATIENCE = 3
"""Early stopping after this many validations without improvement (when ``train.early_stopping_patience`` is not
set)."""


class Schedule:
    """How long the run is, and when it logs, validates, checkpoints and stops early."""

    def __init__(self, train: TrainConfig, batches_per_epoch: int | None):
        """``batches_per_epoch`` None: a stream, of unknown length (``train.max_steps`` is required then)."""
        self.train = train
        self.epoch = 0
        """The epoch being trained (set by the loop): what a stream's log records say."""
        self.eval_every = train.eval_every_steps
        self.patience = train.early_stopping_patience
        self.reason = ""
        """Why the run has this length, in words (printed)."""
        self.validate_each_epoch = True
        """An auto-sized run validates every ``eval_every`` steps only: on a small split, epochs of a few steps
        would spend the early-stopping patience in a few dozen steps."""
        if batches_per_epoch is None:
            self.steps_per_epoch, self.max_steps, self.num_epochs = None, train.max_steps, None
            self.reason = f"train.max_steps={train.max_steps}, streamed"
            return
        self.steps_per_epoch = math.ceil(batches_per_epoch / train.gradient_accumulation_steps)
        if train.max_steps:
            self.max_steps = train.max_steps
            self.reason = f"train.max_steps={train.max_steps}"
        elif train.epochs == "auto":
            self.max_steps, self.reason = auto_length(self.steps_per_epoch)
            self.eval_every = self.eval_every or max(1, math.ceil(self.max_steps / AUTO_VALIDATIONS))
            self.patience = self.patience or AUTO_PATIENCE
            self.validate_each_epoch = train.eval_every_steps is not None
        else:
            self.max_steps = math.ceil(train.epochs * self.steps_per_epoch)
            self.reason = f"train.epochs={train.epochs:g}"
        self.num_epochs = math.ceil(self.max_steps / self.steps_per_epoch)

    def describe(self) -> str:
        """The run's length and why, its validations and early stopping, in one line."""
        text = f"{self.max_steps} optimizer steps ({self.reason})"
        if self.eval_every:
            text += f", validation every {self.eval_every} steps" + (" and at each epoch end"
                                                                     if self.validate_each_epoch else "")
        if self.patience:
            text += f", early stopping after {self.patience} validations without improvement"
        return text

    def epoch_of(self, step: int) -> float:
        if self.steps_per_epoch is None:
            return float(self.epoch)
        return round(step / self.steps_per_epoch, 4)

    def log_now(self, step: int) -> bool:
        return step % self.train.log_every_steps == 0 or step == self.max_steps

    def validate_now(self, step: int, end_of_epoch: bool, done: bool) -> bool:
        every = self.eval_every
        return bool(every and step % every == 0) or (end_of_epoch and self.validate_each_epoch) or done

    def save_now(self, step: int, end_of_epoch: bool, done: bool) -> bool:
        every = self.train.save_every_steps
        return bool(every and step % every == 0) or end_of_epoch or done

    def patience_spent(self, evals_without_improvement: int) -> bool:
        patience = self.patience
        return bool(patience) and evals_without_improvement >= patience


def auto_length(steps_per_epoch: int) -> tuple[int, str]:
    """``train.epochs: auto``: one pass over the training split, raised to ``AUTO_MIN_STEPS`` (at most
    ``AUTO_MAX_EPOCHS`` passes) for small splits and cut to ``AUTO_MAX_STEPS`` for large ones. Returns the
    optimizer steps and the reason in words."""
    epochs = f"epoch(s) of {steps_per_epoch} steps"
    if steps_per_epoch >= AUTO_MAX_STEPS:
        return AUTO_MAX_STEPS, (f"train.epochs=auto: capped at {AUTO_MAX_STEPS} steps, "
                                f"{AUTO_MAX_STEPS / steps_per_epoch:.2f} of an epoch of {steps_per_epoch} steps")
    if steps_per_epoch >= AUTO_MIN_STEPS:
        return steps_per_epoch, f"train.epochs=auto: one epoch of {steps_per_epoch} steps"
    steps = min(AUTO_MIN_STEPS, AUTO_MAX_EPOCHS * steps_per_epoch)
    limit = f"floor of {AUTO_MIN_STEPS} steps" if steps == AUTO_MIN_STEPS else f"at most {AUTO_MAX_EPOCHS} epochs"
    return steps, (f"train.epochs=auto: a small training split, raised to the {limit}: "
                   f"{steps / steps_per_epoch:.1f} {epochs}")


class Throughput:
    """Training throughput: loss, non-pad tokens and examples per logging window and over the whole run.

    Time spent evaluating or writing checkpoints is left out (:meth:`paused`). Token counts stay tensors on
    the device until logged, so counting adds no host synchronisation per step. Reported for all processes
    together: each processed its own share."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.window_loss, self.window_batches = 0.0, 0
        self.window_tokens: int | torch.Tensor = 0
        self.window_samples = 0
        self.total_tokens: int | torch.Tensor = 0
        self.total_samples = 0
        self.window_start = self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.paused_seconds = self.paused_cpu = 0.0

    def count(self, batch: dict[str, Any], loss: float) -> None:
        """One micro-batch (a non-finite loss counts for tokens, not for the mean loss)."""
        if math.isfinite(loss):
            self.window_loss += loss
            self.window_batches += 1
        if NON_PAD_TOKENS in batch:  # packed rows: no attention mask to count them with
            tokens = batch[NON_PAD_TOKENS]
        elif "attention_mask" in batch:
            tokens = batch["attention_mask"].sum()
        else:
            tokens = batch["input_ids"].numel()
        self.window_tokens += tokens
        self.total_tokens += tokens
        samples = batch[PACKED_SAMPLES] if PACKED_SAMPLES in batch else batch["input_ids"].shape[0]
        self.window_samples += samples
        self.total_samples += samples

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside does not count as training."""
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            paused = time.perf_counter() - start
            self.paused_seconds += paused
            self.paused_cpu += time.process_time() - cpu
            self.window_start += paused

    def window_record(self) -> dict[str, float]:
        """Mean loss and rates since the last record; starts a new window."""
        elapsed = time.perf_counter() - self.window_start
        tokens, samples = self._sum(self.window_tokens), self._sum(self.window_samples)
        record = {"loss": round(self.window_loss / max(self.window_batches, 1), 6),
                  "tokens_per_second": round(tokens / elapsed, 1), "samples_per_second": round(samples / elapsed, 2)}
        self.window_loss, self.window_batches, self.window_tokens, self.window_samples = 0.0, 0, 0, 0
        self.window_start = time.perf_counter()
        return record

    def summary(self) -> dict[str, float]:
        """``metrics.json`` ``throughput``: non-pad tokens and examples per second of training time.
        ``train_cpu_seconds`` is this process's CPU time over the same span (on a shared machine it counts only
        the time the process actually ran)."""
        seconds = max(time.perf_counter() - self.start - self.paused_seconds, 1e-9)
        tokens, samples = int(self._sum(self.total_tokens)), int(self._sum(self.total_samples))
        return {"train_seconds": round(seconds, 3),
                "train_cpu_seconds": round(time.process_time() - self.cpu_start - self.paused_cpu, 3),
                "tokens": tokens, "samples": samples, "tokens_per_second": round(tokens / seconds, 1),
                "samples_per_second": round(samples / seconds, 2)}

    def _sum(self, value: int | torch.Tensor) -> float:
        return self.accelerator.reduce(torch.as_tensor(value, device=self.accelerator.device), "sum").item()


def configure_deepspeed(accelerator: Accelerator, train: TrainConfig) -> None:
    """Under DeepSpeed: the micro batch, which accelerate would read from the train DataLoader's ``batch_size``
    (None here: batches come from a batch sampler, or from a stream), and the recipe's clipping, which DeepSpeed
    applies itself inside its step (``accelerator.clip_grad_norm_`` only reports the norm there; ``auto`` would
    become accelerate's 1.0)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = train.batch_size
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = train.max_grad_norm or 0.0


AUTO_TOKENS_PER_PASS = 512
"""``train.max_tokens_per_pass: auto`` on CPUs: activations of 512 tokens. Measured on SmolLM2-135M's SFT batches of
2,048 tokens (2 cores, BENCHMARKS.md): about 10% slower than one pass, at less than half its peak memory."""


def tokens_per_pass(train: TrainConfig, accelerator: Accelerator, task: Task) -> int | None:
    """``train.max_tokens_per_pass`` resolved: ``auto`` is 512 on CPUs, one pass on GPUs; None where batches
    stay whole (the task does not say what its loss averages over, DeepSpeed, skipped non-finite losses)."""
    setting = train.max_tokens_per_pass
    if setting == "auto":
        on_cpu = accelerator.device.type == "cpu"
        setting = AUTO_TOKENS_PER_PASS if on_cpu and train.on_nonfinite_loss == "error" else None
    if setting is None or type(task).loss_weight is Task.loss_weight:
        return None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if train.max_tokens_per_pass == "auto":
            return None
        raise ConfigError("config key 'train.max_tokens_per_pass' must be auto or null with DeepSpeed (it "
                          f"accumulates gradients itself); got {setting}")
    return int(setting)


def peak_memory() -> dict[str, float | None]:
    """``metrics.json`` ``peak_memory``: the process's peak resident memory so far (loading included) and, on a
    GPU, the peak memory torch allocated on it, in MiB."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"rss_mib": round(rss, 1), "gpu_mib": None if gpu is None else round(gpu, 1)}


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return make_adamw(groups, train.learning_rate, train.fused_optimizer)


def latest_unfinished_run(output_dir: Path, recipe_name: str, data: DataConfig) -> str:
    """The newest unfinished run folder of this recipe and data with a default name, ``<recipe>-<data>-<time>``
    (or ``<recipe>-<time>``, as older runs were named): what ``--resume`` continues when no ``run.name`` is given."""
    pattern = re.compile(rf"^{re.escape(recipe_name)}-(?:{re.escape(data_name(data))}-)?(\d{{8}}-\d{{6}})$")
    candidates = sorted((match.group(1), p.name) for p in output_dir.glob(f"{recipe_name}-*")
                        if (match := pattern.match(p.name)) and p.is_dir() and not RunFolder(p).is_finished())
    if not candidates:
        raise FinetuneError(f"--resume: no unfinished {recipe_name}-{data_name(data)}-* run in {output_dir}; name it "
                            f"with run.name=NAME, or resume from its config: finetune train RUN/config.yaml --resume "
                            f"auto")
    return candidates[-1][1]


def check_same_config(saved_path: Path, config: Config) -> None:
    """Resuming with another recipe would silently mix two runs: refuse, naming the keys that differ."""
    if not saved_path.is_file():
        return
    saved = report.flatten(load_config(saved_path).to_dict())
    now = report.flatten(config.to_dict())
    differ = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ[:5])
        raise FinetuneError(f"--resume with a config that differs from {saved_path} ({shown}); resume with the "
                            f"same settings: finetune train {saved_path} --resume auto")
