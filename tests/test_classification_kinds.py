"""Classification on users' own data: auto lengths, group-aware splits, multi-label, regression, seeing mistakes,
predict on the training format. Tiny BERT, a few hundred synthetic rows."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import datasets
import numpy as np
import pytest

from conftest import FILLER, NEGATIVE, NEUTRAL, POSITIVE, bound_task, synthetic_reviews, tiny_overrides, write_csv
from finetune.cli import main
from finetune.config import DataConfig
from finetune.data import GROUP, INPUT_LENGTH, auto_max_length, load_splits, make_splits
from finetune.evaluation import evaluate_run
from finetune.recipes import RECIPES_DIR, load_config
from finetune.tasks.classification import (best_constant_labels, multi_label_scores, regression_scores,
                                           tune_thresholds)
from finetune.trained_run import load_run
from finetune.train import auto_length

CUES = {"good": POSITIVE, "bad": NEGATIVE, "thing": NEUTRAL}


def multi_label_rows(n: int, seed: int = 0) -> list[dict]:
    """Texts holding cue words of 0-3 of the categories; the labels are those categories; 5 rows per document."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        labels = rng.sample(sorted(CUES), rng.choice([0, 1, 1, 2, 2, 3]))
        words = [rng.choice(FILLER) for _ in range(rng.randint(1, 4))]
        for label in labels:
            words.insert(rng.randrange(len(words) + 1), rng.choice(CUES[label]))
        rows.append({"text": " ".join(words), "tags": labels, "doc": f"d{i // 5}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- what must hold 3: lengths, groups, thresholds, regression metrics ------------------------------
def test_auto_max_length_is_the_smallest_multiple_of_8_covering_p95_capped_by_the_model() -> None:
    lengths = list(range(1, 101))  # p95 = 95.05
    assert auto_max_length(lengths, model_limit=512) == 96
    assert auto_max_length([3, 4, 5], model_limit=512) == 8
    assert auto_max_length(lengths, model_limit=64) == 64


def test_auto_length_covers_p95_of_the_training_texts_and_counts_truncation(tiny_bert: Path, tmp_path: Path) -> None:
    rng = random.Random(1)
    sizes = [rng.randint(2, 20) for _ in range(180)] + [rng.randint(60, 100) for _ in range(20)]  # a long tail
    rows = [(" ".join(rng.choice(FILLER) for _ in range(n)), rng.choice(["a", "b"])) for n in sizes]
    data = write_csv(tmp_path / "lengths.csv", rows)
    config = load_config(RECIPES_DIR / "classify.yaml",
                         tiny_overrides(tiny_bert, data, tmp_path / "runs", **{"data.max_length": "auto"}))
    task = bound_task(config)
    splits = load_splits(task, config)
    tokens = [len(task.tokenizer(text)["input_ids"]) for text, _ in rows]  # the source's training split: all rows
    chosen = task.learned.max_length
    assert chosen % 8 == 0 and chosen >= np.percentile(tokens, 95) and chosen - 8 < np.percentile(tokens, 95)
    features = task.features(splits["train"], "train")
    full, kept = np.asarray(features[INPUT_LENGTH]), np.asarray(features["length"])
    assert (kept <= chosen).all() and (full > chosen).sum() == (full > kept).sum() > 0
    capped = load_config(RECIPES_DIR / "classify.yaml", tiny_overrides(tiny_bert, data, tmp_path / "r2"))
    long_rows = [(" ".join(["table"] * 300), "a"), (" ".join(["chair"] * 300), "b")] * 10
    capped_task = bound_task(capped, datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"text": [r[0] for r in long_rows], "label": [r[1] for r in long_rows]})}))
    assert capped_task.learned.max_length == 32  # the recipe's number wins over auto
    auto = load_config(RECIPES_DIR / "classify.yaml", tiny_overrides(tiny_bert, data, tmp_path / "r3",
                                                                       **{"data.max_length": "auto"}))
    auto_task = bound_task(auto, datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"text": [r[0] for r in long_rows], "label": [r[1] for r in long_rows]})}))
    assert auto_task.learned.max_length == 128  # the tiny model's limit


