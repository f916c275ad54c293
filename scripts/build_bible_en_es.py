"""Build ``finetune/builtin/data/bible_en_es.jsonl.gz``: aligned English -> Spanish Bible verses.

Sources, both in the public domain (so the derived file may be committed and shipped):

* World English Bible (WEB), SWORD module ``engWEB2015eb``, Debian package ``sword-text-web``.
* Reina-Valera 1909 (RV1909), SWORD module ``spaRV1909eb``, Debian package ``sword-text-sparv``.

This is a build-time tool; nothing here is a runtime dependency of ``finetune``::

    apt-get install -y sword-text-web sword-text-sparv
    pip install pysword
    python scripts/build_bible_en_es.py      # --sword-path DIR if the modules are not in /usr/share/sword

What it does:

1. Reads every verse slot of the 66 books both texts share, in KJV versification (the Spanish
   module's; the English module's NRSVA only adds two slots that the WEB leaves empty).
2. Cleans the OSIS markup: drops footnotes and cross references, Strong's numbers and morphology,
   Song of Songs speaker labels, section headings, the WEB glossary, pilcrows and excess
   whitespace; keeps canonical psalm superscriptions (RV1909 prints them inline in verse 1);
   undoes RV1909's capitalised first word of each chapter and drops the scribal subscriptions
   ("Fué escrita de Corinto ...") that RV1909 appends to Paul's letters and the WEB does not print.
3. Joins on book.chapter.verse, except where the Spanish module keeps its own verse division
   (Num 13, Num 30, 1 Sam 24, 1 Kgs 22, 1 Chr 21, 2 Chr 33, Job 38-40, Hos 12, Jonah 2,
   2 Cor 13, ...: whole runs shifted by one to five slots, with the overflow merged into a chapter's
   last slot). A monotone alignment over a small lexical model learnt from the data itself finds
   those runs (see ``align``), and pairs whose lengths disagree too much are dropped (merged slots,
   split verses, textual variants such as 1 John 5:7); see ``length_filter``.
4. Writes one JSON object per line, {"id": "Gen.1.1", "en": ..., "es": ...}, ``id`` being the
   English (KJV) reference, in canonical order, gzip with mtime=0: rebuilding gives identical bytes.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import hashlib
import html
import io
import json
import math
import os
import re
import statistics
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "finetune" / "builtin" / "data" / "bible_en_es.jsonl.gz"
EN_MODULE = "engWEB2015eb"
ES_MODULE = "spaRV1909eb"
SWORD_PATHS = ("/usr/share/sword", "/usr/local/share/sword", os.path.expanduser("~/.sword"))

# ---------------------------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------------------------

# Elements dropped with their content: footnotes and cross references (their <reference>,
# <catchWord> and <rdg> children go with them), Song of Songs speaker labels (WEB only), and
# non-canonical headings. Canonical psalm superscriptions stay: RV1909 has them inline in v1.
_DROP_ELEMENTS = re.compile(
    r"<note\b[^>]*>.*?</note>|<speaker\b[^>]*>.*?</speaker>"
    r"|<title\b(?![^>]*canonical=\"true\")[^>]*>.*?</title>",
    re.DOTALL,
)
# WEB appends its glossary to Rev 22:21; nothing after such a division is verse text.
_TRAILING_MATTER = re.compile(r"<div\b[^>]*type=\"(?:glossary|introduction)\".*", re.DOTALL)
_TAG = r"<[^>]*>"
# Inline markup sits inside running text ("“<w>Send</w>" is "“Send"); any other tag (line, line
# group, paragraph, list item, milestone, chapter end) stands between words.
_INLINE_TAG = re.compile(r"</?(?:w|q|transChange|seg|name|hi|foreign|divineName|x)\b[^>]*>")
# Letters glued together only by markup: "God</w><note>..</note><w>created" in the WEB, or in
# RV1909 "hay allí</w><transChange>también</transChange><w>bdelio" vs "sáca</w><transChange>lo".
_JUNCTION = re.compile(rf"(\w)((?:{_TAG})+)(?=\w)")
_MARK = "\x00"
_WORD_AT_MARK = re.compile(rf"(\w+){_MARK}(\w+)")
# A WEB verse that swallowed later verses (Rom 14:23 holds 14:24-26, the TR's 16:25-27) shows
# a second "preverse" milestone with more text after it: keep the verse's own text only.
_PREVERSE = re.compile(r"<div\b[^>]*subType=\"x-preverse\"[^>]*sID=[^>]*/>")
_PAULINE = frozenset(
    {"Rom", "1Cor", "2Cor", "Gal", "Eph", "Phil", "Col", "1Thess", "2Thess", "1Tim", "2Tim", "Titus", "Phlm", "Heb"}
)
_SUBSCRIPTION = re.compile(r"(Amén\.)\s+[^.]*\b(?:[Ee]scrita|[Ee]nviada)\b.*$")


def _drop_elements(raw: str) -> str:
    """Remove non-verse elements, leaving an empty tag so that a word boundary is still seen."""
    raw = _TRAILING_MATTER.sub("", raw)
    return _DROP_ELEMENTS.sub("<x/>", raw)


def _own_text_only(raw: str) -> str:
    """Cut a WEB verse at a preverse milestone that has verse text on both sides."""
    for m in _PREVERSE.finditer(raw):
        # Chapter-final verses also carry the next paragraph's milestone, with only tags after.
        if re.sub(_TAG, "", raw[: m.start()]).strip() and re.sub(_TAG, "", raw[m.end() :]).strip():
            return raw[: m.start()]
    return raw


def _finish(text: str) -> str:
    """Drop leftover tags, entities, pilcrows and excess whitespace."""
    text = _INLINE_TAG.sub("", text)
    text = re.sub(_TAG, " ", text)
    text = html.unescape(text).replace("¶", " ")
    text = re.sub(r"\s+", " ", text).strip()
    # Block tags replaced by spaces can leave "word ," or "¿ word"; neither text spaces these.
    text = re.sub(r"\s+([,.;:!?)\]])", r"\1", text)
    return re.sub(r"([¿¡(\[])\s+", r"\1", text)


def clean_english(raw: str) -> str:
    """Plain text of one WEB verse."""
    text = _drop_elements(_own_text_only(raw))
    # English never splits a word across markup, so markup between letters is a word break.
    return _finish(_JUNCTION.sub(r"\1 ", text))


def _mark_spanish(raw: str) -> str:
    """Spanish verse with letter-markup-letter junctions marked for ``clean_spanish`` to decide."""
    return _JUNCTION.sub(r"\1" + _MARK, _drop_elements(raw))


def spanish_vocabulary(marked: Sequence[str]) -> collections.Counter[str]:
    """Lower-cased word counts of the Spanish text, ignoring words that touch a junction."""
    counts: collections.Counter[str] = collections.Counter()
    for text in marked:
        for token in re.findall(r"[\w\x00]+", re.sub(_TAG, " ", text)):
            if _MARK not in token:
                counts[token.lower()] += 1
    return counts


_CLITICS = frozenset({"me", "te", "se", "nos", "os", "lo", "la", "los", "las", "le", "les"})
_SHORT_IMPERATIVES = frozenset({"da", "di", "haz", "pon", "ten", "sal", "ven"})


def _joins_enclitic(left: str, right: str, vocab: collections.Counter[str], cased: collections.Counter[str]) -> bool:
    """Whether RV1909's "left</w><transChange>right" is one word (verb + enclitic pronoun).

    Only a pronoun can be an enclitic; anything else glued by markup is a missing space
    ("allí" + "también"). A pronoun joins when the glued form occurs elsewhere ("díjole"); when
    the left part is no word on its own (the accent of "sáca" + "lo" only exists with the
    enclitic); after an infinitive, gerund or plural imperative, which always take enclitics
    ("matarlo", "oyéndolo", "guardadlo"); after an accented verb ending that is not a name
    ("vió" + "lo" = "viólo", but "Josué los"); or after a one-syllable imperative ("dalo").
    """
    low = left.lower()
    if right.lower() not in _CLITICS:
        return False
    if vocab[(left + right).lower()] or not vocab[low] or low in _SHORT_IMPERATIVES:
        return True
    if low.endswith(("r", "ndo", "ad", "ed", "id")):
        return True
    is_name = cased[left.capitalize()] > cased[low]
    return bool(re.search(r"[áéíóú]$|[áé]is$", low)) and not is_name


def clean_spanish(marked: str, vocab: collections.Counter[str], cased: collections.Counter[str]) -> str:
    """Plain text of one RV1909 verse, each letter-markup-letter junction one word or two.

    RV1909 marks supplied words with <transChange>; the markup often sits between two words
    with no space, sometimes rightly (an enclitic: "sáca" + "lo" = "sácalo"), mostly not
    ("hay allí" + "también" + "bdelio"). See ``_joins_enclitic``.
    """

    def decide(m: re.Match[str]) -> str:
        left, right = m.group(1), m.group(2)
        return left + right if _joins_enclitic(left, right, vocab, cased) else f"{left} {right}"

    text = _INLINE_TAG.sub("", marked)
    while _MARK in text:
        new = _WORD_AT_MARK.sub(decide, text, count=1)
        if new == text:  # the mark no longer sits between two words: call it a break
            new = text.replace(_MARK, " ", 1)
        text = new
    return _finish(text)


def fix_drop_cap(text: str, cased: collections.Counter[str]) -> str:
    """Undo RV1909's printed drop cap: the first word of each chapter is in capitals.

    "EN el principio" -> "En el principio". A capitalised word of one or two letters carries the
    next one with it ("Y YO me paré", "LA SEGUNDA suerte", "A TI que habitas"): that one becomes
    lower case when it is a common word ("Y yo", "La segunda") and keeps a capital when it is a
    name ("Y Jehová"), judged by which form is more frequent in the whole text. Nothing after
    the drop cap is touched, so inscriptions ("SANTIDAD Á JEHOVÁ") stay; an acrostic heading
    ("ALEPH." before Psalm 119:1) is not the drop cap.
    """
    words = list(re.finditer(r"[^\W\d_]+", text))
    k = next((n for n, w in enumerate(words) if len(w.group(0)) > 1 and w.group(0).isupper()), None)
    if k is None:
        return text
    if text[words[k].end() : words[k].end() + 1] == "." and k + 1 < len(words) and words[k + 1].group(0).isupper():
        k += 1  # skip the heading
    fixes: dict[int, str] = {}
    first = words[k].group(0)
    if k > 0 and len(words[k - 1].group(0)) == 1 and words[k - 1].group(0).isupper():
        fixes[k] = _case_as_in_text(first, cased)  # "Y YO" -> "Y yo"
    else:
        fixes[k] = first.capitalize()
        nxt = words[k + 1].group(0) if k + 1 < len(words) else ""
        if len(first) <= 2 and len(nxt) > 1 and nxt.isupper():
            fixes[k + 1] = _case_as_in_text(nxt, cased)  # "LA SEGUNDA" -> "La segunda"
    for n in sorted(fixes, reverse=True):
        text = text[: words[n].start()] + fixes[n] + text[words[n].end() :]
    return text


def _case_as_in_text(word: str, cased: collections.Counter[str]) -> str:
    """Lower case for a common word, a leading capital for a name."""
    return word.lower() if cased[word.lower()] > cased[word.capitalize()] else word.capitalize()


def clean_all(en_raw: dict[str, str], es_raw: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """Clean every slot; return (refs, English texts, Spanish texts), aligned by slot."""
    refs = list(es_raw)  # canonical KJV order
    english = [clean_english(en_raw.get(ref, "")) for ref in refs]
    marked = [_mark_spanish(es_raw[ref]) for ref in refs]
    vocab = spanish_vocabulary(marked)
    # Case-sensitive counts tell names ("Jehová") from common words ("yo"); junction words are
    # too few to matter here.
    cased: collections.Counter[str] = collections.Counter(
        w for text in marked for w in re.findall(r"\w+", re.sub(_TAG, " ", text))
    )
    spanish = [clean_spanish(text, vocab, cased) for text in marked]
    for k, ref in enumerate(refs):
        if ref.endswith(".1") and spanish[k]:
            spanish[k] = fix_drop_cap(spanish[k], cased)
    last_verse = {ref.split(".")[0]: k for k, ref in enumerate(refs) if spanish[k]}  # last non-empty
    for book in _PAULINE:
        spanish[last_verse[book]] = _SUBSCRIPTION.sub(r"\1", spanish[last_verse[book]])
    return refs, english, spanish


# ---------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------

BAND = 8  # largest shift between the two numberings (Job 40 is 5)
DIAGONAL_BONUS = 0.05  # prior for the same reference
SHIFT_COST = 0.05  # per pair off the diagonal
SKIP_COST = 0.5  # per non-empty verse left out: a run must pay for itself, one verse cannot
MAX_Z = 4.0  # length-ratio outliers (robust z) dropped everywhere
NEAR_Z = 2.5  # ... and next to an outlier or a shift boundary, where split verses hide


def _tokens(text: str) -> frozenset[str]:
    """Lower-cased, accent-free word set."""
    text = unicodedata.normalize("NFKD", text.lower())
    return frozenset(re.findall(r"[a-z0-9]+", "".join(c for c in text if not unicodedata.combining(c))))


class LexicalModel:
    """Word translation candidates by Dice co-occurrence over same-reference verses.

    Over 99% of the same-reference pairs hold the same text, which is plenty to learn "king" ->
    "rey" or "Moses" -> "Moisés"; the model only has to tell a verse's counterpart from its
    neighbours, not translate.
    """

    def __init__(self, english: Sequence[frozenset[str]], spanish: Sequence[frozenset[str]]) -> None:
        fe = collections.Counter(w for s in english for w in s)
        fs = collections.Counter(w for s in spanish for w in s)
        co: collections.Counter[tuple[str, str]] = collections.Counter()
        for a, b in zip(english, spanish):
            # Very rare words say nothing and very common ones are everywhere.
            aa = [w for w in a if 2 <= fe[w] <= 3000]
            bb = [w for w in b if 2 <= fs[w] <= 3000]
            co.update((x, y) for x in aa for y in bb)
        e2s: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
        s2e: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
        for (x, y), c in co.items():
            dice = 2 * c / (fe[x] + fs[y])
            if dice >= 0.25:
                e2s[x].append((dice, y))
                s2e[y].append((dice, x))
        self.e2s = {x: frozenset(y for _, y in sorted(v, reverse=True)[:3]) for x, v in e2s.items()}
        self.s2e = {y: frozenset(x for _, x in sorted(v, reverse=True)[:3]) for y, v in s2e.items()}

    @staticmethod
    def _coverage(words: frozenset[str], other: frozenset[str], table: dict[str, frozenset[str]]) -> float | None:
        known = [w for w in words if w in table]
        if not known:
            return None
        return sum(1 for w in known if table[w] & other) / len(known)

    def score(self, en: frozenset[str], es: frozenset[str]) -> float:
        """Mean of both directions' share of words whose translation is present, in [0, 1]."""
        parts = [p for p in (self._coverage(en, es, self.e2s), self._coverage(es, en, self.s2e)) if p is not None]
        return sum(parts) / len(parts) if parts else 0.0


