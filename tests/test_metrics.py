"""Tests for finetune.metrics: the local evaluate modules and the Hub-first loader."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import evaluate
import pytest

import finetune.metrics as metrics
from finetune.metrics import LOCAL_METRICS, load_metric, metric_source


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with an empty per-process cache, so it sees its own environment."""
    monkeypatch.setattr(metrics, "_LOADED", {})
    monkeypatch.setattr(metrics, "_HUB_UNREACHABLE", False)
    monkeypatch.setattr(metrics, "_SAID_LOCAL", False)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", LOCAL_METRICS)
def test_offline_loads_local_module_by_absolute_path(name: str) -> None:
    module = load_metric(name)
    assert isinstance(module, evaluate.Metric)
    source = Path(metric_source(name))
    assert source.is_absolute() and source == Path(metrics.__file__).parent / name / f"{name}.py"
    assert load_metric(name) is module  # cached per name


@pytest.mark.usefixtures("offline")
def test_accuracy() -> None:
    result = load_metric("accuracy").compute(predictions=[0, 1, 1], references=[0, 1, 0])
    assert result == {"accuracy": pytest.approx(2 / 3)}


@pytest.mark.usefixtures("offline")
def test_f1_macro_and_per_class() -> None:
    predictions, references = [0, 1, 2, 0], [0, 1, 1, 2]
    # By hand: class 0 TP=1 FP=1 FN=0, class 1 TP=1 FP=0 FN=1, class 2 TP=0.
    per_class = [_f1(1 / 2, 1.0), _f1(1.0, 1 / 2), 0.0]
    f1 = load_metric("f1")
    macro = f1.compute(predictions=predictions, references=references, average="macro")
    assert set(macro) == {"f1"} and isinstance(macro["f1"], float)
    assert macro["f1"] == pytest.approx(sum(per_class) / 3)  # 4/9
    per = f1.compute(predictions=predictions, references=references, average=None)
    assert list(per["f1"]) == pytest.approx(per_class)
    only_two = f1.compute(predictions=predictions, references=references, average=None, labels=[0, 1])
    assert list(only_two["f1"]) == pytest.approx(per_class[:2])


@pytest.mark.usefixtures("offline")
def test_binary_precision_and_recall() -> None:
    predictions, references = [1, 1, 0, 1, 0], [1, 0, 1, 1, 0]  # TP=2 FP=1 FN=1
    assert load_metric("precision").compute(predictions=predictions, references=references) == {
        "precision": pytest.approx(2 / 3)
    }
    assert load_metric("recall").compute(predictions=predictions, references=references) == {
        "recall": pytest.approx(2 / 3)
    }
    assert load_metric("f1").compute(predictions=predictions, references=references) == {
        "f1": pytest.approx(_f1(2 / 3, 2 / 3))
    }


