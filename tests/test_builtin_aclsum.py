"""The built-in summarization set ``aclsum`` (ACLSum papers and summaries, from PyPI ``aclsum``)."""

from __future__ import annotations

import importlib.util
import re

import datasets
import pytest

from finetune.builtin import BUILTIN_SOURCES, acl_summaries, load_builtin

# Found, not imported: the loader reads the files only (importing aclsum needs sienna).
if importlib.util.find_spec("aclsum") is None:
    pytest.skip(f"the corpus package is not installed: {acl_summaries.INSTALL_HINT}", allow_module_level=True)


@pytest.fixture(scope="module")
def papers() -> datasets.DatasetDict:
    return load_builtin("aclsum")


def test_registered_with_the_corpus_splits(papers: datasets.DatasetDict) -> None:
    assert BUILTIN_SOURCES["aclsum"] == "acl_summaries"
    assert {split: papers[split].num_rows for split in papers} == {"train": 100, "validation": 50, "test": 100}
    for split in papers.values():
        assert list(split.features) == ["id", "title", "document", "summary", "challenge", "approach", "outcome"]
        assert all(feature == datasets.Value("string") for feature in split.features.values())


def test_ids_are_acl_anthology_ids_and_splits_do_not_overlap(papers: datasets.DatasetDict) -> None:
    ids = [i for split in papers.values() for i in split["id"]]
    assert len(ids) == len(set(ids)) == 250
    assert all(re.fullmatch(r"[A-Z]\d\d-\d{4}|\d{4}\.[a-z]+-[a-z]+\.\d+", i) for i in ids), ids


def test_documents_and_summaries(papers: datasets.DatasetDict) -> None:
    for split in papers.values():
        for row in split:
            # Three sections (abstract, introduction, conclusion) separated by blank lines.
            sections = row["document"].split("\n\n")
            assert len(sections) == 3 and all(s.strip() == s and s for s in sections), row["id"]
            assert 350 <= len(row["document"].split()) <= 2901
            # The summary is the three aspects in order, each one non-empty sentence or so.
            aspects = [row["challenge"], row["approach"], row["outcome"]]
            assert all(aspects) and row["summary"] == " ".join(aspects)
            assert 43 <= len(row["summary"].split()) <= 75
            assert row["title"]


def test_known_paper(papers: datasets.DatasetDict) -> None:
    first = papers["test"][0]
    assert first["id"] == "E09-1056"
    assert first["title"].startswith("Improvements in Analogical Learning")
    assert first["document"].startswith("Handling terminology is an important matter in a translation workflow .")
    assert first["challenge"].startswith("Existing machine translation systems do not manage domain-specific terms")
    assert papers["train"][0]["id"] == "P06-1112" and papers["validation"][0]["id"] == "2021.eacl-main.84"
