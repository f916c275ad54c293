"""Shared fixtures: offline environment, tiny models built from configs, small data files."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest

# Tests never reach the Hub: metrics load from the project's local modules at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["good", "great", "excellent", "lovely", "superb", "happy", "fine", "nice"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "sad", "horrible", "ugly", "nasty"]
NEUTRAL = ["table", "chair", "window", "paper", "street", "number", "river", "cloud"]
FILLER = ["the", "a", "movie", "was", "it", "really", "quite", "and", "this", "day", "for", "me", "so"]


def synthetic_reviews(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) pairs whose label is given by one cue word among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label, words = rng.choice([("positive", POSITIVE), ("negative", NEGATIVE), ("neutral", NEUTRAL)])
        tokens = [rng.choice(FILLER) for _ in range(rng.randint(1, 5))]
        tokens.insert(rng.randrange(len(tokens) + 1), rng.choice(words))
        rows.append((" ".join(tokens), label))
    return rows


def build_tiny_bert(folder: Path, dropout: float = 0.1) -> Path:
    """A 2-layer BERT with a WordPiece tokenizer trained on the synthetic vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = [t for t, _ in synthetic_reviews(500)] + [" ".join(POSITIVE + NEGATIVE + NEUTRAL + FILLER)]
    tokenizer.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    fast = BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]", model_max_length=128)
    fast.save_pretrained(folder)
    config = BertConfig(vocab_size=fast.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=fast.pad_token_id,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)  # with its pooler: nothing random at load but the head
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture()
def reviews_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "reviews.csv", synthetic_reviews(240))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built-in datasets are cached under FINETUNE_CACHE: one per test session, not the user's."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "finetune-cache"))


def tiny_overrides(model: Path, csv_path: Path, out: Path, **extra: object) -> list[str]:
    """Overrides that make the classify recipe train a tiny model on a csv in seconds."""
    values = {
        "model.name_or_path": str(model), "data.source": "files", "data.train_file": str(csv_path),
        "data.max_length": 32, "train.batch_size": 16, "train.epochs": 2, "train.learning_rate": 0.005,
        "train.eval_every_steps": 5, "train.mixed_precision": "no", "lora.r": 4, "lora.alpha": 8,
        "run.output_dir": str(out), "run.name": "tiny", "data.max_train_samples": None,
        "data.max_eval_samples": None, "eval.batch_size": 32,
    }
    values.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def bound_task(config, raw=None):
    """The config's task as a training run makes it: taught by the source's training split (``raw``, or the
    config's data source) and bound to the checkpoint's tokenizer."""
    from finetune.data import load_raw
    from finetune.models import resolve_checkpoint
    from finetune.tasks import new_task

    raw = load_raw(config.data, config.run.seed) if raw is None else raw
    return new_task(config, resolve_checkpoint(config.model), raw)
