"""``aclsum``: 250 ACL papers (abstract, introduction, conclusion) with human-written summaries.

Source: the PyPI package ``aclsum==0.1.2`` (declared licence: MIT; Requires-Python >= 3.11), the data
of "ACLSum: A New Dataset for Aspect-based Summarization of Scientific Publications" (Takeshita et
al., NAACL 2024). Files ``aclsum/dataset/{train,val,test}.jsonl`` hold one paper per line: its ACL
Anthology ``id``, ``title``, the sentences of three ``sections`` (abstract, introduction,
conclusion; tokenized, with spaces around punctuation, as the corpus gives them), and three
one-sentence human-written ``summary`` aspects: ``challenge`` (the problem), ``approach`` (what
the paper does), ``outcome`` (what it finds). The files are read directly: importing ``aclsum``
is not needed (and it needs ``sienna``, hence ``--no-deps``).

Licence: the summaries and annotations come with the package (MIT). The document texts are
sentences of the papers themselves; the ACL Anthology licenses papers from 2016 on under CC BY 4.0
(112 of the 250) and earlier ones (138, 1993-2015) under CC BY-NC-SA 3.0, so the documents as a
whole are for non-commercial use.

Rows: ``id``, ``title``, ``document`` (the sentences of each section joined by spaces, sections
in the order abstract, introduction, conclusion, separated by a blank line; median ~960 words,
350 to 2,901), ``summary`` (challenge, approach and outcome joined by spaces: 43 to 75 words) and
the three aspects as their own columns. Splits are the corpus's own: train 100, validation 50,
test 100 papers.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets

INSTALL_HINT = "pip install --no-deps aclsum==0.1.2"
ASPECTS = ("challenge", "approach", "outcome")
SECTIONS = ("abstract", "introduction", "conclusion")
# our split name -> the corpus's file
SPLIT_FILES = {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}
COLUMNS = ("id", "title", "document", "summary", *ASPECTS)


def _data_dir() -> Path:
    """``aclsum/dataset``, found without importing the package."""
    spec = importlib.util.find_spec("aclsum")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the package 'aclsum' is not installed: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "dataset"
    missing = [name for name in SPLIT_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} missing under {folder}; reinstall the corpus: {INSTALL_HINT}")
    return folder


def _row(paper: dict) -> dict[str, str]:
    sections = paper["sentences"]
    document = "\n\n".join(" ".join(s.strip() for s in sections[name]) for name in SECTIONS if sections.get(name))
    aspects = {name: " ".join(paper["summary"][name].split()) for name in ASPECTS}
    return {
        "id": paper["id"],
        "title": " ".join(paper["title"].split()),
        "document": document,
        "summary": " ".join(aspects[name] for name in ASPECTS),
        **aspects,
    }


def load(seed: int = 0) -> datasets.DatasetDict:
    """The corpus's ``train`` / ``validation`` / ``test`` splits (100 / 50 / 100 papers), file order.

    ``seed`` is unused: the splits are the corpus's own.
    """
    folder = _data_dir()
    features = datasets.Features({name: datasets.Value("string") for name in COLUMNS})
    splits = {}
    for split, file_name in SPLIT_FILES.items():
        with (folder / file_name).open(encoding="utf-8") as handle:
            rows = [_row(json.loads(line)) for line in handle if line.strip()]
        splits[split] = datasets.Dataset.from_dict(
            {name: [row[name] for row in rows] for name in COLUMNS}, features=features
        )
    return datasets.DatasetDict(splits)
