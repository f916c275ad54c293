"""Translation: tiny T5 / Marian / BART / Llama through the CLI, labels, metrics, batched generation, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from types import SimpleNamespace

import datasets
import pytest
import torch

from conftest import bound_task
from finetune.batching import eval_dataloader
from finetune.cli import main
from finetune.errors import ConfigError, DataError
from finetune.evaluation import evaluate
from finetune.models import resolve_checkpoint
from finetune.recipes import RECIPES_DIR, load_config
from finetune.tasks.translation import TranslationLearned, TranslationTask, translation_scores
from tiny_translation import BUILDERS, toy_pairs, write_pairs_jsonl

RECIPE = "translate-seq2seq"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-translation")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture()
def pairs_file(tmp_path: Path) -> Path:
    return write_pairs_jsonl(tmp_path / "pairs.jsonl", toy_pairs(60))


def overrides(model: Path, data: Path, out: Path, **extra: object) -> list[str]:
    """The seq2seq recipe, made to train a tiny model on a toy file in seconds."""
    values = {
        "model.name_or_path": str(model), "data.source": "files", "data.train_file": str(data),
        "data.validation_size": 0.1, "data.test_size": 0.2, "data.max_train_samples": None,
        "data.max_eval_samples": None, "data.max_test_samples": None, "data.max_length": 32,
        "train.batch_size": 8, "train.epochs": 1, "train.mixed_precision": "no", "train.eval_every_steps": None,
        "eval.max_new_tokens": 8, "eval.batch_size": 16, "run.output_dir": str(out), "run.name": "tiny",
    }
    values.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def make_task(model: Path, data: Path, tmp_path: Path, **extra: object) -> tuple[TranslationTask, object]:
    """A task and its tokenizer, as the training loop sets them up."""
    config = load_config(RECIPES_DIR / f"{RECIPE}.yaml", overrides(model, data, tmp_path, **extra))
    task = bound_task(config)
    return task, task.tokenizer


# --- the whole CLI ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["t5", "marian", "bart", "llama"])
def test_train_eval_predict_cli(kind: str, tiny_models: dict[str, Path], pairs_file: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", RECIPE, *overrides(tiny_models[kind], pairs_file, tmp_path)]) == 0
    run = tmp_path / "tiny"
    out = capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    for where in ("test", "before_training"):  # the recipe evaluates the base model first
        assert {"bleu", "chrf", "loss", "generation_tokens_per_second"} <= set(metrics[where])
    assert "before training:" in out and "chrf" in out
    assert "sample translations (held-out test pairs):" in out
    rows = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["split_sizes"]["test"] == 12
    assert set(rows[0]) == {"id", "source", "reference", "hypothesis"}
    saved = json.loads((run / "adapter" / "task.json").read_text())
    assert saved["learned"]["kind"] == ("decoder" if kind == "llama" else "seq2seq")

    assert main(["eval", str(run)]) == 0
    evaluated = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert evaluated["chrf"] == pytest.approx(metrics["test"]["chrf"])  # same split, same weights

    assert main(["predict", str(run), "--text", "the red house", "--text", "the dog eats bread"]) == 0
    predictions = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["text"] for p in predictions] == ["the red house", "the dog eats bread"]
    assert all(isinstance(p["translation"], str) for p in predictions)


# --- features and labels ---------------------------------------------------------------------------
def test_seq2seq_labels_are_padded_with_minus_100(tiny_models: dict[str, Path], pairs_file: Path,
                                                  tmp_path: Path) -> None:
    task, tokenizer = make_task(tiny_models["marian"], pairs_file, tmp_path)
    assert task.learned.kind == "seq2seq" and task.peft_task_type == "SEQ_2_SEQ_LM"
    examples = datasets.Dataset.from_dict({"id": ["a", "b"], "source": ["the dog", "the big red house and the cat"],
                                           "target": ["el perro", "el grande rojo casa y el gato"]})
    features = task.features(examples, "train")
    batch = task.collate(list(features))
    short, long = (len(ids) for ids in features["labels"])
    assert short < long
    assert batch["labels"][0, short:].eq(-100).all() and batch["labels"][0, :short].ne(-100).all()
    assert batch["labels"].shape[1] % 8 == 0  # train.pad_to_multiple_of
    assert batch["input_ids"][0, batch["attention_mask"][0] == 0].eq(tokenizer.pad_token_id).all()
    assert features["labels"][0][-1] == tokenizer.eos_token_id
    # The model, not the task, shifts labels into decoder inputs: only labels go in.
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_t5_gets_its_task_prefix_and_marian_none(tiny_models: dict[str, Path], pairs_file: Path,
                                                 tmp_path: Path) -> None:
    examples = datasets.Dataset.from_dict({"id": ["a"], "source": ["the dog"], "target": ["el perro"]})
    t5, t5_tokenizer = make_task(tiny_models["t5"], pairs_file, tmp_path)
    ids = t5.features(examples, "test")["input_ids"][0]
    assert t5_tokenizer.decode(ids, skip_special_tokens=True) == "translate English to Spanish: the dog"
    marian, marian_tokenizer = make_task(tiny_models["marian"], pairs_file, tmp_path)
    ids = marian.features(examples, "test")["input_ids"][0]
    assert marian_tokenizer.decode(ids, skip_special_tokens=True) == "the dog"


def test_decoder_learns_eos_although_pad_is_eos(tiny_models: dict[str, Path], pairs_file: Path,
                                                tmp_path: Path) -> None:
    task, tokenizer = make_task(tiny_models["llama"], pairs_file, tmp_path, **{"data.max_length": 96})
    assert task.learned.kind == "decoder" and task.peft_task_type == "CAUSAL_LM"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    examples = datasets.Dataset.from_dict({"id": ["a", "b"], "source": ["the dog", "the big red house"],
                                           "target": ["el perro", "el grande rojo casa"]})
    features = task.features(examples, "validation")
    batch = task.collate(list(features))
    for row, feature in enumerate(features):
        prompt = feature["prompt_length"]
        # No chat template in this tokenizer: the plain prompt.
        assert tokenizer.decode(feature["input_ids"][:prompt]) == \
            f"Translate English to Spanish:\n{examples[row]['source']}\n"
        labels = batch["labels"][row]
        assert labels[:prompt].eq(-100).all()  # no loss on the prompt
        target = labels[prompt:len(feature["input_ids"])]
        assert target[-1] == tokenizer.eos_token_id  # eos is a label, although it is also the pad token
        assert tokenizer.decode(target[:-1]) == examples[row]["target"]
        assert labels[len(feature["input_ids"]):].eq(-100).all()
    assert batch["prompt_length"].tolist() == features["prompt_length"]


def test_nllb_style_tokenizer_gets_language_codes_and_forced_bos(tiny_models: dict[str, Path], pairs_file: Path,
                                                                 tmp_path: Path) -> None:
    from transformers import NllbTokenizer

    task, _ = make_task(tiny_models["t5"], pairs_file, tmp_path)
    tokenizer = NllbTokenizer()  # its language codes are special tokens: eng_Latn, spa_Latn, ...
    task.prepare_tokenizer(tokenizer)
    assert (tokenizer.src_lang, tokenizer.tgt_lang) == ("eng_Latn", "spa_Latn")
    spanish = tokenizer.convert_tokens_to_ids("spa_Latn")
    assert tokenizer(text_target="hola")["input_ids"][0] == spanish
    assert task._forced_bos_token_id(tokenizer) == spanish


# --- metrics ---------------------------------------------------------------------------------------
def test_bleu_is_100_for_perfect_hypotheses_and_0_for_empty_ones() -> None:
    references = [target for _, target in toy_pairs(20)]
    perfect = translation_scores(references, references)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    empty = translation_scores([""] * len(references), references)
    assert empty["bleu"] == 0.0 and empty["chrf"] == 0.0
    partial = translation_scores([" ".join(r.split()[:1]) for r in references], references)
    assert 0.0 < partial["chrf"] < 100.0


# --- batched generation ----------------------------------------------------------------------------
def test_evaluation_of_200_pairs_batches_generation_and_logs_its_speed(
        tiny_models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from accelerate import Accelerator

    data = write_pairs_jsonl(tmp_path / "pairs.jsonl", toy_pairs(200, seed=7))
    task, tokenizer = make_task(tiny_models["llama"], data, tmp_path, **{"eval.batch_size": 32})
    examples = task.prepare(datasets.DatasetDict({"test": datasets.load_dataset(
        "json", data_files=str(data), split="train")}))["test"]
    features = task.features(examples, "test")
    model = task.load_model(resolve_checkpoint(task.config.model)).eval()
    calls = []
    original = model.generate
    model.generate = lambda **kwargs: calls.append(kwargs["input_ids"].shape) or original(**kwargs)
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(eval_dataloader(task, features, 32))
    with caplog.at_level(logging.INFO, logger="finetune.tasks.translation"):
        result = evaluate(task, model, loader, accelerator, examples, features)
    assert sorted(shape[0] for shape in calls) == [8] + [32] * 6  # 200 pairs in 7 batches
    widths = [shape[1] for shape in calls]
    assert widths == sorted(widths, reverse=True)  # sorted by length: little padding, longest first
    assert result.metrics["generation_tokens_per_second"] > 0
    assert result.metrics["generated_tokens"] > 0
    assert "tokens/s" in caplog.text and "200 pairs" in caplog.text
    assert len(result.predictions) == 200


@pytest.mark.parametrize("kind", ["t5", "bart", "llama"])
def test_batched_greedy_generation_equals_one_by_one(kind: str, tiny_models: dict[str, Path], pairs_file: Path,
                                                     tmp_path: Path) -> None:
    task, tokenizer = make_task(tiny_models[kind], pairs_file, tmp_path, **{"data.max_length": 64})
    pairs = toy_pairs(16, seed=3)
    examples = datasets.Dataset.from_dict({"id": [str(i) for i in range(len(pairs))],
                                           "source": [s for s, _ in pairs], "target": [t for _, t in pairs]})
    features = list(task.features(examples, "test"))
    model = task.load_model(resolve_checkpoint(task.config.model)).eval()

    def generate(rows: list[dict]) -> list[list[int]]:
        """What an evaluation step generates for these features, batched together."""
        with torch.no_grad():
            generated = task.eval_step(model, task.collate(rows))["generated"]
        return [[t for t in row.tolist() if t != -100] for row in generated]

    batched = generate(features)
    one_by_one = [generate([feature])[0] for feature in features]
    assert len({len(f["input_ids"]) for f in features}) > 1  # the batch really is padded
    assert batched == one_by_one
    assert len({tuple(ids) for ids in batched}) > 1  # outputs depend on the input: the comparison means something


# --- bad input -------------------------------------------------------------------------------------
def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def prepare(tmp_path: Path, rows: list[dict], **extra: object) -> datasets.DatasetDict:
    data = write_rows(tmp_path / "bad.jsonl", rows)
    config = load_config(RECIPES_DIR / f"{RECIPE}.yaml", overrides(Path("unused"), data, tmp_path, **extra))
    from finetune.data import load_raw

    task = TranslationTask(config)
    # Checking rows needs neither a checkpoint nor a tokenizer's vocabulary.
    task.bind(TranslationLearned("seq2seq", "t5"), SimpleNamespace())
    return task.prepare(load_raw(config.data, config.run.seed))


GOOD = {"en": "the dog", "es": "el perro"}


def test_empty_side_names_row_id_and_key(tmp_path: Path) -> None:
    rows = [{"id": "Gen.1.1", "translation": GOOD}, {"id": "Gen.1.2", "translation": {"en": "the cat", "es": "  "}}]
    with pytest.raises(DataError, match=r"bad.jsonl: row 2 \(id Gen.1.2\): empty text in translation.es"):
        prepare(tmp_path, rows)


def test_missing_language_key_in_a_row_names_row_and_key(tmp_path: Path) -> None:
    rows = [{"id": "a", "translation": GOOD}, {"id": "b", "translation": GOOD}, {"id": "c", "translation": {"en": "x"}}]
    with pytest.raises(DataError, match=r"row 3 \(id c\): missing text in translation.es"):
        prepare(tmp_path, rows)


def test_language_the_data_lacks_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"column 'translation' has no language 'fr' \(data.target_lang\); "
                                        r"its languages: en, es"):
        prepare(tmp_path, [{"id": "a", "translation": GOOD}], **{"data.target_lang": "fr"})


def test_two_plain_columns(tmp_path: Path) -> None:
    rows = [{"english": "the dog", "spanish": "el perro"}, {"english": "the cat", "spanish": ""}]
    extra = {"data.source_column": "english", "data.target_column": "spanish"}
    with pytest.raises(DataError, match=r"row 2: empty text in column 'spanish'"):
        prepare(tmp_path, rows, **extra)
    prepared = prepare(tmp_path, rows[:1], **extra)["train"]
    assert prepared[0] == {"id": "1", "source": "the dog", "target": "el perro"}
    with pytest.raises(DataError, match=r"no column 'inglés'; it has: english, spanish"):
        prepare(tmp_path, rows, **{**extra, "data.source_column": "inglés"})


def test_pairs_column_of_plain_text_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"column 'translation' \(data.translation_column\) must hold"):
        prepare(tmp_path, [{"translation": "the dog"}])


def test_config_errors_name_the_key() -> None:
    recipe = RECIPES_DIR / f"{RECIPE}.yaml"
    with pytest.raises(ConfigError, match="data.source_lang"):
        load_config(recipe, ["data.source_lang=null"])
    with pytest.raises(ConfigError, match="'data.target_column' must be set together with data.source_column"):
        load_config(recipe, ["data.source_column=english"])
    with pytest.raises(ConfigError, match="eval.num_beams"):
        load_config(recipe, ["eval.num_beams=0"])
    with pytest.raises(ConfigError, match="train.metric_for_best"):
        load_config(recipe, ["train.metric_for_best=accuracy"])
    assert load_config(recipe, ["train.metric_for_best=chrf"]).train.metric_for_best == "chrf"


def test_predict_rejects_an_empty_input(tiny_models: dict[str, Path], pairs_file: Path, tmp_path: Path) -> None:
    task, tokenizer = make_task(tiny_models["t5"], pairs_file, tmp_path)
    model = task.load_model(resolve_checkpoint(task.config.model))
    with pytest.raises(DataError, match="input 2: a translation input needs a non-empty 'text'"):
        task.predict(model, [{"text": "the dog"}, {"text": " "}])


# --- shipped recipes and the real default checkpoint -----------------------------------------------
@pytest.mark.parametrize("recipe", ["translate", "translate-seq2seq"])
def test_shipped_translation_recipes_validate(recipe: str) -> None:
    config = load_config(RECIPES_DIR / f"{recipe}.yaml")
    assert config.run.task == "translation" and config.eval.before_training
    assert (config.data.source_lang, config.data.target_lang) == ("en", "es")


@pytest.mark.real
def test_smollm2_translation_prompt_labels_and_generation() -> None:
    """The default recipe's decoder path on the real SmolLM2 (GGUF converted once per session)."""
    config = load_config(RECIPES_DIR / "translate.yaml", ["eval.max_new_tokens=8"])
    checkpoint = resolve_checkpoint(config.model)
    task = bound_task(config, raw=datasets.DatasetDict())  # learning the model kind needs no data
    tokenizer = task.tokenizer
    assert task.learned.kind == "decoder" and tokenizer.pad_token_id == tokenizer.eos_token_id
    examples = datasets.Dataset.from_dict({
        "id": ["John.11.35", "Gen.1.1"], "source": ["Jesus wept.", "In the beginning, God created the heavens and the earth."],
        "target": ["Y lloró Jesús.", "En el principio crió Dios los cielos y la tierra."]})
    features = task.features(examples, "test")
    prompt = tokenizer.decode(features[0]["input_ids"][:features[0]["prompt_length"]])
    assert prompt == ("<|im_start|>system\nYou translate English to Spanish.<|im_end|>\n<|im_start|>user\n"
                      "Translate English to Spanish:\nJesus wept.<|im_end|>\n<|im_start|>assistant\n")
    assert features[0]["labels"][-1] == tokenizer.eos_token_id  # <|im_end|>: learned although it pads
    model = task.load_model(checkpoint).eval()
    with torch.no_grad():
        outputs = task.eval_step(model, task.collate(list(features)))
    assert outputs["loss"].shape == (2,) and torch.isfinite(outputs["loss"]).all()
    assert outputs["generated"].shape[0] == 2 and (outputs["generated"] != -100).sum() > 0
