"""The local `seqeval` metric module: entity-level counts worked out by hand, loaded offline."""

from __future__ import annotations

from pathlib import Path

import evaluate
import pytest

import finetune.metrics as metrics
from finetune.metrics import LOCAL_METRICS, load_metric, metric_source

pytest.importorskip("seqeval", reason="the seqeval package is not installed (pip install seqeval)")

# Two sentences of five tokens.
REFERENCES = [
    ["B-PER", "I-PER", "O", "B-LOC", "O"],
    ["O", "B-ORG", "I-ORG", "O", "B-PER"],
]
PREDICTIONS = [
    ["B-PER", "I-PER", "O", "O", "I-LOC"],  # stray I-LOC after O: starts a LOC entity (default mode)
    ["O", "B-ORG", "I-ORG", "O", "B-LOC"],  # right span, wrong type
]
# By hand, default (conlleval) mode:
#   reference entities: PER s1[0:2], LOC s1[3], ORG s2[1:3], PER s2[4]        -> 4 (PER 2, LOC 1, ORG 1)
#   predicted entities: PER s1[0:2], LOC s1[4], ORG s2[1:3], LOC s2[4]        -> 4 (PER 1, LOC 2, ORG 1)
#   correct (same span and type): PER s1[0:2], ORG s2[1:3]                    -> 2
#   overall P = 2/4, R = 2/4, F1 = 1/2
#   PER: P = 1/1, R = 1/2, F1 = 2 * 1 * 1/2 / (1 + 1/2) = 2/3; LOC: 0 of 2 predicted, 0 of 1 found; ORG: 1/1
#   token accuracy: s1 3 of 5 right (tokens 3 and 4 wrong), s2 4 of 5 (token 4 wrong) -> 7/10
EXPECTED_DEFAULT = {
    "LOC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "number": 1},
    "ORG": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "number": 1},
    "PER": {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "number": 2},
    "overall_precision": 0.5,
    "overall_recall": 0.5,
    "overall_f1": 0.5,
    "overall_accuracy": 0.7,
}


def assert_scores(result: dict, expected: dict) -> None:
    """Same keys, same numbers (pytest.approx does not take nested dicts)."""
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key  # a number, or a flat dict of numbers


@pytest.fixture
def seqeval(monkeypatch: pytest.MonkeyPatch) -> evaluate.EvaluationModule:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(metrics, "_LOADED", {})
    return load_metric("seqeval")


def test_loads_the_local_module_offline(seqeval: evaluate.EvaluationModule) -> None:
    assert "seqeval" in LOCAL_METRICS
    assert isinstance(seqeval, evaluate.Metric)
    assert metric_source("seqeval") == str(Path(metrics.__file__).parent / "seqeval" / "seqeval.py")


def test_default_mode_counts_a_stray_i_tag_as_an_entity(seqeval: evaluate.EvaluationModule) -> None:
    result = seqeval.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert_scores(result, EXPECTED_DEFAULT)
    assert isinstance(result["PER"]["number"], int) and isinstance(result["overall_f1"], float)


def test_strict_iob2_drops_the_ill_formed_entity(seqeval: evaluate.EvaluationModule) -> None:
    # Strict IOB2: the stray I-LOC of sentence 1 is no entity. Predicted: PER s1, ORG s2, LOC s2 -> 3,
    # 2 correct: P = 2/3, R = 2/4, F1 = 2 * (2/3 * 1/2) / (2/3 + 1/2) = 4/7. LOC: 1 predicted, 0 right.
    # Token accuracy does not depend on the mode: 7/10.
    result = seqeval.compute(predictions=PREDICTIONS, references=REFERENCES, mode="strict", scheme="IOB2")
    assert_scores(result, {**EXPECTED_DEFAULT, "overall_precision": 2 / 3, "overall_f1": 4 / 7})


def test_suffix_tags(seqeval: evaluate.EvaluationModule) -> None:
    def flip(tag: str) -> str:
        return tag if tag == "O" else f"{tag[2:]}-{tag[0]}"

    result = seqeval.compute(
        predictions=[[flip(t) for t in s] for s in PREDICTIONS],
        references=[[flip(t) for t in s] for s in REFERENCES],
        suffix=True,
    )
    assert_scores(result, EXPECTED_DEFAULT)


def test_zero_division_and_unknown_scheme(seqeval: evaluate.EvaluationModule) -> None:
    # One MISC entity, never predicted: MISC precision is 0/0, set by zero_division; recall 0/1 = 0.
    result = seqeval.compute(predictions=[["O", "O"]], references=[["B-MISC", "I-MISC"]], zero_division=1)
    assert result["MISC"]["precision"] == 1.0 and result["MISC"]["recall"] == 0.0
    assert result["MISC"]["number"] == 1 and result["overall_accuracy"] == 0.0
    with pytest.raises(ValueError, match="scheme should be one of IOB1, IOB2"):
        seqeval.compute(predictions=PREDICTIONS, references=REFERENCES, scheme="BIO")
