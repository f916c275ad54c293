"""Recipes: where the shipped ones are, and how a recipe becomes a validated :class:`Config`.

The flow: YAML + ``key=value`` overrides (``finetune.config.read_recipe``) -> ``run.task`` picks the task
from the registry -> the task's own ``data`` / ``eval`` sections are built with the common ones
(``finetune.config.build_config``) -> the task checks what spans sections (``Task.validate_config``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from finetune.config import Config, DataConfig, EvalConfig, build_config, read_recipe, task_name
from finetune.errors import ConfigError
from finetune.tasks import TASKS, Task, task_class

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def load_config(recipe: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a recipe YAML (or start from defaults), apply ``key=value`` overrides, validate."""
    raw = read_recipe(recipe, overrides)
    task = task_class(task_name(raw))
    config = build_config(raw, {"data": task.Data, "eval": task.Eval}, foreign_keys(task))
    task.validate_config(config)
    return config


def foreign_keys(task: type[Task]) -> dict[str, str]:
    """``section.key`` -> the tasks that own it (``a or b`` when several share it), for the task-specific keys
    that ``task`` does not have."""
    own = {f"data.{f.name}" for f in dataclasses.fields(task.Data)} | \
          {f"eval.{f.name}" for f in dataclasses.fields(task.Eval)}
    owners: dict[str, list[str]] = {}
    for name, other in sorted(TASKS.items()):
        for section, cls, common in (("data", other.Data, DataConfig), ("eval", other.Eval, EvalConfig)):
            for f in dataclasses.fields(cls):
                key = f"{section}.{f.name}"
                if key not in own and f.name not in {g.name for g in dataclasses.fields(common)}:
                    owners.setdefault(key, []).append(name)
    return {key: " or ".join(names) for key, names in owners.items()}


def resolve_recipe(name: str) -> tuple[Path, str]:
    """A recipe path, or the name of a shipped recipe -> (path, recipe name)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path, path.stem
    shipped = RECIPES_DIR / f"{name}.yaml"
    if shipped.is_file():
        return shipped, name
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise ConfigError(f"unknown recipe {name!r}; shipped recipes: {known}")