def test_group_split_never_puts_one_group_on_two_sides(tmp_path: Path) -> None:
    rng = random.Random(3)
    rows = [{"text": f"sentence {i}", "label": rng.choice(["x", "y", "z"]), "group": f"doc{rng.randrange(60)}"}
            for i in range(600)]
    raw = datasets.Dataset.from_list(rows).cast_column("label", datasets.ClassLabel(names=["x", "y", "z"]))
    cfg = DataConfig(source="files", train_file="unused.csv")
    cfg.group_column = "group"
    for seed in range(5):
        splits = make_splits(datasets.DatasetDict({"train": raw}), cfg, seed, "label")
        sides = [set(split[GROUP]) for split in splits.values()]
        assert all(len(split) for split in splits.values())
        assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
        assert sum(map(len, sides)) == len(set(raw[GROUP]))
        assert 30 <= len(splits["test"]) <= 90  # about 10% of the rows


def test_group_column_is_refused_by_a_task_that_drops_it() -> None:
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match="data.group_column"):
        load_config(RECIPES_DIR / "qa.yaml", ["data.group_column=title"])
    with pytest.raises(ConfigError, match="'data.max_length' must be a number of tokens"):
        load_config(RECIPES_DIR / "qa.yaml", ["data.max_length=auto"])


def test_thresholds_are_tuned_per_label_on_the_given_outputs() -> None:
    probabilities = np.array([[0.9, 0.2], [0.7, 0.35], [0.4, 0.3], [0.2, 0.1]])
    truth = np.array([[1, 1], [1, 1], [0, 0], [0, 0]], dtype=bool)
    for objective in ("macro_f1", "micro_f1"):
        thresholds = tune_thresholds(probabilities, truth, objective)
        assert thresholds[0] == 0.5  # 0.45..0.7 all separate label 0 perfectly: the one closest to 0.5
        # label 1: a threshold in (0.1, 0.2] keeps 2 of 2 positives and 1 false one (F1 0.8; micro-F1 8/9), better
        # than (0.3, 0.35] (F1 2/3; micro-F1 6/7)
        assert thresholds[1] == pytest.approx(0.2)
    assert tune_thresholds(probabilities, np.zeros_like(truth), "macro_f1")[0] == 0.5  # no positive example: 0.5
    # A label the model did not learn (rare, all scores low): its own best F1 says "predict it everywhere"; micro-F1
    # keeps it rare.
    rare = np.array([[0.1, 0.9]] * 9 + [[0.12, 0.9]])
    rare_truth = np.array([[0, 1]] * 9 + [[1, 1]], dtype=bool)
    assert tune_thresholds(rare, rare_truth, "macro_f1")[0] <= 0.1
    assert tune_thresholds(rare, rare_truth, "micro_f1")[0] >= 0.15


