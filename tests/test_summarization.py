"""Summarization: tiny T5 and Llama end to end through the CLI, ROUGE against hand-counted values, the lead
baseline with N chosen on validation, document clipping, prompts, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pytest

from conftest import bound_task
from finetune.cli import main
from finetune.errors import ConfigError, DataError
from finetune.recipes import RECIPES_DIR, load_config
from finetune.tasks.summarization import choose_lead, lead, split_sentences, summary_scores
from tiny_translation import EN_ES, build_tiny_llama, build_tiny_t5

RECIPE = RECIPES_DIR / "summarize.yaml"


def toy_documents(n: int, seed: int = 0) -> list[dict]:
    """Documents of 3-6 short sentences of the toy vocabulary; the summary is their first two sentences, so
    that lead-2 is the best lead baseline."""
    rng = random.Random(seed)
    words = sorted(EN_ES)
    rows = []
    for i in range(n):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 6))) + "."
                     for _ in range(rng.randint(3, 6))]
        rows.append({"id": f"doc-{i}", "document": " ".join(sentences), "summary": " ".join(sentences[:2])})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-summarization")
    return {"t5": build_tiny_t5(root / "t5"), "llama": build_tiny_llama(root / "llama")}


@pytest.fixture()
def documents(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", toy_documents(60))


def overrides(model: Path, data: Path, out: Path, **extra: object) -> list[str]:
    """The summarize recipe, made to train a tiny model on a toy file in seconds."""
    values = {
        "model.name_or_path": str(model), "data.source": "files", "data.train_file": str(data),
        "data.validation_size": 0.2, "data.test_size": 0.2, "data.max_test_samples": None,
        "data.max_source_tokens": None, "data.max_length": 160, "train.batch_size": 8, "train.epochs": 1,
        "train.mixed_precision": "no", "eval.max_new_tokens": 12, "eval.batch_size": 16,
        "run.output_dir": str(out), "run.name": "tiny",
    }
    values.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


# --- the whole CLI ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_train_eval_predict_cli(kind: str, tiny_models: dict[str, Path], documents: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "summarize", *overrides(tiny_models[kind], documents, tmp_path)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    for where in ("test", "before_training"):  # the recipe scores the base model first (zero-shot)
        assert {"rouge1", "rouge2", "rougeL", "length_ratio", "loss"} <= set(metrics[where])
    baseline = metrics["baseline"]
    # The summaries are the first two sentences: lead-2 wins on validation and is perfect on test.
    assert baseline["lead_sentences"] == 2 and baseline["name"].startswith("lead-2")
    assert baseline["rouge1"] == pytest.approx(100.0) and baseline["length_ratio"] == pytest.approx(1.0)
    assert "before training:" in out and "baseline (lead-2" in out and "sample summaries" in out
    rows = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["split_sizes"]["test"] == 12
    assert set(rows[0]) == {"id", "source", "reference", "hypothesis"}
    saved = json.loads((run / "adapter" / "task.json").read_text())
    assert saved["learned"] == {"kind": "decoder" if kind == "llama" else "seq2seq", "model_type": kind}

    assert main(["eval", str(run)]) == 0
    evaluated = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert evaluated["rougeL"] == pytest.approx(metrics["test"]["rougeL"])  # same split, same weights

    assert main(["predict", str(run), "--text", "the red house sees the dog. the cat eats bread."]) == 0
    [prediction] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert isinstance(prediction["summary"], str)


# --- metrics and baseline --------------------------------------------------------------------------
def test_rouge_equals_hand_counted_values() -> None:
    # "the cat sat on the mat" vs "the cat is on the mat": unigrams in common the x2, cat, on, mat = 5 of 6 on
    # each side -> ROUGE-1 = 5/6; bigrams the-cat, on-the, the-mat = 3 of 5 -> ROUGE-2 = 3/5; the longest
    # common subsequence "the cat on the mat" = 5 -> ROUGE-L = 5/6.
    scores = summary_scores(["the cat sat on the mat"], ["the cat is on the mat"])
    assert scores["rouge1"] == pytest.approx(500 / 6) and scores["rouge2"] == pytest.approx(60.0)
    assert scores["rougeL"] == pytest.approx(500 / 6) and scores["length_ratio"] == 1.0
    # Case and punctuation do not count, stems do ("sitting" -> "sit", "cats" -> "cat"): "Cats are sitting."
    # vs "The cats sit": cat, sit in common, P = 2/3, R = 2/3 -> 2/3; an empty output scores 0. The mean of
    # the two: 1/3. Length: 3 output words for 3 + 1 reference words.
    scores = summary_scores(["Cats are sitting.", ""], ["The cats sit", "anything"])
    assert scores["rouge1"] == pytest.approx(100 / 3) and scores["rougeL"] == pytest.approx(100 / 3)
    assert scores["rouge2"] == 0.0 and scores["length_ratio"] == pytest.approx(0.75)


def test_sentences_and_lead() -> None:
    text = 'We study X . It works well! "Really." Then more\n\nSection two starts. End'
    assert split_sentences(text) == ["We study X .", "It works well!", '"Really."', "Then more",
                                     "Section two starts.", "End"]
    assert lead(text, 2) == "We study X . It works well!"
    sources = ["a b. c d. e f.", "g h. i j. k l."]
    assert choose_lead(sources, ["a b. c d.", "g h. i j."]) == 2
    assert choose_lead(sources, ["a b.", "g h."]) == 1


def test_lead_n_can_be_fixed(tiny_models: dict[str, Path], documents: Path, tmp_path: Path) -> None:
    config = load_config(RECIPE, overrides(tiny_models["t5"], documents, tmp_path, **{"eval.lead_sentences": 1}))
    task = bound_task(config)
    rows = toy_documents(8, seed=3)
    test = datasets.Dataset.from_dict({"id": [r["id"] for r in rows], "source": [r["document"] for r in rows],
                                       "target": [r["summary"] for r in rows]})
    baseline = task.baseline(test, test, test)
    assert baseline["lead_sentences"] == 1 and "eval.lead_sentences" in baseline["name"]
    assert baseline["length_ratio"] < 0.7  # one sentence of two


# --- features --------------------------------------------------------------------------------------
def test_long_documents_keep_their_start_cut_at_a_sentence(tiny_models: dict[str, Path], documents: Path,
                                                           tmp_path: Path) -> None:
    config = load_config(RECIPE, overrides(tiny_models["llama"], documents, tmp_path,
                                           **{"data.max_source_tokens": 20}))
    task = bound_task(config)
    tokenizer = task.tokenizer
    document = "the red house sees the dog. the big cat eats bread and water. the man runs. the dog sleeps."
    clipped = task.clip_source(tokenizer, document)
    assert document.startswith(clipped) and clipped.endswith(".")
    assert len(tokenizer(clipped, add_special_tokens=False)["input_ids"]) <= 20
    one_more = " ".join(split_sentences(document)[:len(split_sentences(clipped)) + 1])
    assert len(tokenizer(one_more, add_special_tokens=False)["input_ids"]) > 20  # whole sentences, as many as fit
    assert task.clip_source(tokenizer, "the dog.") == "the dog."  # short ones stay whole


def test_decoder_prompt_holds_the_instruction_and_loss_is_on_the_summary(tiny_models: dict[str, Path],
                                                                         documents: Path, tmp_path: Path) -> None:
    config = load_config(RECIPE, overrides(tiny_models["llama"], documents, tmp_path,
                                           **{"data.instruction": "Short summary:\n{source}"}))
    task = bound_task(config)
    tokenizer = task.tokenizer
    examples = datasets.Dataset.from_dict({"id": ["a"], "source": ["the dog eats. the cat runs."],
                                           "target": ["the dog eats."]})
    feature = task.features(examples, "validation")[0]
    prompt = feature["input_ids"][:feature["prompt_length"]]
    # No chat template in this tokenizer: the instruction and a newline.
    assert tokenizer.decode(prompt) == "Short summary:\nthe dog eats. the cat runs.\n"
    labels = feature["labels"]
    assert all(label == -100 for label in labels[:feature["prompt_length"]])
    assert tokenizer.decode(labels[feature["prompt_length"]:-1]) == "the dog eats."
    assert labels[-1] == tokenizer.eos_token_id


def test_t5_gets_the_summarize_prefix(tiny_models: dict[str, Path], documents: Path, tmp_path: Path) -> None:
    task = bound_task(load_config(RECIPE, overrides(tiny_models["t5"], documents, tmp_path)))
    assert task.learned.kind == "seq2seq"
    examples = datasets.Dataset.from_dict({"id": ["a"], "source": ["the dog eats."], "target": ["the dog."]})
    ids = task.features(examples, "test")["input_ids"][0]
    assert ids == task.tokenizer("summarize: the dog eats.")["input_ids"]


# --- bad input -------------------------------------------------------------------------------------
def test_an_empty_document_or_summary_names_the_row(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    rows = toy_documents(4) + [{"id": "doc-x", "document": "the dog.", "summary": "  "}]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    config = load_config(RECIPE, overrides(tiny_models["t5"], data, tmp_path))
    with pytest.raises(DataError, match=r"bad.jsonl: row 5 \(id doc-x\): empty text in column 'summary'"):
        bound_task(config).prepare(datasets.DatasetDict({"train": datasets.load_dataset(
            "json", data_files=str(data), split="train")}))
    config = load_config(RECIPE, overrides(tiny_models["t5"], data, tmp_path, **{"data.source_column": "text"}))
    from finetune.data import load_raw

    with pytest.raises(DataError, match=r"no column 'text'; it has: id, document, summary"):
        bound_task(config).prepare(load_raw(config.data, config.run.seed))


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'data.instruction' must be a text containing \{source\}"):
        load_config(RECIPE, ["data.instruction=Summarize."])
    with pytest.raises(ConfigError, match=r"'data.max_source_tokens' must be a positive number of tokens below "
                                          r"data.max_length \(384\)"):
        load_config(RECIPE, ["data.max_source_tokens=400"])
    with pytest.raises(ConfigError, match="'data.target_column' must be the column of reference summaries"):
        load_config(RECIPE, ["data.target_column=null"])
    with pytest.raises(ConfigError, match="train.metric_for_best"):
        load_config(RECIPE, ["train.metric_for_best=bleu"])
    with pytest.raises(ConfigError, match="'eval.lead_sentences' must be >= 1 or null"):
        load_config(RECIPE, ["eval.lead_sentences=0"])
    assert load_config(RECIPE, ["train.metric_for_best=rougeL"]).train.metric_for_best == "rougeL"


def test_predict_rejects_an_empty_input(tiny_models: dict[str, Path], documents: Path, tmp_path: Path) -> None:
    from finetune.models import resolve_checkpoint

    task = bound_task(load_config(RECIPE, overrides(tiny_models["t5"], documents, tmp_path)))
    model = task.load_model(resolve_checkpoint(task.config.model))
    with pytest.raises(DataError, match="input 2: a summarization input needs a non-empty 'text' or 'document'"):
        task.predict(model, [{"text": "the dog."}, {"document": " "}])


def test_shipped_summarize_recipe() -> None:
    config = load_config(RECIPE)
    assert config.run.task == "summarization" and config.data.source == "builtin:aclsum"
    assert config.eval.before_training and config.data.max_source_tokens == 192