@pytest.mark.usefixtures("offline")
def test_squad_exact_and_partial() -> None:
    squad = load_metric("squad")
    references = [
        {"id": "q1", "answers": {"text": ["Paris"], "answer_start": [0]}},
        {"id": "q2", "answers": {"text": ["red cat", "a dog"], "answer_start": [4, 20]}},
    ]
    exact = [{"id": "q1", "prediction_text": "paris."}, {"id": "q2", "prediction_text": "The dog"}]
    assert squad.compute(predictions=exact, references=references) == {"exact_match": 100.0, "f1": 100.0}
    # q2: "the big red cat" normalises to [big, red, cat]; best gold [red, cat]: P=2/3, R=1.
    partial = [{"id": "q1", "prediction_text": "Paris"}, {"id": "q2", "prediction_text": "the big red cat"}]
    result = squad.compute(predictions=partial, references=references)
    assert result["exact_match"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx(100.0 * (1.0 + _f1(2 / 3, 1.0)) / 2)  # 90.0


@pytest.mark.usefixtures("offline")
def test_squad_v2_with_unanswerable_question() -> None:
    squad_v2 = load_metric("squad_v2")
    predictions = [
        {"id": "a", "prediction_text": "Broncos", "no_answer_probability": 0.25},
        {"id": "u", "prediction_text": "", "no_answer_probability": 0.75},
    ]
    references = [
        {"id": "a", "answers": {"text": ["Denver Broncos"], "answer_start": [0]}},
        {"id": "u", "answers": {"text": [], "answer_start": []}},
    ]
    partial_f1 = _f1(1.0, 1 / 2)  # [broncos] against [denver, broncos]
    result = squad_v2.compute(predictions=predictions, references=references)
    assert result == pytest.approx(
        {
            "exact": 50.0,
            "f1": 100.0 * (partial_f1 + 1.0) / 2,
            "total": 2,
            "HasAns_exact": 0.0,
            "HasAns_f1": 100.0 * partial_f1,
            "HasAns_total": 1,
            "NoAns_exact": 100.0,
            "NoAns_f1": 100.0,
            "NoAns_total": 1,
            # Threshold sweep: answering "a" (prob 0.25) only adds; exact gains nothing so stays at 0.0.
            "best_exact": 50.0,
            "best_exact_thresh": 0.0,
            "best_f1": 100.0 * (1.0 + partial_f1) / 2,
            "best_f1_thresh": 0.25,
        }
    )
    # Below 0.25 both questions are judged "no answer": right for "u", wrong for "a".
    strict = squad_v2.compute(predictions=predictions, references=references, no_answer_threshold=0.1)
    assert (strict["exact"], strict["f1"]) == (50.0, 50.0)


@pytest.mark.usefixtures("offline")
def test_sacrebleu_perfect_and_empty() -> None:
    bleu = load_metric("sacrebleu")
    hypotheses = ["the cat sat on the mat", "a quick brown fox jumps"]
    perfect = bleu.compute(predictions=hypotheses, references=[[h] for h in hypotheses])
    assert set(perfect) == {"score", "counts", "totals", "precisions", "bp", "sys_len", "ref_len"}
    assert perfect["score"] == pytest.approx(100.0)
    assert perfect["bp"] == 1.0 and perfect["sys_len"] == perfect["ref_len"] == 11
    empty = bleu.compute(predictions=["", ""], references=[[h] for h in hypotheses])
    assert empty["score"] == 0.0 and empty["sys_len"] == 0


@pytest.mark.usefixtures("offline")
def test_chrf_perfect_empty_and_chrf_plus_plus() -> None:
    chrf = load_metric("chrf")
    hypotheses = ["the cat sat on the mat", "a quick brown fox"]
    references = [[h] for h in hypotheses]
    assert chrf.compute(predictions=hypotheses, references=references) == {
        "score": pytest.approx(100.0),
        "char_order": 6,
        "word_order": 0,
        "beta": 2,
    }
    assert chrf.compute(predictions=["", ""], references=references)["score"] == 0.0
    plus_plus = chrf.compute(predictions=hypotheses, references=references, word_order=2)
    assert plus_plus["word_order"] == 2 and plus_plus["score"] == pytest.approx(100.0)


@pytest.mark.usefixtures("offline")
def test_rouge_identical_and_partial() -> None:
    rouge = load_metric("rouge")
    identical = rouge.compute(predictions=["the cats sat"], references=["the cat sat"], use_stemmer=True)
    assert identical == {key: pytest.approx(1.0) for key in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    # Unigrams {the, cat} of 3 shared: P = R = 2/3; one bigram of 2: P = R = 1/2.
    partial = rouge.compute(predictions=["the cat ran"], references=["the cat sat"], rouge_types=["rouge1", "rouge2"])
    assert partial == {"rouge1": pytest.approx(2 / 3), "rouge2": pytest.approx(1 / 2)}


def test_falls_back_to_local_module_when_hub_unreachable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    real_load = evaluate.load
    hub_attempts: list[str] = []

    def unreachable_hub(path: str, *args: object, **kwargs: object) -> evaluate.EvaluationModule:
        if not os.path.isabs(path):
            hub_attempts.append(path)
            raise FileNotFoundError(f"Couldn't find a module script for {path}")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(evaluate, "load", unreachable_hub)
    with caplog.at_level(logging.INFO, logger="finetune.metrics"):
        accuracy = load_metric("accuracy")
    assert hub_attempts == ["accuracy"]
    assert metric_source("accuracy") == str(Path(metrics.__file__).parent / "accuracy" / "accuracy.py")
    assert accuracy.compute(predictions=[1, 1], references=[1, 0]) == {"accuracy": 0.5}
    assert [r.getMessage() for r in caplog.records if r.name == "finetune.metrics" and r.levelno >= logging.INFO] \
        == [metrics.HUB_UNREACHABLE_NOTICE]

    # The Hub is not asked again in this process: each attempt costs ~1.5 s, and the answer is the same.
    with caplog.at_level(logging.INFO, logger="finetune.metrics"):
        load_metric("f1")
    assert hub_attempts == ["accuracy"]
    with pytest.raises(ValueError, match=r"'bleu'.*local metrics: accuracy, chrf"):
        load_metric("bleu")


def test_offline_says_once_that_local_modules_are_used(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Offline is the normal state: one plain line for the whole process, not one per metric load."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.INFO, logger="finetune.metrics"):
        for name in ("accuracy", "f1", "precision", "recall"):
            load_metric(name)
    said = [r.getMessage() for r in caplog.records if r.name == "finetune.metrics" and r.levelno >= logging.INFO]
    assert said == [metrics.OFFLINE_NOTICE]
    assert "unreachable" not in said[0] and "Error" not in said[0]


def test_hub_module_preferred_when_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    hub_module = object()
    monkeypatch.setattr(evaluate, "load", lambda path, *args, **kwargs: hub_module)
    assert load_metric("accuracy") is hub_module
    assert metric_source("accuracy") == "hub"


def test_metric_source_of_unloaded_metric() -> None:
    with pytest.raises(KeyError, match="not been loaded"):
        metric_source("accuracy")