def test_multi_label_scores_by_hand() -> None:
    truth = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 0]], dtype=bool)
    predicted = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=bool)
    scores = multi_label_scores(predicted, truth, ("a", "b", "c"))
    # tp: a 2, b 1, c 0; fp: c 1; fn: b 1, c 1 -> micro F1 = 2*3 / (2*3 + 1 + 2)
    assert scores["micro_f1"] == pytest.approx(6 / 9)
    assert scores["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    # per example: 2*1/(1+2), 2*1/(2+1), empty and empty = 1, 2*1/(1+2)
    assert scores["samples_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1 + 2 / 3) / 4)
    assert scores["subset_accuracy"] == pytest.approx(0.25)
    assert scores["examples_without_labels"] == 1
    assert scores["per_label"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1,
                                        "tp": 0, "fp": 1, "fn": 1, "tn": 2}
    # best constant set by frequency: 0.6 alone gives 2*0.6/(1+1.0)=0.6; adding 0.3 gives 2*0.9/(2+1)=0.6: kept out
    assert best_constant_labels(np.array([0.6, 0.3, 0.1])).tolist() == [True, False, False]
    assert best_constant_labels(np.array([0.6, 0.5, 0.1])).tolist() == [True, True, False]


def test_regression_metrics_by_hand() -> None:
    predictions = np.array([1.0, 2.0, 4.0, 3.0])
    references = np.array([1.5, 2.0, 3.0, 5.0])
    scores = regression_scores(predictions, references)
    assert scores["mse"] == pytest.approx((0.25 + 0 + 1 + 4) / 4)
    assert scores["mae"] == pytest.approx((0.5 + 0 + 1 + 2) / 4)
    dp, dr = predictions - predictions.mean(), references - references.mean()
    assert scores["pearson"] == pytest.approx((dp * dr).sum() / np.sqrt((dp ** 2).sum() * (dr ** 2).sum()))
    # ranks 1 2 4 3 against 1 2 3 4: 1 - 6 * (0 + 0 + 1 + 1) / (4 * 15)
    assert scores["spearman"] == pytest.approx(1 - 6 * 2 / (4 * 15))
    constant = regression_scores(np.full(4, 2.0), references)
    assert constant["pearson"] is None and constant["mse"] == pytest.approx(np.mean((2.0 - references) ** 2))


def test_auto_training_length_has_a_floor_and_a_cap() -> None:
    from finetune.train import AUTO_MAX_EPOCHS, AUTO_MAX_STEPS, AUTO_MIN_STEPS

    assert auto_length(10)[0] == min(AUTO_MIN_STEPS, AUTO_MAX_EPOCHS * 10)
    assert auto_length(1)[0] == AUTO_MAX_EPOCHS
    assert auto_length(AUTO_MIN_STEPS + 7)[0] == AUTO_MIN_STEPS + 7  # one epoch in between
    assert auto_length(10 * AUTO_MAX_STEPS) == (AUTO_MAX_STEPS, auto_length(10 * AUTO_MAX_STEPS)[1])
    assert "capped" in auto_length(10 * AUTO_MAX_STEPS)[1] and "floor" in auto_length(AUTO_MIN_STEPS // 2)[1]


# --- end to end on tiny runs --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def multi_label_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    folder = tmp_path_factory.mktemp("multi")
    data = write_jsonl(folder / "tags.jsonl", multi_label_rows(240))
    extra = {"data.label_column": "tags", "data.group_column": "doc", "train.metric_for_best": "micro_f1",
             "lora.method": "full", "train.learning_rate": 0.003}
    assert main(["train", "classify", *tiny_overrides(tiny_bert, data, folder / "runs", **extra)]) == 0
    return folder / "runs" / "tiny"


def test_multi_label_thresholds_come_from_the_validation_split_only(multi_label_run: Path) -> None:
    saved = json.loads((multi_label_run / "model" / "task.json").read_text())["learned"]
    assert saved["problem_type"] == "multi_label" and saved["labels"] == ["bad", "good", "thing"]
    run = load_run(multi_label_run)
    validation = evaluate_run(run, split="validation")
    expected = tune_thresholds(1 / (1 + np.exp(-validation.outputs["logits"])), validation.outputs["labels"] > 0.5,
                               "micro_f1")  # train.metric_for_best
    assert saved["thresholds"] == pytest.approx(expected.tolist())
    metrics = json.loads((multi_label_run / "metrics.json").read_text())
    test = metrics["test"]
    assert test["thresholds"] == "tuned on the validation split"
    assert [test["per_label"][n]["threshold"] for n in saved["labels"]] == pytest.approx(saved["thresholds"])
    assert {"micro_f1", "macro_f1", "samples_f1", "subset_accuracy"} <= set(test)
    names = [b["name"] for b in metrics["baselines"]]
    assert names[0].startswith("constant label set") and names[1].startswith("TF-IDF")
    assert test["examples_without_labels"] > 0  # empty label lists are allowed, and counted


def test_multi_label_predictions_and_bad_labels(multi_label_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["predict", str(multi_label_run), "--text", "the good and awful table"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert set(row["scores"]) == {"bad", "good", "thing"} and set(row["labels"]) <= set(row["scores"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a good day", "tags": ["good"], "doc": "x"},
                                               {"text": "a great day", "tags": ["good", "splendid"], "doc": "x"}])
    assert main(["eval", str(multi_label_run), "--file", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "row 2" in err and "'splendid' is not among the training labels" in err
    ungrouped = write_jsonl(tmp_path / "ungrouped.jsonl", [{"text": "a good day", "tags": ["good"]},
                                                           {"text": "an awful table", "tags": ["bad", "thing"]}])
    assert main(["eval", str(multi_label_run), "--file", str(ungrouped)]) == 0  # a test file needs no group


def test_single_label_run_shows_mistakes_and_predicts_on_its_own_columns(tiny_bert: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_csv(tmp_path / "reviews.csv", synthetic_reviews(200), header=("review", "stars"))
    extra = {"data.text_column": "review", "data.label_column": "stars"}
    assert main(["train", "classify", *tiny_overrides(tiny_bert, data, tmp_path / "runs", **extra)]) == 0
    run = tmp_path / "runs" / "tiny"
    printed = capsys.readouterr().out
    assert "TF-IDF (word 1-2 grams) + logistic regression" in printed and "majority class" in printed
    metrics = json.loads((run / "metrics.json").read_text())
    matrix = metrics["test"]["confusion_matrix"]
    assert np.asarray(matrix["counts"]).sum() == metrics["split_sizes"]["test"]
    assert (run / "confusion_matrix.png").is_file() and metrics["lengths"]["test"]["truncated"] >= 0
    assert metrics["lengths"]["max_length"] == 32 and "train.epochs=2" in metrics["training_length"]
    mistakes = [json.loads(line) for line in (run / "mistakes_test.jsonl").read_text().splitlines()]
    assert all(m["label"] != m["prediction"] for m in mistakes)
    assert [m["score"] for m in mistakes] == sorted((m["score"] for m in mistakes), reverse=True)
    assert "baseline: TF-IDF" in (run / "README.md").read_text()

    inputs = write_csv(tmp_path / "new.csv", [("the movie was excellent", "?"), ("a table", "?")],
                       header=("review", "note"))
    assert main(["predict", str(run), "--input", str(inputs)]) == 0
    captured = capsys.readouterr()
    assert "column 'review'" in captured.err
    assert [json.loads(line)["text"] for line in captured.out.splitlines()] == ["the movie was excellent", "a table"]
    monkeypatch.setattr("sys.stdin", io.StringIO('{"review": "it was awful"}\n{"review": "lovely"}\n'))
    assert main(["predict", str(run), "--input", "-"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2 and "column 'review'" in captured.err
    monkeypatch.setattr("sys.stdin", io.StringIO("it was awful\nlovely day\n"))
    assert main(["predict", str(run), "--input", "-"]) == 0
    assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == ["it was awful",
                                                                                         "lovely day"]
    out = tmp_path / "preds.jsonl"
    assert main(["eval", str(run), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == metrics["split_sizes"]["test"] and {"text", "label", "prediction", "score"} <= set(rows[0])


def test_regression_on_sentence_pairs(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = random.Random(5)
    rows = []
    for _ in range(200):
        n = rng.randint(0, 3)
        words = [rng.choice(FILLER) for _ in range(3)] + [rng.choice(POSITIVE) for _ in range(n)]
        rows.append((" ".join(words), rng.choice(FILLER), f"{0.5 * n + 0.1 * rng.random():.3f}"))
    data = tmp_path / "scores.csv"
    data.write_text("first,second,score\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows), encoding="utf-8")
    extra = {"data.text_column": "first", "data.text_pair_column": "second", "data.label_column": "score",
             "train.metric_for_best": "pearson"}
    assert main(["train", "classify", *tiny_overrides(tiny_bert, data, tmp_path / "runs", **extra)]) == 0
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert {"mse", "mae", "pearson", "spearman"} <= set(metrics["test"])
    mean = np.mean([float(r[2]) for r in rows])
    assert metrics["baselines"][0]["name"].startswith("training mean")
    assert abs(float(metrics["baselines"][0]["name"].split("(")[1].rstrip(")")) - mean) < 0.2
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "runs" / "tiny"), "--text", "great lovely", "--text-pair", "a"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["prediction"], float)


# --- what must hold 4: bad input ------------------------------------------------------------------------
def test_a_non_numeric_value_in_a_regression_column_names_the_row(tiny_bert: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "scores.csv"
    data.write_text("text,score\n" + "".join(f"good {i},{i / 10}\n" for i in range(20)) + "bad,high\n",
                    encoding="utf-8")
    extra = {"data.label_column": "score", "data.problem_type": "regression", "train.metric_for_best": "mse"}
    assert main(["train", "classify", *tiny_overrides(tiny_bert, data, tmp_path / "runs", **extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "row 21" in err and "'high' is not a number" in err


def test_regression_with_a_classification_metric_is_refused(tiny_bert: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "scores.csv"
    data.write_text("text,score\n" + "".join(f"good {i},{i / 7:.3f}\n" for i in range(20)), encoding="utf-8")
    assert main(["train", "classify", *tiny_overrides(tiny_bert, data, tmp_path / "runs",
                                                      **{"data.label_column": "score"})]) == 2
    err = capsys.readouterr().err
    assert "train.metric_for_best" in err and "regression" in err


def test_empty_label_lists_are_allowed_and_counted(tiny_bert: Path, tmp_path: Path) -> None:
    rows = [{"text": r["text"], "tags": "|".join(r["tags"])} for r in multi_label_rows(60)]
    data = write_csv(tmp_path / "tags.csv", [(r["text"], r["tags"]) for r in rows], header=("text", "tags"))
    config = load_config(RECIPES_DIR / "classify.yaml", tiny_overrides(
        tiny_bert, data, tmp_path / "runs", **{"data.label_column": "tags", "data.label_separator": "|"}))
    task = bound_task(config)
    assert task.learned.problem_type == "multi_label"
    splits = load_splits(task, config)
    empty = sum(1 for r in rows if not r["tags"])
    assert empty > 0
    assert sum(int(not any(v)) for split in splits.values() for v in split["label"]) == empty
    assert f"{sum(int(not any(v)) for v in splits['train']['label'])} with none" in task.describe(splits)[1]


# --- the built-in sets behind the classify-multilabel and regression recipes -----------------------------
def test_brown_data_file_matches_provenance() -> None:
    import hashlib
    import re

    folder = Path(__file__).resolve().parent.parent / "finetune" / "builtin" / "data"
    digest = hashlib.sha256((folder / "brown_sentences.jsonl.gz").read_bytes()).hexdigest()
    provenance = (folder / "PROVENANCE.md").read_text(encoding="utf-8")
    section = provenance[provenance.index("## `brown_sentences.jsonl.gz`"):]
    assert re.search(r"sha256 \| `([0-9a-f]{64})`", section).group(1) == digest


def test_brown_builtins_and_tweet_confidence() -> None:
    from finetune.builtin import load_builtin

    genre, grammar = load_builtin("brown-genre")["train"], load_builtin("brown-grammar")["train"]
    assert len(genre) == len(grammar) == 56283 and genre["id"] == grammar["id"]
    assert len(set(genre["label"])) == 15 and len(set(genre["document"])) == 500
    first = grammar[0]
    assert first["text"].startswith("The Fulton County Grand Jury said Friday")
    assert first["labels"] == ["past_tense", "possessive", "proper_noun"] and genre[0]["label"] == "news"
    assert {label for labels in grammar["labels"] for label in labels} == {
        "comparison", "modal", "negation", "number", "past_tense", "possessive", "proper_noun", "wh_word"}
    rated = load_builtin("tweet-confidence")["train"]
    assert len(rated) == 32698 and all(0 <= c <= 1 for c in rated["confidence"])
