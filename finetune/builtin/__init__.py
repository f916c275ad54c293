"""Built-in offline datasets, each built from a package that a registry ships (see ASSETS.md).

Every module here exposes ``load(seed: int = 0) -> datasets.DatasetDict``; a registered variant
passes extra keyword arguments (``BUILTIN_OPTIONS``). A source returns
the splits it naturally has; missing held-out splits are made later by ``finetune.data``.
"""

from __future__ import annotations

import importlib

import datasets

# name -> module under finetune.builtin; imported lazily so that a missing optional
# package only matters for the source that needs it.
BUILTIN_SOURCES: dict[str, str] = {
    "tweet-sentiment": "tweet_sentiment",
    "tweet-confidence": "tweet_sentiment",
    "brown-genre": "brown",
    "brown-grammar": "brown",
    "chatterbot": "chatterbot",
    "bible-en-es": "bible_en_es",
    "country-facts-qa": "country_facts_qa",
    "country-facts-qa-v2": "country_facts_qa",
    "wnut16-ner": "wnut16_ner",
    "aclsum": "acl_summaries",
}
# Keyword arguments for ``load`` of sources that are a variant of a module's default set.
BUILTIN_OPTIONS: dict[str, dict[str, object]] = {
    "country-facts-qa-v2": {"unanswerable": True},  # SQuAD v2: some questions have no answer
    "tweet-confidence": {"rated_only": True},  # regression: tweets whose annotators' confidence is known
    "brown-grammar": {"labels": "grammar"},  # multi-label
}


def load_builtin(name: str, seed: int = 0) -> datasets.DatasetDict:
    """Load the built-in dataset ``name``; raise KeyError naming the known ones."""
    if name not in BUILTIN_SOURCES:
        raise KeyError(f"unknown built-in dataset {name!r}; known: {', '.join(sorted(BUILTIN_SOURCES))}")
    module = importlib.import_module(f"finetune.builtin.{BUILTIN_SOURCES[name]}")
    return module.load(seed=seed, **BUILTIN_OPTIONS.get(name, {}))