def align(english: Sequence[str], spanish: Sequence[str]) -> list[tuple[int, int]]:
    """Monotone alignment of English slot i to Spanish slot j, |i - j| <= BAND.

    Maximises the summed lexical score of matched pairs (plus a small bonus on the diagonal),
    where leaving a non-empty verse out costs SKIP_COST: moving to another offset costs at least
    two skips, so only a run of clearly better pairs does it. Empty slots pair with their own
    slot for free and are not returned.
    """
    te = [_tokens(t) for t in english]
    ts = [_tokens(t) for t in spanish]
    model = LexicalModel(te, ts)
    n, width, neg = len(english), 2 * BAND + 1, -1e18
    best = [[neg] * width for _ in range(n)]
    move = [[""] * width for _ in range(n)]

    def get(i: int, j: int) -> float:
        if i < 0 or j < 0:  # both texts start at Genesis 1:1
            return 0.0 if i == j == -1 else neg
        d = j - i
        return best[i][d + BAND] if -BAND <= d <= BAND else neg

    for i in range(n):
        for d in range(-BAND, BAND + 1):
            j = i + d
            if not 0 <= j < n:
                continue
            if english[i] and spanish[j]:
                w = model.score(te[i], ts[j]) + (DIAGONAL_BONUS if d == 0 else -SHIFT_COST)
            else:
                w = 0.0 if d == 0 else neg
            options = (
                (get(i - 1, j - 1) + w, "m"),
                (get(i - 1, j) - (SKIP_COST if english[i] else 0.0), "e"),
                (get(i, j - 1) - (SKIP_COST if spanish[j] else 0.0), "s"),
            )
            best[i][d + BAND], move[i][d + BAND] = max(options, key=lambda o: o[0])  # ties: first

    pairs: list[tuple[int, int]] = []
    i = j = n - 1
    while i >= 0 and j >= 0:
        step = move[i][j - i + BAND]
        if step == "m":
            if english[i] and spanish[j]:
                pairs.append((i, j))
            i, j = i - 1, j - 1
        elif step == "e":
            i -= 1
        else:
            j -= 1
    pairs.reverse()
    return pairs


