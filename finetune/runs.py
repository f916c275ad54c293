"""The runs of a folder: a table of them (``finetune runs``) and several side by side (``finetune compare``).

A run's status comes from its folder: ``finished`` (``metrics.json``), ``failed`` (``failure.json``: an error
ended it), else ``stopped`` (interrupted, killed, or still training: ``--resume auto`` continues it from its
newest checkpoint). Only the run folders' files are read (no model, no task), so listing is quick.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import RunFolderError
from finetune.report import flatten
from finetune.run_folder import CHECKPOINT_STATE, RunFolder, read_failure, resume_command

SORT_KEYS = ("time", "name", "status", "task", "model", "data", "metric", "wall", "size")


@dataclasses.dataclass
class RunInfo:
    """One line of ``finetune runs`` (and one object of ``--json``)."""

    name: str
    path: str
    status: str
    """``finished``, ``stopped`` or ``failed``."""
    task: str | None
    model: str | None
    data: str | None
    split_sizes: dict[str, int] | None
    """train / validation / test examples (known once the run finished)."""
    metric: str | None
    """The task's headline test metric."""
    value: float | None
    baseline: float | None
    baseline_name: str | None
    step: int | None
    """Optimizer steps done: all of a finished run, up to the newest checkpoint of a stopped one."""
    wall_seconds: float | None
    size_bytes: int
    updated: str
    """When a file of the run last changed (ISO time)."""
    resume: str | None
    """The command that continues a stopped or failed run."""
    error: str | None
    """What ended a failed run."""


