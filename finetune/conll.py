"""Reading token-classification files: CoNLL column files and CoNLL-U treebanks.

``read_conll(path)`` returns one row per sentence, ``{"tokens": [...], "tags": [...]}``; the format
is chosen by the file's extension:

- ``.conllu`` (CoNLL-U, Universal Dependencies): 10 tab-separated columns
  (ID FORM LEMMA UPOS XPOS FEATS HEAD DEPREL DEPS MISC); ``#`` lines are comments; multiword-token
  lines (ID ``1-2``) and empty nodes (ID ``1.1``) are skipped, so the tokens are the syntactic words;
  the tag is the UPOS column. Word IDs must run 1, 2, 3, ... within a sentence.
- anything else (CoNLL-2000/2002/2003 style ``.txt``, ``.conll``, ``.tsv``, ...): one token per line,
  whitespace-separated columns, the first column is the word and the LAST column is the tag (so
  ``word tag`` and CoNLL-2003's ``word POS chunk NE`` both give NE tags); every token line of a file
  must have the same number of columns; ``-DOCSTART-`` lines are skipped (they also end a sentence).

In both, blank lines (or lines of whitespace only) separate sentences. Problems raise
``DataError`` naming the file and line and what was expected there. ``iob1_to_iob2`` rewrites IOB1
entity tags (CoNLL-2003's original files) as IOB2.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from finetune.errors import DataError

__all__ = ["CONLLU_SUFFIXES", "DOCSTART", "iob1_to_iob2", "read_conll"]

CONLLU_SUFFIXES = frozenset({".conllu"})
DOCSTART = "-DOCSTART-"
_CONLLU_COLUMNS = 10
_UPOS = 3  # 0-based index of the UPOS column


def read_conll(path: Path) -> list[dict[str, list[str]]]:
    """Sentences of a CoNLL (word ... tag) or CoNLL-U (``.conllu``) file as ``{"tokens", "tags"}`` rows."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    reader = _read_conllu if path.suffix.lower() in CONLLU_SUFFIXES else _read_columns
    rows = reader(path)
    if not rows:
        raise DataError(f"{path}: no sentences found (expected token lines separated by blank lines)")
    return rows


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
    """IOB1 tags as IOB2: an ``I-X`` that does not continue an entity of type X becomes ``B-X``.

    In IOB1, ``B-X`` only marks an entity that directly follows another of the same type; every
    other entity starts with ``I-X``. IOB2 starts every entity with ``B-X``. Tags already in IOB2
    (and tags without a ``B-``/``I-`` prefix, such as ``O``) come back unchanged.
    """
    out: list[str] = []
    previous = "O"
    for tag in tags:
        if tag.startswith("I-"):
            kind = tag[2:]
            if previous[:2] not in ("B-", "I-") or previous[2:] != kind:
                tag = "B-" + kind
        out.append(tag)
        previous = tag
    return out


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its line break), decoding UTF-8 (a BOM is dropped)."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            yield number, line.rstrip("\r\n")


def _read_columns(path: Path) -> list[dict[str, list[str]]]:
    rows: list[dict[str, list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    width: tuple[int, int] | None = None  # (columns, line that set it)

    def end_sentence() -> None:
        if tokens:
            rows.append({"tokens": tokens.copy(), "tags": tags.copy()})
            tokens.clear()
            tags.clear()

    for number, line in _lines(path):
        columns = line.split()
        if not columns:
            end_sentence()
            continue
        if columns[0] == DOCSTART:
            end_sentence()
            continue
        if len(columns) < 2:
            raise DataError(
                f"{path}:{number}: expected at least 2 whitespace-separated columns (word ... tag), "
                f"got 1: {line.strip()!r}"
            )
        if width is None:
            width = (len(columns), number)
        elif len(columns) != width[0]:
            raise DataError(
                f"{path}:{number}: expected {width[0]} columns like line {width[1]}, got {len(columns)}: "
                f"{line.strip()!r} (a word with a space in it, or a missing column?)"
            )
        tokens.append(columns[0])
        tags.append(columns[-1])
    end_sentence()
    return rows


def _read_conllu(path: Path) -> list[dict[str, list[str]]]:
    rows: list[dict[str, list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    for number, line in _lines(path):
        if not line.strip():
            if tokens:
                rows.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
            continue
        if line.startswith("#"):
            continue
        columns = line.split("\t")  # FORM and LEMMA may contain spaces in CoNLL-U
        if len(columns) != _CONLLU_COLUMNS:
            raise DataError(
                f"{path}:{number}: expected {_CONLLU_COLUMNS} tab-separated CoNLL-U columns "
                f"(ID FORM LEMMA UPOS XPOS FEATS HEAD DEPREL DEPS MISC), got {len(columns)}: {line!r}"
            )
        word_id = columns[0]
        if "-" in word_id or "." in word_id:  # multiword token range or empty node
            continue
        if not word_id.isdigit():
            raise DataError(f"{path}:{number}: expected an integer word ID, a range 1-2 or a node 1.1, got {word_id!r}")
        if int(word_id) != len(tokens) + 1:
            raise DataError(
                f"{path}:{number}: expected word ID {len(tokens) + 1} (IDs run 1, 2, ... within a sentence), "
                f"got {word_id} (a missing blank line between sentences, or a lost line?)"
            )
        form, upos = columns[1], columns[_UPOS]
        if not form or upos in ("", "_"):
            raise DataError(f"{path}:{number}: expected a word form and a UPOS tag, got FORM={form!r} UPOS={upos!r}")
        tokens.append(form)
        tags.append(upos)
    if tokens:
        rows.append({"tokens": tokens, "tags": tags})
    return rows
