"""What a run leaves behind: ``train_log.jsonl``, ``metrics.json``, predictions, a curve, a model card."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from finetune.config import Config
from finetune.run_folder import ADAPTER_CONFIG, RunFolder


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become strings (trackers take scalars)."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            # trackers (tensorboard's hparams) take numbers, strings and booleans only
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
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


def write_run(run: RunFolder, config: Config, task: Any, result: Any, summary: dict[str, Any]) -> None:
    """Predictions, curve, model card (in the run folder and in the weights folder, whose adapter config then
    names the base by its Hub id), and last ``metrics.json`` (its presence marks a finished run)."""
    write_predictions(run.predictions, result.predictions)
    mistakes = task.mistakes(result.predictions)
    if mistakes:
        write_predictions(run.mistakes, mistakes)
    plot_curves(read_log(run.log), run.curves, config.train.metric_for_best)
    matrix = result.metrics.get("confusion_matrix")
    if isinstance(matrix, dict) and matrix.get("labels"):
        plot_confusion_matrix(matrix, run.confusion_matrix)
    source = read_source(run)
    run.card.write_text(model_card(config, task, summary, source, report_page=run.report.name), encoding="utf-8")
    weights = run.weights_for(config.lora.method)
    if weights.is_dir():  # peft wrote its empty template there
        card = model_card(config, task, summary, source, report_page=f"../{run.report.name}")
        (weights / run.card.name).write_text(card, encoding="utf-8")
        record_base_model(weights, config, source)
    tmp = run.metrics.with_name(run.metrics.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, run.metrics)


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


def plot_confusion_matrix(matrix: dict[str, Any], path: Path) -> None:
    """A heat map of ``{"labels": [...], "counts": [[...]]}``: rows are the true labels, columns the predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels, counts = matrix["labels"], np.asarray(matrix["counts"])
    size = max(4.0, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(labels) <= 20:
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if counts[i, j] > counts.max() / 2 else "black")
    fig.colorbar(image, ax=ax)
    ax.set_title("test split: true against predicted")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def all_baselines(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The baselines of a ``metrics.json`` summary: ``baselines``, or the one ``baseline`` of older runs."""
    if summary.get("baselines"):
        return list(summary["baselines"])
    return [summary["baseline"]] if summary.get("baseline") else []


def verdict(task: Any, summary: dict[str, Any], metric: str) -> tuple[bool, str]:
    """Whether the model beats every baseline, and a plain sentence saying so or naming the first baseline it does
    not beat. Each baseline is compared on ``metric`` or, when it lacks that, the first headline metric it has."""
    test = summary["test"]
    higher = getattr(task, "metrics_higher_is_better", {})
    compared = []
    for baseline in all_baselines(summary):
        name = next((n for n in [metric, *task.headline_metrics]
                     if isinstance(test.get(n), (int, float)) and isinstance(baseline.get(n), (int, float))), None)
        if name is None:
            continue
        ours, theirs = test[name], baseline[name]
        if (theirs >= ours) if higher.get(name, True) else (theirs <= ours):
            return False, (f"the fine-tuned model does NOT beat the baseline {baseline['name']} on {name} "
                           f"({ours:.4f} against {theirs:.4f})")
        compared.append(f"{baseline['name']} on {name}")
    return True, ("the fine-tuned model beats every baseline (" + "; ".join(compared) + ")") if compared else ""


def model_card(config: Config, task: Any, summary: dict[str, Any], source: dict[str, Any] | None = None,
               repo_id: str | None = None, report_page: str | None = None) -> str:
    """The model card (README.md): YAML metadata with a ``model-index`` of the held-out test metrics, then
    what was trained, on what, how good it is and how to load it. ``source``: the run's ``source.json``
    (where the base weights came from). The run folder's card and the card ``finetune push`` uploads
    come from here; the pushed one names its Hub repo in the loading code. ``report_page``: the relative link
    to the run's ``report.html`` (the page holds held-out examples, so it is not pushed and not linked there)."""
    from huggingface_hub import EvalResult, ModelCardData

    test = summary["test"]
    baselines = all_baselines(summary)
    lora = config.lora
    base = card_base_model(config, source)
    dataset_type, dataset_name = _card_dataset(config)
    results = [
        EvalResult(task_type=task.pipeline_tag or task.name, dataset_type=dataset_type, dataset_name=dataset_name,
                   dataset_split="test", metric_type=name, metric_name=f"test {name}",
                   metric_value=round(float(test[name]), 6))
        for name in task.headline_metrics if isinstance(test.get(name), (int, float))
    ]
    metadata = ModelCardData(
        base_model=base,
        library_name="peft" if lora.method == "lora" else "transformers",
        pipeline_tag=task.pipeline_tag or None,
        tags=["finetune", task.name] + (["lora"] if lora.method == "lora" else []),
        datasets=[config.data.source] if _is_hub_dataset(config) else None,
        model_name=config.run.name,
        eval_results=results or None,
    )
    rows = "\n".join(
        f"| {name} | {test[name]:.4f} | "
        + " | ".join(_fmt(b[name]) if isinstance(b.get(name), (int, float)) else "-" for b in baselines) + " |"
        for name in task.headline_metrics if isinstance(test.get(name), (int, float))
    )
    header = " | ".join(f"baseline: {b.get('name', '-')}" for b in baselines) or "baseline"
    rule = " | ".join("---" for _ in baselines) or "---"
    beats, sentence = verdict(task, summary, config.train.metric_for_best)
    warning = f"\n**Note: {sentence}.**\n" if not beats else (f"\n{sentence[0].upper()}{sentence[1:]}.\n" if sentence else "")
    sizes = summary["split_sizes"]
    method = (f"LoRA (r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, "
              f"targets={lora.target_modules or 'architecture default'})" if lora.method == "lora"
              else "full fine-tuning")
    base_text = f"`{base}`" if base else f"a local checkpoint (`{Path(config.model.name_or_path).name}`)"
    return f"""---
{metadata.to_yaml()}
---

# {config.run.name}

A {task.name} model fine-tuned from {base_text} with {method} by
[finetune](https://pypi.org/project/finetune/).

## Data
Source: {dataset_name}; train {sizes['train']}, validation {sizes['validation']}, test {sizes['test']} examples
({_split_origin(config)}, seed {config.run.seed}).

## Results on the held-out test split
| metric | this model | {header} |
| --- | --- | {rule} |
{rows}
{warning}
Best checkpoint at step {summary['best_step']} of {summary['global_step']}
(validation {config.train.metric_for_best} = {_fmt(summary['best_validation'][config.train.metric_for_best])}).
{_report_line(report_page)}
## Training
{summary.get('training_length') or f"{config.train.epochs} epoch(s) or {config.train.max_steps or '-'} steps"}, batch {config.train.batch_size} x
{config.train.gradient_accumulation_steps} accumulation, learning rate {config.train.learning_rate}
({config.train.scheduler}, warmup {config.train.warmup_ratio}), max length {_max_length(config, summary)}.
The full resolved configuration is in `config.yaml`.

## How to load it
{_usage(config, task, base, repo_id)}
"""


def _report_line(link: str | None) -> str:
    if not link:
        return ""
    return (f"\nThe curves, every metric beside the baselines, per-class results and the worst errors are on the "
            f"run's report page: [report.html]({link}).\n")


def card_base_model(config: Config, source: dict[str, Any] | None = None) -> str | None:
    """The Hub id of the base model, or None when it was a local folder (the Hub's ``base_model``
    metadata only accepts model ids). ``source`` (``source.json``) says where the weights came from;
    without it, a name that is an existing folder or can only be a path counts as local."""
    from finetune.models import OFFLINE_ALIASES, looks_like_path

    name = config.model.name_or_path
    local = source["source"] == "local" if source else looks_like_path(name) or Path(name).expanduser().exists()
    return None if local else OFFLINE_ALIASES.get(name, name)


def record_base_model(weights: Path, config: Config, source: dict[str, Any] | None) -> None:
    """Make a saved adapter name its base by the Hub id the run was made from (and the revision, when the Hub
    provided the weights) instead of the path peft recorded (a package in site-packages, a cache folder), so that
    the adapter loads anywhere (``AutoPeftModel*``, the Hub's model tree). A local base keeps its path."""
    path = weights / ADAPTER_CONFIG
    hub_id = card_base_model(config, source)
    if not path.is_file() or hub_id is None:
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    data["base_model_name_or_path"] = hub_id
    revision = (source or {}).get("revision") if (source or {}).get("source") == "hub" else None
    if revision:
        data["revision"] = revision
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_source(run: RunFolder) -> dict[str, Any] | None:
    """The run's ``source.json`` (where the base weights came from), if written."""
    return json.loads(run.source.read_text(encoding="utf-8")) if run.source.is_file() else None


def _card_dataset(config: Config) -> tuple[str, str]:
    """(model-index dataset type, readable name). File paths are reduced to file names: a card must not
    publish the trainer's directory layout."""
    d = config.data
    if d.source == "files":
        names = [Path(f).name for f in (d.train_file, d.validation_file, d.test_file) if f]
        return "files", "files " + ", ".join(names)
    if not _is_hub_dataset(config):
        return d.source, f"built-in dataset {d.source.split(':', 1)[1]}"
    return d.source, d.source + (f" ({d.hub_config})" if d.hub_config else "")


def _is_hub_dataset(config: Config) -> bool:
    return config.data.source != "files" and not config.data.source.startswith("builtin:")


def _split_origin(config: Config) -> str:
    """Where the validation and test examples came from, in words."""
    d = config.data
    parts = []
    for kind, file, split, size in (("validation", d.validation_file, d.validation_split, d.validation_size),
                                    ("test", d.test_file, d.test_split, d.test_size)):
        if d.source == "files":
            parts.append(f"{kind} from {Path(file).name}" if file else f"{kind} held out from train ({size:g})")
        else:
            parts.append(f"{kind}: the source's '{split}' split, or held out from train ({size:g}) if it has none")
    return "; ".join(parts)


def _local_placeholder(config: Config) -> str:
    """Stands for a base that was a local folder: its name only, not the trainer's directory layout."""
    return f"<path to {Path(config.model.name_or_path).name}>"


def _usage(config: Config, task: Any, base: str | None, repo_id: str | None) -> str:
    """Loading code for this model: with finetune, and with transformers (+ peft) alone."""
    run = RunFolder(Path(config.run.output_dir) / str(config.run.name))
    where = repo_id or str(run.path)
    weights = repo_id or str(run.weights_for(config.lora.method))
    auto = task.auto_class.__name__
    kwargs = "".join(f", {k}={v!r}" for k, v in task.model_kwargs().items())
    if config.lora.method == "lora":
        adapter = weights
        code = (f"from peft import PeftModel\n"
                f"from transformers import {auto}, AutoTokenizer\n\n"
                f"tokenizer = AutoTokenizer.from_pretrained({adapter!r})\n"
                f"base = {auto}.from_pretrained({base or _local_placeholder(config)!r}{kwargs})\n"
                f"model = PeftModel.from_pretrained(base, {adapter!r})")
    else:
        folder = weights
        code = (f"from transformers import {auto}, AutoTokenizer\n\n"
                f"tokenizer = AutoTokenizer.from_pretrained({folder!r})\n"
                f"model = {auto}.from_pretrained({folder!r})")
    return f"""```bash
finetune eval {where}                        # rebuilds the held-out test split from config.yaml
finetune predict {where} --input inputs.jsonl
finetune merge {where} --out merged/          # one plain transformers model, no peft needed
```

```python
{code}
```"""


def _max_length(config: Config, summary: dict[str, Any]) -> str:
    """``data.max_length``, with the number ``auto`` chose and how many test inputs it cut."""
    lengths = summary.get("lengths") or {}
    test = lengths.get("test") or {}
    text = str(config.data.max_length)
    if lengths.get("max_length") is not None and str(lengths["max_length"]) != text:
        text += f" -> {lengths['max_length']}"
    if test.get("examples"):
        text += f" (test inputs: p95 {test['p95']:g} tokens, {test['truncated']} of {test['examples']} truncated)"
    return text


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def print_summary(task: Any, summary: dict[str, Any]) -> None:
    """The lines a user reads at the end of a run: test metrics beside the baseline and, when
    ``eval.before_training`` ran, beside the base model's, and the warnings of the run."""
    test, baselines = summary["test"], all_baselines(summary)
    before = summary.get("before_training") or {}
    print("\ntest results (best checkpoint, held-out test split):")
    for name in task.headline_metrics:
        if isinstance(test.get(name), (int, float)):
            line = f"  {name:<16} {test[name]:.4f}"
            if isinstance(before.get(name), (int, float)):
                line += f"    before training: {before[name]:.4f}"
            for baseline in baselines:
                if isinstance(baseline.get(name), (int, float)):
                    line += f"    baseline ({baseline['name']}): {baseline[name]:.4f}"
            print(line)
    metric = next(iter(summary.get("best_validation") or {}), "loss")
    beats, sentence = verdict(task, summary, metric)
    if not beats:
        print(f"NOTE: {sentence}.")
    elif sentence:
        print(sentence)
    for warning in summary.get("warnings") or []:
        print(f"  warning: {warning}")


def print_next_steps(run: RunFolder, task: Any) -> None:
    """The last lines of a run: where it is, and the commands that come next with its real path."""
    print(f"\nrun folder: {run.path}")
    print(f"report:     {run.report}")
    print("next:")
    print(f"  finetune eval {run.path}")
    print(f"  finetune predict {run.path} {task.predict_example}")
    print(f"  finetune report {run.path}")
    print(f"  finetune runs {run.path.parent}")
    print(f"  finetune push {run.path} --repo ORG/NAME")


def environment(accelerator: Any, mixed_precision: str) -> dict[str, Any]:
    """What the run ran on and with (``metrics.json``'s ``environment``): versions, device, processes, precision."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {}
    for package in ("finetune", "torch", "transformers", "peft", "accelerate", "datasets", "evaluate"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                              platform.machine())
    return {"python": platform.python_version(), "platform": platform.platform(terse=True), **versions,
            "device": f"{device.type}: {name}", "processes": accelerator.num_processes,
            "mixed_precision": mixed_precision, "cpu_threads": torch.get_num_threads()}
