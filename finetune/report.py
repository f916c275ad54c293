"""What a run leaves behind: ``train_log.jsonl``, ``metrics.json``, predictions, a curve, a model card."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from finetune.config import Config

PREDICTIONS_FILE = "predictions_test.jsonl"
CURVE_FILE = "curves.png"
CARD_FILE = "README.md"


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become strings (trackers take scalars)."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return flat


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric top-level metrics (what goes into logs and trackers)."""
    return {k: round(float(v), 6) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def format_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in scalars(metrics).items() if k != "eval_seconds")


def append_log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_log(path: Path, step: int) -> None:
    """Drop log records past ``step`` (written after the checkpoint a run resumes from), so each step
    appears once after resuming; the rest of the log is kept, not rewritten from scratch."""
    records = read_log(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != len(records):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, path)


def write_run(run_dir: Path, config: Config, task: Any, result: Any, summary: dict[str, Any]) -> None:
    """Predictions, curve, model card, and last ``metrics.json`` (its presence marks a finished run)."""
    write_predictions(run_dir / PREDICTIONS_FILE, result.predictions)
    plot_curves(read_log(run_dir / "train_log.jsonl"), run_dir / CURVE_FILE, config.train.metric_for_best)
    (run_dir / CARD_FILE).write_text(model_card(config, task, summary), encoding="utf-8")
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / "metrics.json")


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def plot_curves(records: list[dict[str, Any]], path: Path, metric: str) -> None:
    """Training loss and validation loss (and the best-checkpoint metric) against the step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    train = [r for r in records if "split" not in r and "loss" in r]
    valid = [r for r in records if r.get("split") == "validation"]
    extra = metric if metric != "loss" else None
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(11 if extra else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if valid:
        ax.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if extra:
        ax = axes[0][1]
        ax.plot([r["step"] for r in valid if extra in r], [r[extra] for r in valid if extra in r], "o-",
                color="tab:green")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"validation {extra}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def model_card(config: Config, task: Any, summary: dict[str, Any]) -> str:
    """A model card (README.md) for the run folder: what was trained, on what, how good it is."""
    test = summary["test"]
    baseline = summary.get("baseline") or {}
    rows = "\n".join(
        f"| {name} | {test[name]:.4f} | {baseline[name]:.4f} |" if name in baseline else
        f"| {name} | {test[name]:.4f} | - |"
        for name in task.headline_metrics if name in test
    )
    sizes = summary["split_sizes"]
    lora = config.lora
    method = (f"LoRA (r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, "
              f"targets={lora.target_modules or 'architecture default'})" if lora.method == "lora"
              else "full fine-tuning")
    return f"""---
base_model: {config.model.name_or_path}
library_name: {"peft" if lora.method == "lora" else "transformers"}
pipeline_tag: {task.pipeline_tag}
tags:
- finetune
- {task.name}
---

# {config.run.name}

A {task.name} model fine-tuned from `{config.model.name_or_path}` with {method} by
[finetune](https://pypi.org/project/finetune/).

## Data
Source `{config.data.source}`; train {sizes['train']}, validation {sizes['validation']},
test {sizes['test']} examples (seed {config.run.seed}).

## Results on the held-out test split
| metric | this model | baseline: {baseline.get('name', '-')} |
| --- | --- | --- |
{rows}

Best checkpoint at step {summary['best_step']} of {summary['global_step']}
(validation {config.train.metric_for_best} = {_fmt(summary['best_validation'][config.train.metric_for_best])}).

## Training
{config.train.epochs} epoch(s) or {config.train.max_steps or '-'} steps, batch {config.train.batch_size} x
{config.train.gradient_accumulation_steps} accumulation, learning rate {config.train.learning_rate}
({config.train.scheduler}, warmup {config.train.warmup_ratio}), max length {config.data.max_length}.
The full resolved configuration is in `config.yaml`.
"""


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def print_summary(task: Any, summary: dict[str, Any]) -> None:
    """The lines a user reads at the end of a run: test metrics beside the baseline and, when
    ``eval.before_training`` ran, beside the base model's."""
    test, baseline = summary["test"], summary.get("baseline") or {}
    before = summary.get("before_training") or {}
    print("\ntest results (best checkpoint, held-out test split):")
    for name in task.headline_metrics:
        if name in test:
            line = f"  {name:<16} {test[name]:.4f}"
            if name in before:
                line += f"    before training: {before[name]:.4f}"
            if name in baseline:
                line += f"    baseline ({baseline['name']}): {baseline[name]:.4f}"
            print(line)
