"""User mistakes: one line on stderr naming what is wrong, exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import synthetic_reviews, write_csv

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real command in a fresh process: exit code and stderr as a user sees them."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


@pytest.fixture()
def cli(capsys: pytest.CaptureFixture):
    """The same command in this process (fast): returns an object like subprocess' result."""
    from finetune.cli import main

    def run(*args: str) -> subprocess.CompletedProcess:
        code = main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)
    return run


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def files_overrides(train: Path, out: Path) -> list[str]:
    return ["data.source=files", f"data.train_file={train}", f"run.output_dir={out}"]


def test_unknown_config_key() -> None:
    assert_user_error(run_cli("train", "classify", "train.epoch=2"), "unknown config key 'train.epoch'",
                      "known keys in 'train'")


def test_wrong_value_type(cli) -> None:
    assert_user_error(cli("train", "classify", "train.batch_size=big"), "'train.batch_size' expects an integer")


def test_overrides_after_an_option_are_overrides(cli) -> None:
    """`--overwrite key=value`: the override is read (and here refused by validation), not an argparse error."""
    assert_user_error(cli("train", "classify", "--overwrite", "train.batch_size=big"),
                      "'train.batch_size' expects an integer")


def test_unknown_option_is_refused(cli) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli("train", "classify", "--overwrite", "--bogus")
    assert stopped.value.code == 2


def test_unknown_recipe(cli) -> None:
    assert_user_error(cli("train", "clasify"), "unknown recipe 'clasify'", "classify")


def test_missing_data_file(cli, tmp_path: Path) -> None:
    assert_user_error(cli("train", "classify", *files_overrides(tmp_path / "nope.csv", tmp_path)),
                      "data file not found", "nope.csv")


def test_missing_column(tmp_path: Path) -> None:
    data = write_csv(tmp_path / "reviews.csv", synthetic_reviews(30), header=("review", "stars"))
    assert_user_error(run_cli("train", "classify", *files_overrides(data, tmp_path)),
                      "reviews.csv", "no column 'text'", "it has: review, stars")


def test_label_column_with_one_class(cli, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "one.csv", [(f"text {i}", "spam") for i in range(30)])
    assert_user_error(cli("train", "classify", *files_overrides(data, tmp_path)),
                      "one.csv", "has 1 class (spam); need at least 2")


def test_empty_split(cli, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "train.csv", synthetic_reviews(30))
    test = tmp_path / "test.csv"
    test.write_text("text,label\n", encoding="utf-8")
    assert_user_error(cli("train", "classify", *files_overrides(data, tmp_path), f"data.test_file={test}"),
                      "test.csv: no rows")


def test_model_path_that_does_not_exist(cli, tmp_path: Path) -> None:
    assert_user_error(cli("train", "classify", "model.name_or_path=./no/such/model", f"run.output_dir={tmp_path}"),
                      "model path does not exist: ./no/such/model")


def test_eval_of_a_folder_that_is_not_a_run(cli, tmp_path: Path) -> None:
    assert_user_error(cli("eval", str(tmp_path)), "is not a run folder")


@pytest.mark.parametrize("flag", ["--debug"])
def test_debug_shows_the_traceback(flag: str) -> None:
    result = run_cli("train", "classify", "train.epoch=2", flag)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_recipes_lists_the_shipped_recipes() -> None:
    result = run_cli("recipes")
    assert result.returncode == 0
    assert "classify" in result.stdout and "classification" in result.stdout
