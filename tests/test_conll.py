"""Tests of ``finetune.conll``: CoNLL column files, CoNLL-U treebanks, IOB1 -> IOB2, and bad lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from finetune.conll import iob1_to_iob2, read_conll
from finetune.errors import DataError

CONLL_2003 = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O
"""

CONLLU = """# newdoc id = doc1
# sent_id = 1
# text = I can't go.
1\tI\tI\tPRON\tPRP\t_\t4\tnsubj\t_\t_
2-3\tcan't\t_\t_\t_\t_\t_\t_\t_\t_
2\tca\tcan\tAUX\tMD\t_\t4\taux\t_\t_
3\tn't\tnot\tPART\tRB\t_\t4\tadvmod\t_\t_
4\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\tSpaceAfter=No
4.1\tgone\tgo\tVERB\tVBN\t_\t_\t_\t4:conj\t_
5\t.\t.\tPUNCT\t.\t_\t4\tpunct\t_\t_

# sent_id = 2
1\tNew York\tNew York\tPROPN\tNNP\t_\t0\troot\t_\t_
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_conll_2003_columns_docstart_and_last_column_tags(tmp_path: Path) -> None:
    rows = read_conll(write(tmp_path, "eng.train", CONLL_2003))
    assert rows == [
        {"tokens": ["EU", "rejects", "German", "call", "."], "tags": ["B-ORG", "O", "B-MISC", "O", "O"]},
        {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
        {"tokens": ["BRUSSELS", "1996-08-22"], "tags": ["B-LOC", "O"]},  # no blank line at the end
    ]


def test_two_columns_tabs_whitespace_only_separators_and_crlf(tmp_path: Path) -> None:
    # WNUT-style: word<TAB>tag, sentences separated by a line holding only a tab; Windows line ends.
    text = "@paulwalk\tO\r\nEmpire\tB-facility\r\nState\tI-facility\r\n\t\r\n\r\n\r\nhi\tO\r\n\t\r\n"
    rows = read_conll(write(tmp_path, "train.txt", text))
    assert rows == [
        {"tokens": ["@paulwalk", "Empire", "State"], "tags": ["O", "B-facility", "I-facility"]},
        {"tokens": ["hi"], "tags": ["O"]},
    ]


def test_docstart_without_blank_line_still_ends_the_sentence(tmp_path: Path) -> None:
    rows = read_conll(write(tmp_path, "a.conll", "a O\n-DOCSTART- O\nb O\n"))
    assert rows == [{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["b"], "tags": ["O"]}]


def test_conllu_skips_comments_ranges_and_empty_nodes(tmp_path: Path) -> None:
    rows = read_conll(write(tmp_path, "en_ewt-ud-dev.conllu", CONLLU))
    assert rows == [
        {"tokens": ["I", "ca", "n't", "go", "."], "tags": ["PRON", "AUX", "PART", "VERB", "PUNCT"]},
        {"tokens": ["New York"], "tags": ["PROPN"]},  # CoNLL-U forms may hold spaces
    ]


def test_format_is_chosen_by_extension(tmp_path: Path) -> None:
    # The same CoNLL-U lines in a .txt file are read as columns: the last column (MISC) is the tag.
    rows = read_conll(write(tmp_path, "ud.txt", "1\tI\tI\tPRON\tPRP\t_\t0\troot\t_\t_\n"))
    assert rows == [{"tokens": ["1"], "tags": ["_"]}]
    upper = read_conll(write(tmp_path, "UD.CONLLU", "1\tI\tI\tPRON\tPRP\t_\t0\troot\t_\t_\n"))
    assert upper == [{"tokens": ["I"], "tags": ["PRON"]}]


def test_utf8_bom_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffZürich B-LOC\n".encode("utf-8"))
    assert read_conll(path) == [{"tokens": ["Zürich"], "tags": ["B-LOC"]}]


@pytest.mark.parametrize(
    ("name", "text", "line", "expected"),
    [
        ("one_column.txt", "EU B-ORG\nrejects\n", 2, "expected at least 2 whitespace-separated columns"),
        ("ragged.txt", "EU NNP B-ORG\nrejects O\n", 2, "expected 3 columns like line 1, got 2"),
        ("short.conllu", "# c\n1\tI\tI\tPRON\n", 2, "expected 10 tab-separated CoNLL-U columns"),
        ("spaces.conllu", "1 I I PRON PRP _ 0 root _ _\n", 1, "expected 10 tab-separated CoNLL-U columns"),
        ("id.conllu", "x\tI\tI\tPRON\tPRP\t_\t0\troot\t_\t_\n", 1, "expected an integer word ID"),
        (
            "order.conllu",
            "1\tI\tI\tPRON\tPRP\t_\t2\tnsubj\t_\t_\n1\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\t_\n",
            2,
            "expected word ID 2",
        ),
        ("upos.conllu", "1\tI\tI\t_\tPRP\t_\t0\troot\t_\t_\n", 1, "expected a word form and a UPOS tag"),
    ],
)
def test_bad_lines_name_file_line_and_expectation(
    tmp_path: Path, name: str, text: str, line: int, expected: str
) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(DataError, match=re.escape(f"{path}:{line}: {expected}")):
        read_conll(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"ok O\n\nZ\xfcrich B-LOC\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: not UTF-8 text")):
        read_conll(path)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_conll(tmp_path / "absent.txt")
    with pytest.raises(DataError, match="no sentences found"):
        read_conll(write(tmp_path, "empty.txt", "-DOCSTART- -X- -X- O\n\n\n"))
    with pytest.raises(DataError, match="no sentences found"):
        read_conll(write(tmp_path, "comments.conllu", "# only a comment\n"))


def test_iob1_to_iob2() -> None:
    # CoNLL-2003's original IOB1: entities start with I-; B- only splits two adjacent same-type entities.
    iob1 = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-ORG", "O", "I-MISC"]
    assert iob1_to_iob2(iob1) == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-ORG", "O", "B-MISC"]
    iob2 = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC"]
    assert iob1_to_iob2(iob2) == iob2  # already IOB2: unchanged
    assert iob1_to_iob2([]) == []
