"""Finished runs of every task in seconds: tiny models built from configs, toy data, a few optimizer steps.
What the report page, ``finetune runs`` and ``finetune compare`` are tested on."""

from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import build_tiny_bert, synthetic_reviews, write_csv
from finetune.recipes import RECIPES_DIR, load_config
from finetune.train import train

COMMON = {"train.mixed_precision": "no", "train.log_every_steps": 2, "eval.batch_size": 16,
          "data.max_train_samples": None, "data.max_eval_samples": None, "data.max_test_samples": None,
          "run.name": None}
PLACES = ["river", "street", "window", "table", "cloud", "paper"]


def overrides(values: dict[str, object]) -> list[str]:
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def toy_questions(n: int, seed: int = 0) -> list[dict]:
    """SQuAD-form rows: the answer is the word after "the" that the question names."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        target = rng.choice(PLACES)
        words = [rng.choice(["the", "a", "movie", "was", "it", "really", "day"]) for _ in range(rng.randint(4, 9))]
        at = rng.randrange(len(words) + 1)
        context = " ".join(words[:at] + [target] + words[at:])
        start = len(" ".join(words[:at] + [""])) if at else 0
        rows.append({"id": f"q{i}", "context": context, "question": f"where is the {target} ?",
                     "answers": {"text": [target], "answer_start": [start]}})
    return rows


def train_task_run(task: str, root: Path, **extra: object) -> Path:
    """A finished run of ``task`` (classification, question-answering, generation or translation) under
    ``root/runs``; the tiny model and the data are made under ``root``."""
    recipe, args = task_run_args(task, root, **extra)
    return train(load_config(RECIPES_DIR / f"{recipe}.yaml", args), recipe)


def task_run_args(task: str, root: Path, **extra: object) -> tuple[str, list[str]]:
    """(recipe, overrides) of :func:`train_task_run`, for the command line."""
    root.mkdir(parents=True, exist_ok=True)
    out = root / "runs"
    if task == "classification":
        model = build_tiny_bert(root / "tiny-bert")
        data = write_csv(root / "reviews.csv", synthetic_reviews(200))
        recipe, values = "classify", {"data.max_length": 32, "train.batch_size": 16, "train.epochs": 2,
                                      "train.learning_rate": 0.01, "train.eval_every_steps": 4, "lora.r": 4}
    elif task == "question-answering":
        model = build_tiny_bert(root / "tiny-bert")
        data = root / "questions.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in toy_questions(80)), encoding="utf-8")
        recipe, values = "qa", {"data.max_length": 32, "data.doc_stride": 8, "data.validation_size": 0.2,
                                "data.test_size": 0.2, "train.batch_size": 8, "train.epochs": 1,
                                "train.eval_every_steps": 3, "lora.r": 4}
    elif task == "generation":
        from tiny_decoder import build_checkpoint, synthetic_pairs

        model = build_checkpoint(root / "tiny-llama", "llama")
        data = root / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(80)), encoding="utf-8")
        recipe, values = "generate", {"data.max_length": 48, "data.system_prompt": None, "train.batch_size": 8,
                                      "train.max_steps": 6, "train.eval_every_steps": 3, "eval.generate_samples": 6,
                                      "eval.max_new_tokens": 8, "eval.before_training": True}
    elif task == "translation":
        from tiny_translation import build_tiny_t5, toy_pairs, write_pairs_jsonl

        model = build_tiny_t5(root / "tiny-t5")
        data = write_pairs_jsonl(root / "pairs.jsonl", toy_pairs(60))
        recipe, values = "translate-seq2seq", {"data.max_length": 32, "data.validation_size": 0.1,
                                               "data.test_size": 0.2, "train.batch_size": 8, "train.epochs": 1,
                                               "train.eval_every_steps": None, "eval.max_new_tokens": 8}
    else:
        raise ValueError(task)
    values = {"model.name_or_path": model, "data.source": "files", "data.train_file": data,
              "run.output_dir": out, **COMMON, **values, **extra}
    return recipe, overrides(values)
