"""Classification end to end on a tiny BERT: train -> run folder -> eval -> predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import synthetic_reviews, tiny_overrides, write_csv
from finetune.cli import main
from finetune.evaluation import evaluate_run
from finetune.trained_run import load_run

LEARNS = {"lora.method": "full", "train.learning_rate": 0.003, "train.epochs": 3, "train.scheduler": "constant",
          "train.warmup_ratio": 0, "train.eval_every_steps": 20}


@pytest.fixture(scope="module")
def trained_full(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    """A finished full fine-tuning run on 600 synthetic reviews."""
    folder = tmp_path_factory.mktemp("full")
    data = write_csv(folder / "reviews.csv", synthetic_reviews(600))
    assert main(["train", "classify", *tiny_overrides(tiny_bert, data, folder / "runs", **LEARNS)]) == 0
    return folder / "runs" / "tiny"


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    folder = tmp_path_factory.mktemp("lora")
    data = write_csv(folder / "reviews.csv", synthetic_reviews(300))
    extra = {"train.learning_rate": 0.01, "train.epochs": 2, "train.eval_every_steps": 10}
    assert main(["train", "classify", *tiny_overrides(tiny_bert, data, folder / "runs", **extra)]) == 0
    return folder / "runs" / "tiny"


def test_run_folder_holds_everything(trained_full: Path) -> None:
    for name in ("config.yaml", "metrics.json", "train_log.jsonl", "curves.png", "predictions_test.jsonl",
                 "README.md", "source.json", "model/task.json", "model/model.safetensors",
                 "model/tokenizer.json"):
        assert (trained_full / name).is_file(), name
    metrics = json.loads((trained_full / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"accuracy", "macro_f1", "per_class", "loss"}
    assert set(metrics["test"]["per_class"]) == {"negative", "neutral", "positive"}
    source = json.loads((trained_full / "source.json").read_text())
    assert source["source"] == "local"


def test_full_fine_tuning_learns_and_beats_the_majority_baseline(trained_full: Path) -> None:
    metrics = json.loads((trained_full / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= metrics["baseline"]["accuracy"] + 0.3
    assert metrics["baseline"]["name"].startswith("majority class")


def test_eval_reproduces_the_test_metrics(trained_full: Path, capsys: pytest.CaptureFixture) -> None:
    saved = json.loads((trained_full / "metrics.json").read_text())["test"]
    assert main(["eval", str(trained_full)]) == 0
    printed = capsys.readouterr().out
    reproduced = json.loads(printed[printed.index("{"):])
    assert reproduced["accuracy"] == saved["accuracy"]
    assert reproduced["macro_f1"] == saved["macro_f1"]
    assert reproduced["per_class"] == saved["per_class"]
    assert reproduced["loss"] == pytest.approx(saved["loss"], abs=1e-6)


def test_logs_every_step_once(trained_full: Path) -> None:
    records = [json.loads(line) for line in (trained_full / "train_log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "split" not in r]
    assert train_steps == sorted(set(train_steps))
    assert {"loss", "lr", "tokens_per_second", "samples_per_second"} <= set(records[0])


def test_predict_text_and_file(trained_full: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["predict", str(trained_full), "--text", "the movie was excellent", "--text", "a table"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == ["positive", "neutral"]
    assert abs(sum(rows[0]["scores"].values()) - 1) < 1e-4
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"text": "the movie was awful"}\n{"text": "it was a lovely day"}\n', encoding="utf-8")
    assert main(["predict", str(trained_full), "--input", str(inputs), "--output", str(tmp_path / "out.jsonl")]) == 0
    labels = [json.loads(line)["label"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert labels == ["negative", "positive"]


def test_lora_adapter_reloads_with_its_head_and_predicts_the_same(trained_lora: Path) -> None:
    with safe_open(str(trained_lora / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert any("classifier" in k for k in keys), "the head is saved with the adapter (modules_to_save)"
    assert any("lora_A" in k for k in keys)
    saved = [json.loads(line) for line in (trained_lora / "predictions_test.jsonl").read_text().splitlines()]
    result = evaluate_run(load_run(trained_lora))
    assert [r["prediction"] for r in result.predictions] == [r["prediction"] for r in saved]
    assert [r["score"] for r in result.predictions] == pytest.approx([r["score"] for r in saved], abs=1e-5)


def test_csv_with_other_column_names_trains_through_overrides(tiny_bert: Path, tmp_path: Path) -> None:
    rows = [(text, {"negative": "1", "neutral": "3", "positive": "5"}[label])
            for text, label in synthetic_reviews(200)]
    data = write_csv(tmp_path / "reviews.csv", rows, header=("review", "stars"))
    overrides = tiny_overrides(tiny_bert, data, tmp_path / "runs", **{"train.epochs": 1})
    assert main(["train", "classify", *overrides, "data.text_column=review", "data.label_column=stars"]) == 0
    labels = json.loads((tmp_path / "runs" / "tiny" / "adapter" / "task.json").read_text())["learned"]["labels"]
    assert labels == ["1", "3", "5"]


def test_a_finished_run_is_never_overwritten_silently(trained_lora: Path, tiny_bert: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    data = write_csv(tmp_path / "r.csv", synthetic_reviews(60))
    before = (trained_lora / "metrics.json").read_bytes()
    overrides = tiny_overrides(tiny_bert, data, trained_lora.parent, **{"train.epochs": 1})
    assert main(["train", "classify", *overrides]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert (trained_lora / "metrics.json").read_bytes() == before


def test_tensorboard_tracker_writes_events(tiny_bert: Path, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "r.csv", synthetic_reviews(100))
    overrides = tiny_overrides(tiny_bert, data, tmp_path / "runs", **{"train.epochs": 1, "train.log_every_steps": 2})
    assert main(["train", "classify", *overrides, "train.trackers=[tensorboard]"]) == 0
    events = list((tmp_path / "runs" / "tiny" / "logs").rglob("events.out.tfevents.*"))
    assert events and any(e.stat().st_size > 0 for e in events)
