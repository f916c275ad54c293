"""``bible-en-es``: 30,979 aligned English -> Spanish Bible verses (translation).

English: World English Bible; Spanish: Reina-Valera 1909; both public domain. The verses ship
with the package as ``finetune/builtin/data/bible_en_es.jsonl.gz``, derived from the SWORD
modules of the Debian packages ``sword-text-web`` and ``sword-text-sparv`` by
``scripts/build_bible_en_es.py`` (see ``data/PROVENANCE.md``). Reading it needs nothing beyond
``datasets``.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json

import datasets

DATA_FILE = "bible_en_es.jsonl.gz"
BUILD_SCRIPT = "scripts/build_bible_en_es.py"
FEATURES = datasets.Features(
    {"id": datasets.Value("string"), "translation": datasets.Translation(languages=("en", "es"))}
)


def load(seed: int = 0) -> datasets.DatasetDict:
    """All verse pairs, in canonical order, as one ``train`` split.

    Columns: ``id`` ("Gen.1.1", the English reference) and ``translation`` ({"en": ..., "es": ...},
    the Hub's usual translation shape). ``seed`` is unused: there is nothing random here, and the
    pipeline makes the held-out splits.
    """
    resource = importlib.resources.files("finetune.builtin").joinpath("data", DATA_FILE)
    if not resource.is_file():
        raise RuntimeError(
            f"the data file finetune/builtin/data/{DATA_FILE} is missing; rebuild it with "
            f"`python {BUILD_SCRIPT}` (needs `apt-get install sword-text-web sword-text-sparv` and `pip install pysword`)"
        )
    ids: list[str] = []
    pairs: list[dict[str, str]] = []
    with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            ids.append(row["id"])
            pairs.append({"en": row["en"], "es": row["es"]})
    return datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"id": ids, "translation": pairs}, features=FEATURES)}
    )
