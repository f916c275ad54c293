"""The shape of the package: no import cycles, a config core that knows no task, one owner of the run
folder's file names, a task lifecycle without hidden order, and a loop whose phases fit on a screen."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from pathlib import Path

import pytest

from finetune.errors import ConfigError
from finetune.recipes import RECIPES_DIR, load_config
from finetune.tasks import TASKS

PACKAGE = Path(__file__).resolve().parent.parent / "finetune"


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (at the top or inside functions: a late import still ties
    the two modules together for a reader)."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                found = owner(target)
                if found and found != name:
                    graph[name].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle() -> None:
    assert cycles(import_graph(PACKAGE)) == []


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    """The check above can fail: a package whose a imports b (late) and b imports a."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "a.py").write_text("def f():\n    from pkg import b\n", encoding="utf-8")
    (package / "b.py").write_text("from pkg.a import f\n", encoding="utf-8")
    (package / "c.py").write_text("from . import a\n", encoding="utf-8")
    assert cycles(import_graph(package)) == [["pkg.a", "pkg.b"]]


def test_the_config_core_imports_no_task_and_no_model_library() -> None:
    imported = import_graph(PACKAGE)["finetune.config"]
    assert imported == {"finetune.errors"}
    source = (PACKAGE / "config.py").read_text(encoding="utf-8")
    for library in ("torch", "transformers", "datasets", "peft", "accelerate"):
        assert f"import {library}" not in source


RUN_FILES = ("config.yaml", "metrics.json", "train_log.jsonl", "curves.png", "predictions_test.jsonl",
             "README.md", "source.json", "before_training.json", "task.json", "trainer_state.json",
             "adapter_config.json", "trainable.safetensors", "report.html", "failure.json")


def test_only_the_run_folder_module_spells_run_file_names() -> None:
    """No ``path / "metrics.json"`` or bare file-name constant outside finetune/run_folder.py."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "run_folder.py" or "metrics" in path.parts or "builtin" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) \
                    and isinstance(node.right, ast.Constant) and node.right.value in RUN_FILES:
                offenders.append(f"{path.name}:{node.lineno} / {node.right.value!r}")
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                    and node.value.value in RUN_FILES:
                offenders.append(f"{path.name}:{node.lineno} = {node.value.value!r}")
    assert offenders == []


# --- tasks own their settings -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_declares_its_sections_and_what_it_learns(name: str) -> None:
    from finetune.config import DataConfig, EvalConfig
    from finetune.tasks.base import Learned

    task = TASKS[name]
    assert issubclass(task.Data, DataConfig) and issubclass(task.Eval, EvalConfig)
    assert issubclass(task.Learned, Learned) and task.Learned.__dataclass_params__.frozen
    assert task.metrics_higher_is_better.get("loss") is False and task.headline_metrics


@pytest.mark.parametrize("learned", [
    ("classification", {"labels": ["neg", "pos"], "problem_type": "multi_label", "max_length": 64,
                        "thresholds": [0.35, 0.6], "target_mean": 0.0, "target_std": 1.0}),
    ("question-answering", {"unanswerable": True}),
    ("generation", {"shape": "messages"}),
    ("translation", {"kind": "decoder", "model_type": "llama"}),
], ids=lambda item: item[0])
def test_what_a_task_learned_round_trips_through_json(learned: tuple[str, dict]) -> None:
    name, values = learned
    value = TASKS[name].Learned.from_dict(json.loads(json.dumps(values)), "task.json")
    assert json.loads(json.dumps(value.to_dict())) == values
    with pytest.raises(Exception, match="task.json: expected the keys"):
        TASKS[name].Learned.from_dict({**values, "extra": 1}, "task.json")


def test_a_task_key_of_another_task_is_named_as_such() -> None:
    with pytest.raises(ConfigError, match="'data.question_column' belongs to task question-answering"):
        load_config(RECIPES_DIR / "classify.yaml", ["data.question_column=q"])
    with pytest.raises(ConfigError, match="'eval.num_beams' belongs to task summarization or translation"):
        load_config(RECIPES_DIR / "qa.yaml", ["eval.num_beams=4"])
    with pytest.raises(ConfigError, match="unknown config key 'data.colour'; known keys in 'data'"):
        load_config(RECIPES_DIR / "classify.yaml", ["data.colour=red"])


def test_each_shipped_recipe_builds_its_tasks_own_sections() -> None:
    for recipe in sorted(RECIPES_DIR.glob("*.yaml")):
        config = load_config(recipe, ["data.source=files", "data.train_file=your.txt"])
        task = TASKS[config.run.task]
        assert type(config.data) is task.Data and type(config.eval) is task.Eval, recipe.name


def test_a_task_refuses_use_before_it_is_bound_and_a_second_binding() -> None:
    from finetune.tasks.classification import ClassificationLearned

    config = load_config(RECIPES_DIR / "classify.yaml")
    task = TASKS["classification"](config)
    with pytest.raises(RuntimeError, match="not bound yet"):
        task.model_kwargs()
    task.bind(ClassificationLearned(("neg", "pos")), tokenizer=object())
    assert task.model_kwargs()["num_labels"] == 2
    with pytest.raises(RuntimeError, match="already bound"):
        task.bind(ClassificationLearned(("a", "b")), tokenizer=object())


# --- the loop reads as phases -------------------------------------------------------------------------
def test_each_phase_of_the_training_run_fits_on_a_screen() -> None:
    from finetune.train import TrainingRun

    lengths = {name: len(inspect.getsource(member).splitlines())
               for name, member in vars(TrainingRun).items() if inspect.isfunction(member)}
    assert {"setup", "fit", "finish"} <= set(lengths)
    assert max(lengths.values()) <= 50, lengths


def test_settings_fields_are_documented() -> None:
    """Every task-specific setting has a docstring (the line after it), as the common sections do, unless
    its name says it all (``*_column`` of an obvious column)."""
    from finetune.config import DataConfig, EvalConfig

    for task in TASKS.values():
        for cls in {task.Data, task.Eval} - {DataConfig, EvalConfig}:
            source = inspect.getsource(cls)
            own = [f.name for f in dataclasses.fields(cls) if f.name in cls.__annotations__]
            lines = source.splitlines()
            for field in own:
                at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{field}:"))
                documented = at + 1 < len(lines) and lines[at + 1].strip().startswith('"""')
                assert documented or field.endswith("_column") or field in ("temperature", "top_p"), \
                    f"{cls.__name__}.{field} has no docstring"
