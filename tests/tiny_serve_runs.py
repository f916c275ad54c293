"""Finished runs of tiny models for the export and serve tests, trained in-process in a few seconds by the
real training loop (the run folders are what `finetune train` writes)."""

from __future__ import annotations

import json
from pathlib import Path

import tiny_decoder
from conftest import synthetic_reviews, tiny_overrides, write_csv

ROOT = Path(__file__).resolve().parent.parent


def shared_run(tmp_path_factory, kind: str, tiny_bert: Path | None = None) -> Path:
    """The ``chat`` or ``classifier`` run, trained once per test session: the modules that need one share
    its folder (a finished run is never trained again)."""
    folder = tmp_path_factory.getbasetemp() / "shared-tiny-runs" / kind
    name = {"chat": "tiny-chat", "classifier": "tiny-classifier"}[kind]
    if (folder / name / "metrics.json").is_file():
        return folder / name
    folder.mkdir(parents=True, exist_ok=True)
    return decoder_run(folder, name=name) if kind == "chat" else classifier_run(folder, tiny_bert, name=name)


def train_run(recipe: str, overrides: list[str]) -> Path:
    from finetune.recipes import load_config, resolve_recipe
    from finetune.train import train

    path, name = resolve_recipe(recipe)
    return train(load_config(path, overrides), name)


def decoder_run(folder: Path, kind: str = "llama", name: str = "tiny-chat", steps: int = 12) -> Path:
    """A LoRA SFT run of a tiny decoder (Llama or GPT-2) on chat-formatted prompt/response pairs."""
    checkpoint = tiny_decoder.build_checkpoint(folder / f"base-{kind}", kind=kind)
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in tiny_decoder.synthetic_pairs(96, seed=1)),
                    encoding="utf-8")
    return train_run("generate", [
        f"model.name_or_path={checkpoint}", "data.source=files", f"data.train_file={data}", "data.shape=auto",
        "data.system_prompt=null", "data.max_length=48", "lora.r=8", "lora.alpha=16", "lora.dropout=0",
        "train.epochs=1", f"train.max_steps={steps}", "train.batch_size=16", "train.learning_rate=0.01",
        "train.warmup_ratio=0", "train.eval_every_steps=100", "train.mixed_precision=no",
        "eval.before_training=false", "eval.generate_samples=0", "eval.max_new_tokens=12", "eval.batch_size=16",
        f"run.output_dir={folder}", f"run.name={name}"])


def classifier_run(folder: Path, tiny_bert: Path, name: str = "tiny-classifier") -> Path:
    """A LoRA run of the tiny BERT on the synthetic three-class reviews. One epoch with large steps: it
    learns little, but its logits are of order 1 and far from the base model's (measured: largest |logit|
    2.2, as far from the adapter-free model), so that agreement within 1e-4 means something."""
    data = write_csv(folder / "reviews.csv", synthetic_reviews(160))
    return train_run("classify", tiny_overrides(tiny_bert, data, folder, **{
        "run.name": name, "train.epochs": 1, "train.learning_rate": 0.2, "eval.before_training": "false"}))


def qa_run(folder: Path, tiny_bert: Path, name: str = "tiny-qa") -> Path:
    """A LoRA extractive-QA run of the tiny BERT, with windows short enough that contexts are split. It
    learns to answer (measured: start logits up to 2.7, best span ahead of the next by 0.05 to 1.3), so
    that equal spans from two runtimes are not a coin toss between near-ties."""
    from test_question_answering import synthetic_qa

    data = folder / "qa.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in synthetic_qa(96, unanswerable=False)),
                    encoding="utf-8")
    return train_run("qa", [
        f"model.name_or_path={tiny_bert}", "data.source=files", f"data.train_file={data}",
        "data.validation_size=0.2", "data.test_size=0.2", "data.max_length=32", "data.doc_stride=8",
        "train.epochs=2", "train.batch_size=8", "train.learning_rate=0.02", "train.eval_every_steps=100",
        "train.mixed_precision=no", "lora.r=4", "lora.alpha=8", "eval.batch_size=16", "eval.before_training=false",
        f"run.output_dir={folder}", f"run.name={name}"])
