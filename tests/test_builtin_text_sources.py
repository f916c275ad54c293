"""Tests of the built-in text sources ``bible-en-es`` (translation) and ``chatterbot`` (SFT pairs)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
from pathlib import Path

import datasets
import pytest

from finetune.builtin import bible_en_es, chatterbot, load_builtin

DATA_FILE = Path(bible_en_es.__file__).parent / "data" / bible_en_es.DATA_FILE
PROVENANCE = DATA_FILE.parent / "PROVENANCE.md"


@pytest.fixture(scope="module")
def bible() -> datasets.Dataset:
    return load_builtin("bible-en-es")["train"]


@pytest.fixture(scope="module")
def chat() -> datasets.Dataset:
    pytest.importorskip("chatterbot_corpus")
    return load_builtin("chatterbot")["train"]


# ---------------------------------------------------------------------------------------------
# bible-en-es
# ---------------------------------------------------------------------------------------------


def test_bible_shape(bible: datasets.Dataset) -> None:
    assert bible.num_rows > 30_000
    assert list(bible.features) == ["id", "translation"]
    assert isinstance(bible.features["translation"], datasets.Translation)
    assert tuple(bible.features["translation"].languages) == ("en", "es")


def test_bible_ids_unique_and_canonical(bible: datasets.Dataset) -> None:
    ids = bible["id"]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[1-3]?[A-Z][a-z]+\.\d+\.\d+", i) for i in ids)
    assert ids[0] == "Gen.1.1" and ids[-1] == "Rev.22.21"


def test_bible_text_is_clean(bible: datasets.Dataset) -> None:
    for pair in bible["translation"]:
        for lang in ("en", "es"):
            text = pair[lang]
            assert text and text == text.strip(), pair
            # No markup, entities, footnote residue, pilcrows or doubled spaces.
            assert not re.search(r"[<>&¶\x00\[\]]|\s{2}|strong:", text), pair


def test_bible_known_verses(bible: datasets.Dataset) -> None:
    verses = dict(zip(bible["id"], bible["translation"]))
    john = verses["John.3.16"]
    assert "God so loved the world" in john["en"]
    assert "Porque de tal manera amó Dios al mundo" in john["es"]
    # Footnotes are dropped without gluing words ("God" + note + "created").
    assert verses["Gen.1.1"] == {
        "en": "In the beginning, God created the heavens and the earth.",
        "es": "En el principio crió Dios los cielos y la tierra.",  # drop cap "EN" undone
    }
    # Canonical psalm titles stay on both sides, as RV1909 prints them inline in verse 1.
    assert verses["Ps.3.1"]["en"].startswith("A Psalm by David")
    assert verses["Ps.3.1"]["es"].startswith("Salmo de David")
    # Where the Spanish module numbers differently (Job 39 starts at KJV 38:39), text is realigned.
    assert "lioness" in verses["Job.38.39"]["en"] and "león" in verses["Job.38.39"]["es"]
    # The WEB glossary appended to the last verse is gone.
    assert len(verses["Rev.22.21"]["en"]) < 100


def test_bible_data_file_matches_provenance() -> None:
    data = DATA_FILE.read_bytes()
    assert data[4:8] == b"\x00\x00\x00\x00"  # gzip mtime=0: rebuilds give identical bytes
    note = PROVENANCE.read_text(encoding="utf-8")
    assert hashlib.sha256(data).hexdigest() in note
    rows = [json.loads(line) for line in gzip.decompress(data).decode("utf-8").splitlines()]
    assert f"{len(rows):,}" in note


def test_bible_missing_file_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bible_en_es, "DATA_FILE", "absent.jsonl.gz")
    with pytest.raises(RuntimeError, match="build_bible_en_es.py"):
        bible_en_es.load()


# ---------------------------------------------------------------------------------------------
# chatterbot
# ---------------------------------------------------------------------------------------------


def test_chatterbot_shape(chat: datasets.Dataset) -> None:
    assert list(chat.features) == ["prompt", "response", "category"]
    assert all(v == datasets.Value("string") for v in chat.features.values())
    # 2,306 consecutive-line pairs in the English files, 1,176 after dropping exact duplicates
    # (tech_support.yml repeats 10 pairs 105 times each).
    assert chat.num_rows > 1_000


def test_chatterbot_pairs_are_clean(chat: datasets.Dataset) -> None:
    pairs = list(zip(chat["prompt"], chat["response"]))
    assert len(set(pairs)) == len(pairs)
    for prompt, response in pairs:
        assert prompt and response
        assert prompt == prompt.strip() and response == response.strip()
    assert len(set(chat["category"])) == 21
    assert ("What is AI?", "Artificial Intelligence is the branch of engineering and science devoted to constructing machines that think.") in pairs


def test_chatterbot_keeps_numbers_and_code_as_text(chat: datasets.Dataset) -> None:
    responses = dict(zip(chat["prompt"], chat["response"]))
    assert responses["In what year were the first Air Jordan sneakers released?"] == "1984"
    assert any("\n    " in r for r in chat["response"])  # indentation of code blocks survives


def test_chatterbot_deterministic(chat: datasets.Dataset) -> None:
    again = chatterbot.load(seed=1)["train"]
    assert again["prompt"] == chat["prompt"] and again["response"] == chat["response"]


def test_chatterbot_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "chatterbot_corpus" else real(name, *a))
    with pytest.raises(RuntimeError, match=re.escape("pip install --no-deps chatterbot-corpus==1.3.3")):
        chatterbot.load()
