"""`finetune runs` lists finished, stopped and failed runs (each recognisable, with how to continue it);
`finetune compare` puts runs side by side; default run names say what a run holds; the end of a run says
where it is and what comes next."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.checkpoints import FAULT_ENV
from finetune.cli import main
from tiny_runs import task_run_args, train_task_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """In one folder: two finished runs (learning rates 0.01 and 0.003), one killed mid-run (stopped), one
    ended by an error (failed)."""
    root = tmp_path_factory.mktemp("runs")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        finished = train_task_run("classification", root)
        other = train_task_run("classification", root, **{"train.learning_rate": 0.003, "run.name": "lr-0.003"})
    recipe, args = task_run_args("classification", root, **{"run.name": "killed", "train.save_every_steps": 2})
    env = {**os.environ, "PYTHONPATH": str(ROOT), FAULT_ENV: "kill-after-step:3"}
    killed = subprocess.run([sys.executable, "-m", "finetune", "train", recipe, *args], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    recipe, args = task_run_args("classification", root, **{"run.name": "diverged", "train.learning_rate": 1e30,
                                                            "lora.method": "full"})
    assert main(["train", recipe, *args]) == 2  # the loss is not finite: an error ends the run
    return {"folder": root / "runs", "finished": finished, "other": other, "printed": printed.getvalue()}


def listed(folder: Path, capsys: pytest.CaptureFixture, *options: str) -> list[dict]:
    capsys.readouterr()
    assert main(["runs", str(folder), "--json", *options]) == 0
    return json.loads(capsys.readouterr().out)


def test_default_run_name_says_recipe_data_and_time(runs: dict) -> None:
    assert re.fullmatch(r"classify-reviews-\d{8}-\d{6}", runs["finished"].name)


def test_runs_lists_finished_stopped_and_failed_runs(runs: dict, capsys: pytest.CaptureFixture) -> None:
    by_name = {r["name"]: r for r in listed(runs["folder"], capsys)}
    assert set(by_name) == {runs["finished"].name, "lr-0.003", "killed", "diverged"}
    finished = by_name[runs["finished"].name]
    metrics = json.loads((runs["finished"] / "metrics.json").read_text())
    assert finished["status"] == "finished" and finished["resume"] is None and finished["error"] is None
    assert finished["task"] == "classification" and finished["metric"] == "accuracy"
    assert finished["value"] == metrics["test"]["accuracy"] and finished["baseline"] == metrics["baseline"]["accuracy"]
    assert finished["split_sizes"] == metrics["split_sizes"] and finished["data"] == "reviews.csv"
    assert finished["wall_seconds"] == metrics["wall_seconds"] > 0 and finished["size_bytes"] > 0
    stopped = by_name["killed"]
    assert stopped["status"] == "stopped" and stopped["step"] == 2  # its newest checkpoint
    assert stopped["resume"] == f"finetune train {runs['folder'] / 'killed' / 'config.yaml'} --resume auto"
    failed = by_name["diverged"]
    assert failed["status"] == "failed" and "loss is" in failed["error"]
    assert failed["step"] == int(re.search(r"at step (\d+)", failed["error"]).group(1)) - 1  # steps done
    assert failed["resume"].endswith("diverged/config.yaml --resume auto")

    assert main(["runs", str(runs["folder"])]) == 0
    table = capsys.readouterr().out
    header, *lines = table.splitlines()
    assert header.split()[:3] == ["name", "status", "task"]
    for name, status in (("killed", "stopped"), ("diverged", "failed"), ("lr-0.003", "finished")):
        assert any(line.split()[:2] == [name, status] for line in lines), table
    assert f"killed: stopped; resume: {stopped['resume']}" in table
    assert "diverged: failed (FinetuneError: loss is" in table


def test_runs_sort_by_any_column(runs: dict, capsys: pytest.CaptureFixture) -> None:
    names = [r["name"] for r in listed(runs["folder"], capsys, "--sort", "name")]
    assert names == sorted(names)
    assert [r["name"] for r in listed(runs["folder"], capsys, "--sort", "name", "--reverse")] == names[::-1]
    by_metric = listed(runs["folder"], capsys, "--sort", "metric", "--reverse")
    values = [r["value"] for r in by_metric if r["value"] is not None]
    assert len(values) == 2 and values == sorted(values, reverse=True)
    assert all(r["value"] is None for r in by_metric[2:])  # runs without a test metric come last
    assert main(["runs", str(runs["folder"]), "--sort", "colour"]) == 2


def test_compare_shows_metrics_side_by_side_and_the_config_keys_that_differ(runs: dict,
                                                                           capsys: pytest.CaptureFixture) -> None:
    a, b = runs["finished"], runs["other"]
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--json"]) == 0
    comparison = json.loads(capsys.readouterr().out)
    rows = {row["metric"]: row for row in comparison["metrics"]}
    ours = [json.loads((run / "metrics.json").read_text())["test"] for run in (a, b)]
    assert rows["test accuracy"]["values"] == [ours[0]["accuracy"], ours[1]["accuracy"]]
    assert rows["test accuracy"]["differences"] == [pytest.approx(ours[1]["accuracy"] - ours[0]["accuracy"])]
    assert "test per_class.positive.f1" in rows
    assert comparison["config"] == [{"key": "train.learning_rate", "values": [0.01, 0.003]}]

    assert main(["compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    line = next(line for line in text.splitlines() if line.startswith("test macro_f1"))
    difference = ours[1]["macro_f1"] - ours[0]["macro_f1"]
    assert line.split()[2:] == [f"{ours[0]['macro_f1']:.4f}", f"{ours[1]['macro_f1']:.4f}", f"{difference:+.4f}"]
    assert re.search(r"^train\.learning_rate\s+0\.0100\s+0\.0030$", text, flags=re.M), text
    assert main(["compare", str(a)]) == 2  # one run is nothing to compare


def test_the_end_of_a_run_shows_its_folder_and_next_commands(runs: dict) -> None:
    printed, run = runs["printed"], runs["finished"]
    assert f"run folder: {run}" in printed and f"report:     {run / 'report.html'}" in printed
    for command in (f"finetune eval {run}", f'finetune predict {run} --text "what a lovely day"',
                    f"finetune report {run}", f"finetune push {run} --repo ORG/NAME"):
        assert command in printed
    assert re.search(r"accuracy\s+[\d.]+\s+baseline \(majority class", printed)


def test_a_failed_run_resumed_after_the_fix_is_no_longer_failed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The resume command `finetune runs` prints continues the run; its failure record goes once it runs again."""
    from finetune.run_folder import RunFolder, write_failure

    recipe, args = task_run_args("classification", tmp_path, **{"run.name": "flaky", "train.save_every_steps": 2})
    env = {**os.environ, "PYTHONPATH": str(ROOT), FAULT_ENV: "kill-after-step:3"}
    killed = subprocess.run([sys.executable, "-m", "finetune", "train", recipe, *args], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = RunFolder(tmp_path / "runs" / "flaky")
    write_failure(run, OSError("disk full"), step=3, elapsed_seconds=1.0, process=0)
    (info,) = listed(run.path.parent, capsys)
    assert info["status"] == "failed" and info["error"] == "OSError: disk full"
    assert main(info["resume"].split()[1:]) == 0  # `finetune train RUN/config.yaml --resume auto`
    (info,) = listed(run.path.parent, capsys)
    assert info["status"] == "finished" and not run.failure.exists()


def test_resume_without_a_name_picks_the_newest_unfinished_run_of_this_recipe_and_data(tmp_path: Path) -> None:
    from finetune.recipes import RECIPES_DIR, load_config
    from finetune.run_folder import data_name, default_run_name
    from finetune.train import latest_unfinished_run

    data = load_config(RECIPES_DIR / "translate.yaml").data
    assert data_name(data) == "bible-en-es"
    assert re.fullmatch(r"translate-bible-en-es-\d{8}-\d{6}", default_run_name("translate", data))
    for name in ("translate-bible-en-es-20260101-090000", "translate-bible-en-es-20260301-090000",
                 "translate-20260201-090000",  # named before the data was part of the name
                 "translate-seq2seq-bible-en-es-20260401-090000",  # another recipe sharing the prefix
                 "translate-other-20260501-090000", "translate-bible-en-es-20260601-090000"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("run: {task: translation}\n", encoding="utf-8")
    (tmp_path / "translate-bible-en-es-20260601-090000" / "metrics.json").write_text("{}")  # finished
    assert latest_unfinished_run(tmp_path, "translate", data) == "translate-bible-en-es-20260301-090000"