def length_filter(pairs: Sequence[tuple[int, int]], english: Sequence[str], spanish: Sequence[str]) -> tuple[list[tuple[int, int]], int, int]:
    """Drop pairs whose Spanish/English length ratio is an outlier.

    Uses a robust z of log(len es / len en) (median, MAD). Merged slots, verses split at another
    place and textual variants (1 John 5:7) stand out clearly (|z| > MAX_Z); next to such a pair
    or to a change of offset the neighbours are often half-verses, so a lower bar applies there.
    Returns the kept pairs and the two drop counts.
    """
    ratios = [math.log(len(spanish[j]) / len(english[i])) for i, j in pairs]
    med = statistics.median(ratios)
    mad = statistics.median(abs(r - med) for r in ratios) * 1.4826
    z = {i: (r - med) / mad for (i, _), r in zip(pairs, ratios)}
    anomalies = {i for i, _ in pairs if abs(z[i]) > MAX_Z}
    for (i0, j0), (i1, j1) in zip(pairs, pairs[1:]):
        if j1 - i1 != j0 - i0:
            anomalies.update((i0, i1))
    far = sum(1 for i, _ in pairs if abs(z[i]) > MAX_Z)
    near = 0
    kept: list[tuple[int, int]] = []
    for i, j in pairs:
        if abs(z[i]) > MAX_Z:
            continue
        if abs(z[i]) > NEAR_Z and (i in anomalies or i - 1 in anomalies or i + 1 in anomalies):
            near += 1
            continue
        kept.append((i, j))
    return kept, far, near