def find_runs(folder: Path) -> list[RunFolder]:
    """The run folder itself, or the run folders directly inside it (each has a ``config.yaml``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunFolderError(f"no such folder: {folder}")
    if RunFolder(folder).config.is_file():
        return [RunFolder(folder)]
    return [RunFolder(p) for p in sorted(folder.iterdir()) if p.is_dir() and RunFolder(p).config.is_file()]


def describe(run: RunFolder) -> RunInfo:
    """What the run folder says about the run."""
    config = _read_yaml(run.config)
    summary = _read_json(run.metrics) if run.is_finished() else None
    failure = None if summary is not None else read_failure(run)
    status = "finished" if summary is not None else "failed" if failure is not None else "stopped"
    size, updated = _size_and_time(run.path)
    data = config.get("data") or {}
    test = (summary or {}).get("test") or {}
    metric = (summary or {}).get("headline_metric") or next(
        (k for k, v in test.items() if k != "loss" and _is_number(v)), "loss" if "loss" in test else None)
    baseline = (summary or {}).get("baseline") or {}
    checkpoint = _newest_state(run)
    if summary is not None:
        step, wall = summary.get("global_step"), summary.get("wall_seconds")
    elif failure is not None:
        step, wall = failure.get("step"), failure.get("elapsed_seconds")
    else:
        step, wall = checkpoint.get("global_step"), checkpoint.get("elapsed_seconds")
    return RunInfo(
        name=run.name, path=str(run.path), status=status, task=(config.get("run") or {}).get("task"),
        model=(config.get("model") or {}).get("name_or_path"), data=_data_name(data),
        split_sizes=(summary or {}).get("split_sizes"), metric=metric,
        value=test.get(metric) if _is_number(test.get(metric)) else None,
        baseline=baseline.get(metric) if _is_number(baseline.get(metric)) else None,
        baseline_name=baseline.get("name"), step=step, wall_seconds=wall, size_bytes=size,
        updated=datetime.datetime.fromtimestamp(updated).isoformat(timespec="seconds"),
        resume=None if status == "finished" else resume_command(run),
        error=None if failure is None else f"{failure.get('type', 'error')}: {failure.get('error', '')}")


def list_runs(folder: Path, sort: str = "time", reverse: bool = False) -> list[RunInfo]:
    """The runs of ``folder``, sorted by ``sort`` (one of ``SORT_KEYS``); runs without the value go last."""
    if sort not in SORT_KEYS:
        raise RunFolderError(f"--sort must be one of {', '.join(SORT_KEYS)}; got {sort!r}")
    infos = [describe(run) for run in find_runs(folder)]
    field = {"time": "updated", "metric": "value", "wall": "wall_seconds", "size": "size_bytes"}.get(sort, sort)
    known = [i for i in infos if getattr(i, field) is not None]
    known.sort(key=lambda i: getattr(i, field), reverse=reverse)
    return known + [i for i in infos if getattr(i, field) is None]


def format_runs(infos: list[RunInfo]) -> str:
    """A plain-text table, then how to continue each stopped or failed run."""
    if not infos:
        return "no runs"
    header = ["name", "status", "task", "model", "data (train/val/test)", "test metric", "baseline", "steps",
              "wall", "size", "updated"]
    rows = []
    for i in infos:
        sizes = "/".join(str((i.split_sizes or {}).get(k, "?")) for k in ("train", "validation", "test")) \
            if i.split_sizes else "-"
        rows.append([i.name, i.status, i.task or "?", _short_model(i.model), f"{i.data} {sizes}",
                     f"{i.metric} {i.value:.4f}" if i.value is not None else "-",
                     f"{i.baseline:.4f}" if i.baseline is not None else "-", str(i.step if i.step is not None else "-"),
                     _duration(i.wall_seconds), _size(i.size_bytes), i.updated.replace("T", " ")[:16]])
    lines = _table([header] + rows)
    notes = [f"{i.name}: {i.status}" + (f" ({i.error})" if i.error else "") + f"; resume: {i.resume}"
             for i in infos if i.status != "finished"]
    return "\n".join(lines + ([""] + notes if notes else []))


# --- compare -----------------------------------------------------------------------------------------------
def compare(paths: list[Path]) -> dict[str, Any]:
    """Several runs side by side: their test metrics (with each run's difference from the first) and the config
    keys whose values differ (``run.name`` aside)."""
    if len(paths) < 2:
        raise RunFolderError("compare needs at least two runs")
    runs = []
    for path in paths:
        run = RunFolder(path)
        if not run.config.is_file():
            raise RunFolderError(f"{path} is not a run folder: no {run.config.name}")
        runs.append(run)
    summaries = [_read_json(run.metrics) if run.is_finished() else {} for run in runs]
    metrics: dict[str, list[float | None]] = {}
    for index, summary in enumerate(summaries):
        values = {f"test {k}": v for k, v in flatten(summary.get("test") or {}).items() if _is_number(v)}
        values.update({k: summary.get(k) for k in ("wall_seconds", "global_step", "best_step")
                       if _is_number(summary.get(k))})
        for key, value in values.items():
            if key != "test eval_seconds":
                metrics.setdefault(key, [None] * len(runs))[index] = value
    rows = [{"metric": key, "values": values,
             "differences": [None if v is None or values[0] is None else v - values[0] for v in values[1:]]}
            for key, values in metrics.items()]
    configs = [flatten(_read_yaml(run.config)) for run in runs]
    keys = sorted({k for c in configs for k in c} - {"run.name"})
    differing = [{"key": k, "values": [c.get(k) for c in configs]} for k in keys
                 if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]
    return {"runs": [{"name": run.name, "path": str(run.path), "status": describe(run).status} for run in runs],
            "metrics": rows, "config": differing}


def format_comparison(comparison: dict[str, Any]) -> str:
    names = [r["name"] for r in comparison["runs"]]
    first = names[0]
    header = ["metric", *names, *[f"{n} - {first}" for n in names[1:]]]
    rows = [[row["metric"], *[_value(v) for v in row["values"]], *[_difference(d) for d in row["differences"]]]
            for row in comparison["metrics"]]
    lines = _table([header] + rows) if rows else ["no metrics: none of these runs finished"]
    unfinished = [f"{r['name']} is {r['status']}: no test metrics" for r in comparison["runs"]
                  if r["status"] != "finished"]
    lines += unfinished
    lines.append("")
    if comparison["config"]:
        lines.append("config keys that differ:")
        lines += _table([["key", *names]] + [[row["key"], *[_value(v) for v in row["values"]]]
                                              for row in comparison["config"]])
    else:
        lines.append("the configs are the same (besides run.name)")
    return "\n".join(lines)


# --- helpers -----------------------------------------------------------------------------------------------
def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(row[c])) for row in rows) for c in range(len(rows[0]))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _newest_state(run: RunFolder) -> dict[str, Any]:
    checkpoints = run.complete_checkpoints()
    return _read_json(checkpoints[-1] / CHECKPOINT_STATE) if checkpoints else {}


def _size_and_time(folder: Path) -> tuple[int, float]:
    """Bytes of the files under ``folder`` (links not followed) and the newest modification time."""
    size, newest = 0, folder.stat().st_mtime
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                stat = os.lstat(os.path.join(root, name))
            except OSError:  # removed while we walk (a checkpoint being replaced)
                continue
            size += stat.st_size
            newest = max(newest, stat.st_mtime)
    return size, newest


def _data_name(data: dict[str, Any]) -> str:
    source = data.get("source") or "?"
    if source == "files":
        names = [Path(data[k]).name for k in ("train_file", "test_file") if data.get(k)]
        return ",".join(names) or "files"
    return source


def _short_model(model: str | None) -> str:
    if not model:
        return "?"
    return Path(model).name if model.startswith((".", "/", "~")) else model


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def _difference(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if isinstance(value, float) else f"{value:+d}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"  # pragma: no cover
