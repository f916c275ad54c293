"""Every user mistake: one line naming the file, row, column or key, exit code 2, nothing overwritten.

Cases for all four tasks; each runs the real CLI entry point in this process (the subprocess tests in
test_cli_errors.py show the same holds for a fresh process, with no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import synthetic_reviews, tiny_overrides, write_csv
from finetune.cli import main


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = main(list(args))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    return code, errors[0]


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    good = write_csv(tmp_path / "good.csv", synthetic_reviews(60))
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9,a\nol\xe9,b\n".encode("latin-1"))
    unknown_label = write_csv(tmp_path / "test.csv", [("good movie", "positive"), ("meh", "sarcastic")])
    blank_text = write_csv(tmp_path / "blank.csv", [("fine", "positive"), ("", "negative"), ("bad", "negative")])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("run:\n  task: classification\n train: [\n", encoding="utf-8")
    return {"good": good, "empty": empty, "latin": latin, "unknown_label": unknown_label, "blank": blank_text,
            "bad_yaml": bad_yaml, "tmp": tmp_path}


CLASSIFICATION_CASES = {
    "empty file": (lambda f: ["data.source=files", f"data.train_file={f['empty']}"], ["empty.csv: the file is empty"]),
    "non-UTF-8 bytes": (lambda f: ["data.source=files", f"data.train_file={f['latin']}"], ["latin.csv: not UTF-8"]),
    "empty text": (lambda f: ["data.source=files", f"data.train_file={f['blank']}"],
                   ["blank.csv", "row 2, column 'text': empty or missing text"]),
    "unknown label in the test split": (
        lambda f: ["data.source=files", f"data.train_file={f['good']}", f"data.test_file={f['unknown_label']}"],
        ["test.csv: row 2, column 'label': label 'sarcastic' is not among the training labels"]),
    "missing column": (lambda f: ["data.source=files", f"data.train_file={f['good']}", "data.label_column=stars"],
                       ["good.csv: no column 'stars' (data.label_column); it has: text, label"]),
    "unknown built-in dataset": (lambda f: ["data.source=builtin:imdb"], ["unknown built-in dataset 'imdb'"]),
    "model path that does not exist": (lambda f: ["model.name_or_path=/no/such/model"],
                                       ["model path does not exist: /no/such/model"]),
    "unknown task": (lambda f: ["run.task=segmentation"], ["'run.task' must be one of"]),
    "wrong type": (lambda f: ["train.epochs=[1]"], ["'train.epochs' expects a number"]),
    "impossible value": (lambda f: ["data.validation_size=0.6", "data.test_size=0.6"],
                         ["'data.test_size' must be such that validation_size + test_size < 1"]),
    "unknown key": (lambda f: ["lora.rank=8"], ["unknown config key 'lora.rank'", "known keys in 'lora'"]),
    "override without =": (lambda f: ["train.epochs"], ["override 'train.epochs' is not of the form"]),
}


@pytest.mark.parametrize("case", sorted(CLASSIFICATION_CASES))
def test_classification_recipe_mistakes(case: str, files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    make_args, fragments = CLASSIFICATION_CASES[case]
    code, error = run(capsys, "train", "classify", f"run.output_dir={files['tmp'] / 'runs'}", *make_args(files))
    assert code == 2
    for fragment in fragments:
        assert fragment in error, error


def test_malformed_yaml_recipe(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    code, error = run(capsys, "train", str(files["bad_yaml"]))
    assert code == 2 and "bad.yaml: malformed YAML at line" in error


def test_unknown_recipe(capsys: pytest.CaptureFixture) -> None:
    code, error = run(capsys, "train", "sentiment")
    assert code == 2 and "unknown recipe 'sentiment'; shipped recipes:" in error


def test_resume_from_a_truncated_checkpoint_folder(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    folder = files["tmp"] / "step-00000004"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x00" * 10)
    code, error = run(capsys, "train", "classify", f"run.output_dir={files['tmp'] / 'runs'}", "run.name=x",
                      "--resume", str(folder))
    assert code == 2 and f"--resume {folder}: not a complete checkpoint (no trainer_state.json)" in error


def test_eval_of_an_unfinished_run(tiny_bert: Path, files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    run_dir = files["tmp"] / "runs" / "half"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("run:\n  task: classification\n", encoding="utf-8")
    code, error = run(capsys, "eval", str(run_dir))
    assert code == 2 and "is not a finished run" in error


def test_predict_with_an_empty_input(tiny_bert: Path, files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    overrides = tiny_overrides(tiny_bert, files["good"], files["tmp"] / "runs", **{"train.epochs": 1})
    assert main(["train", "classify", *overrides]) == 0
    capsys.readouterr()
    code, error = run(capsys, "predict", str(files["tmp"] / "runs" / "tiny"), "--text", "  ")
    assert code == 2 and "input 1: a classification input needs a non-empty 'text'" in error
    before = (files["tmp"] / "runs" / "tiny" / "metrics.json").read_bytes()
    code, error = run(capsys, "train", "classify", *overrides)
    assert code == 2 and "holds a finished run" in error
    assert (files["tmp"] / "runs" / "tiny" / "metrics.json").read_bytes() == before
    assert json.loads(before)["test"]