# ---------------------------------------------------------------------------------------------
# Reading and writing
# ---------------------------------------------------------------------------------------------


def read_module(sword_path: str, key: str) -> dict[str, str]:
    """Raw OSIS text of every KJV-versified verse slot of SWORD module ``key``, canonical order."""
    try:
        from pysword.books import BibleStructure
        from pysword.modules import SwordModules
    except ImportError as exc:  # build-time only
        raise SystemExit("pysword is needed to build the data file: pip install pysword") from exc

    modules = SwordModules(sword_path)
    if key not in modules.parse_modules():
        raise SystemExit(f"SWORD module {key} not found under {sword_path}: apt-get install sword-text-web sword-text-sparv")
    bible = modules.get_bible_from_module(key)
    # pysword decompresses a whole book for every verse it reads; caching the last blocks cuts
    # the run from ~80 s to ~1 s without changing what is read.
    if hasattr(bible, "_decompressed_text"):
        bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)

    verses: dict[str, str] = {}
    for testament in ("ot", "nt"):
        for book in BibleStructure("kjv").get_books()[testament]:  # the 66 shared books
            for chapter, n_verses in enumerate(book.chapter_lengths, start=1):
                for verse in range(1, n_verses + 1):
                    verses[f"{book.osis_name}.{chapter}.{verse}"] = bible.get(
                        books=[book.osis_name], chapters=[chapter], verses=[verse], clean=False
                    )
    return verses


