"""``chatterbot``: English prompt/response pairs from the ChatterBot corpus (generation / SFT).

Source: the PyPI package ``chatterbot-corpus==1.3.3`` (BSD-3-Clause), YAML files under
``chatterbot_corpus/data/english/``, each with ``categories`` and ``conversations`` (lists of
lines). Line i and line i+1 of a conversation form one (prompt, response) pair. The files are
read directly: importing ``chatterbot_corpus`` is not needed (and its metadata asks for
ChatterBot, hence ``--no-deps``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import datasets
import yaml

INSTALL_HINT = "pip install --no-deps chatterbot-corpus==1.3.3"
LANGUAGE = "english"


def _data_dir() -> Path:
    """Folder of the English YAML files, without importing the package."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the package 'chatterbot-corpus' is not installed: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / LANGUAGE
    if not folder.is_dir() or not any(folder.glob("*.yml")):
        raise RuntimeError(f"no YAML files under {folder}; reinstall the corpus: {INSTALL_HINT}")
    return folder


def _as_text(value: Any) -> str | None:
    """A conversation line as stripped text, or None when it is not a usable line.

    The files are parsed with ``yaml.BaseLoader``, so every scalar arrives as the exact text
    written ("22", "No"), never as an int or a bool; the number branch only guards against a
    loader that types scalars.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):  # a nested list or mapping is not a line
        return None
    # Strip only the ends: coding.yml answers hold code blocks whose line breaks and indentation
    # are the content.
    text = value.strip()
    return text or None


def load(seed: int = 0) -> datasets.DatasetDict:
    """All English pairs as one ``train`` split with columns ``prompt``, ``response``, ``category``.

    Order is deterministic (files by name, then conversation order); exact duplicate
    (prompt, response) pairs are kept once, with the category of their first occurrence.
    ``seed`` is unused: the pipeline makes the held-out splits.
    """
    prompts: list[str] = []
    responses: list[str] = []
    categories: list[str] = []
    seen: set[tuple[str, str]] = set()
    for path in sorted(_data_dir().glob("*.yml")):
        with path.open(encoding="utf-8") as handle:
            # BaseLoader keeps every scalar as written: "No" stays "No" instead of False.
            document = yaml.load(handle, Loader=yaml.BaseLoader) or {}
        names = document.get("categories") or [path.stem]
        category = _as_text(names[0]) or path.stem
        for conversation in document.get("conversations") or []:
            # trivia.yml has one entry missing its inner "- ", which parses as a single string:
            # it is not a conversation, so it is skipped rather than guessed at.
            if not isinstance(conversation, list):
                continue
            lines = [_as_text(line) for line in conversation]
            for prompt, response in zip(lines, lines[1:]):
                if prompt is None or response is None or (prompt, response) in seen:
                    continue
                seen.add((prompt, response))
                prompts.append(prompt)
                responses.append(response)
                categories.append(category)
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"prompt": prompts, "response": responses, "category": categories},
                features=datasets.Features(
                    {
                        "prompt": datasets.Value("string"),
                        "response": datasets.Value("string"),
                        "category": datasets.Value("string"),
                    }
                ),
            )
        }
    )