def build_pairs(en_raw: dict[str, str], es_raw: dict[str, str]) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Clean, align and filter; return the pairs in canonical order and counts for the report."""
    refs, english, spanish = clean_all(en_raw, es_raw)
    pairs = align(english, spanish)
    kept, far, near = length_filter(pairs, english, spanish)
    stats = {
        "verse slots": len(refs),
        "empty English slots": sum(1 for t in english if not t),
        "empty Spanish slots": sum(1 for t in spanish if not t),
        "aligned pairs": len(pairs),
        "aligned off the same reference": sum(1 for i, j in pairs if i != j),
        f"dropped, length |z| > {MAX_Z}": far,
        f"dropped, length |z| > {NEAR_Z} next to an anomaly": near,
    }
    rows = [{"id": refs[i], "en": english[i], "es": spanish[j]} for i, j in kept]
    assert len({r["id"] for r in rows}) == len(rows)
    return rows, stats


def write_jsonl_gz(rows: Sequence[dict[str, str]], out: Path) -> bytes:
    """One JSON object per line, gzip with mtime=0 and no file name: same input, same bytes."""
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(body)
    data = buf.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sword-path", default=None, help=f"SWORD library root (default: first of {', '.join(SWORD_PATHS)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    sword_path = args.sword_path or next((p for p in SWORD_PATHS if os.path.isdir(os.path.join(p, "mods.d"))), None)
    if sword_path is None:
        raise SystemExit("no SWORD library found: apt-get install sword-text-web sword-text-sparv")

    rows, stats = build_pairs(read_module(sword_path, EN_MODULE), read_module(sword_path, ES_MODULE))
    data = write_jsonl_gz(rows, args.out)
    for name, value in stats.items():
        print(f"{name}: {value}")
    print(f"pairs written: {len(rows)}")
    print(f"{args.out}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
