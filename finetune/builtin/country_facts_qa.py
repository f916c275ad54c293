"""Built-in extractive QA set ``country-facts-qa``, written from real country facts (SQuAD form).

Source: the JSON files that the PyPI package ``countrystatecity-countries`` (2.0.1) ships:
``data/countries.json`` (capital, currency, region, native name, dialling code, TLD, ISO codes,
time zones, names in other languages, coordinates) and ``data/by-country/<ISO2>/states.json`` plus
``states/<code>/cities.json`` (subdivisions and towns). They are read directly, not through the
package API. Licence: Open Database License (ODbL) v1.0, from the countries-states-cities-database
project (github.com/dr5hn/countries-states-cities-database). The generated set is a derived
database, so ODbL applies to it too: attribute the source and share adaptations under ODbL.

How it is built (no file is cached; a rebuild takes about a second):

* Countries without a capital are skipped (5 of 250); the rest are shuffled with
  ``random.Random(seed)`` and split 80/10/10 (197/24/24 countries) into train/validation/test,
  so no country (``title``) is in two splits. A country with too few usable facts would yield
  no rows.
* Each country gets a pool of facts. Each context states 4 to 7 of them in random order, each
  with one of several sentence templates, from a per-country ``random.Random``. Distractors make
  spans non-trivial: another country of the same split with its capital or dialling code,
  subdivision and town names, coordinates. Now and then a long "gazetteer" paragraph listing
  subdivisions and towns pushes a context past a 384-token window.
* Questions use one of several phrasings per fact. An answer's ``answer_start`` is where the
  template put it; a question is kept only when its answer occurs exactly once in the context as
  a whole word, and every span is checked (``context[start:start+len(text)] == text``).
* With ``unanswerable=True`` (SQuAD v2), each context also gets questions, about 1 in 4, on facts
  of the same country that the context leaves out; their answer value does not occur in the
  context (case-insensitive), and their answer lists are empty.

Non-ASCII text (native names, names in other languages, towns) is kept, NFC-normalised.
Size: 3 contexts per country, about 3,200 questions (about 4,300 with ``unanswerable=True``).
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import string
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from finetune.errors import DataError

PACKAGE = "countrystatecity_countries"
SPLITS = ("train", "validation", "test")
HELD_OUT_FRACTION = 0.1  # each of validation and test
CONTEXTS_PER_COUNTRY = 3
FACTS_PER_CONTEXT = (4, 7)
QUESTIONS_PER_CONTEXT = (3, 6)
MIN_FACTS = 7  # a country needs this many facts so that its contexts differ
CONTRAST_RATE = 0.4
GAZETTEER_RATE = 0.3  # among countries with enough subdivisions
GAZETTEER_DIVISIONS = (12, 120)  # fewer is not long; more would be a list too long to state in full
GAZETTEER_MAX_TOWNS = 60

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "title": datasets.Value("string"),
        "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": {
            "text": datasets.List(datasets.Value("string")),
            "answer_start": datasets.List(datasets.Value("int32")),
        },
    }
)

LANGUAGES: dict[str, str] = {
    "es": "Spanish",
    "fr": "French",
    "de": "German",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
    "pl": "Polish",
    "tr": "Turkish",
    "hr": "Croatian",
    "ru": "Russian",
    "ja": "Japanese",
    "zh-CN": "Chinese",
    "ko": "Korean",
}

# kind -> sentence templates. A template is usable when the fact has every field it names.
# Templates starting with "It" refer back to the country of the previous sentence, so they
# only follow a sentence of a kind in PRONOUN_AFTER (whose subject is that country).
SENTENCES: dict[str, tuple[str, ...]] = {
    "capital": (
        "The capital of {country} is {capital}.",
        "{capital} is the capital city of {country}.",
        "{country} is governed from {capital}, its capital.",
        "The seat of government of {country} is in {capital}.",
        "Its capital is {capital}.",
    ),
    "currency": (
        "The currency of {country} is the {currency_name} ({currency}).",
        "{country} pays with the {currency_name}, whose ISO code is {currency}.",
        "Prices in {country} are given in {currency_name} (code {currency}, symbol {currency_symbol}).",
        "The {currency_name}, written {currency_symbol}, is the money of {country}.",
        "It uses the {currency_name}, abbreviated {currency}.",
    ),
    "location": (
        "{country} lies in {subregion}, a part of {region}.",
        "Geographers place {country} in the {region} region, subregion {subregion}.",
        "{country} belongs to {subregion}.",
        "{country} is a country of {region}.",
        "It is located in the {subregion} subregion.",
    ),
    "native": (
        "In its own language, {country} is called {native}.",
        "Locally, {country} is known as {native}.",
        "The native name of {country} is {native}.",
        "Its people call it {native}.",
    ),
    "translation": (
        "In {language}, {country} is called {translation}.",
        "The {language} name for {country} is {translation}.",
        "{language} speakers refer to {country} as {translation}.",
    ),
    "phone": (
        "The international dialling code of {country} is {phone}.",
        "Callers reach {country} by dialling {phone}.",
        "Telephone numbers in {country} take the prefix {phone}.",
        "Its calling code is {phone}.",
    ),
    "tld": (
        "Websites from {country} use the {tld} domain.",
        "The internet country code of {country} is {tld}.",
        "{country}'s top-level domain is {tld}.",
        "Its web addresses end in {tld}.",
    ),
    "iso": (
        "{country} has the ISO 3166 codes {iso2} and {iso3}, and the number {numeric_code}.",
        "The two-letter code of {country} is {iso2}; its three-letter code is {iso3}.",
        "In ISO 3166, {country} is numbered {numeric_code} and abbreviated {iso3}.",
        "Its ISO alpha-2 code is {iso2}.",
    ),
    "timezone": (
        "{country} keeps {tz_name} ({utc_offset}).",
        "Clocks in {country} are set to {utc_offset}, a zone known as {tz_name}.",
        "The time in {country} is {tz_name}.",
        "{country} has {tz_count} zones in the IANA time zone database, from {tz_first} to {tz_last}.",
        "The IANA database lists {tz_count} time zones for {country}.",
        "It keeps {tz_name}, which is {utc_offset}.",
    ),
    "coordinates": (
        "The centre of {country} lies near latitude {latitude}, longitude {longitude}.",
        "{country} is centred at {latitude} and {longitude}.",
        "Maps put the middle of {country} at latitude {latitude}.",
    ),
    "divisions": (
        "{country} has {n_divisions} administrative divisions, among them {division_examples}.",
        "The {n_divisions} first-level divisions of {country} include {division_examples}.",
        "{division_examples} are among the {n_divisions} divisions of {country}.",
    ),
    "town": (
        "{town} is a town in the {state_type} of {town_state}, {country}.",
        "{town} is found in the {state_type} of {town_state} in {country}.",
        "In {country}, {town} belongs to {town_state}.",
    ),
    "gazetteer": (
        "{country} has {n_divisions} administrative divisions: {division_list}. "
        "Towns in {list_state} include {town_list}.",
        "The {n_divisions} first-level divisions of {country} are {division_list}. "
        "Among the towns of {list_state} are {town_list}.",
    ),
    # Distractors about another country: no question is asked about them.
    "contrast_capital": (
        "Unlike {country}, {other} has its capital in {other_capital}.",
        "{other}, on the other hand, is governed from {other_capital}.",
        "For comparison, the capital of {other} is {other_capital}.",
    ),
    "contrast_phone": (
        "{other}, by contrast, uses the dialling code {other_phone}.",
        "Calls to {other} instead start with {other_phone}.",
    ),
}

# answer field -> question templates (they may name other fields of the same fact).
QUESTIONS: dict[str, tuple[str, ...]] = {
    "capital": (
        "What is the capital of {country}?",
        "Which city serves as {country}'s capital?",
        "{country}'s capital is which city?",
        "From which city is {country} governed?",
        "Name the capital city of {country}.",
    ),
    "currency_name": (
        "What currency is used in {country}?",
        "What is the official currency of {country}?",
        "Which money do people pay with in {country}?",
        "{country} uses which currency?",
    ),
    "currency": (
        "What is the ISO code of {country}'s currency?",
        "Which three-letter code denotes the currency of {country}?",
    ),
    "currency_symbol": (
        "What symbol is used for the currency of {country}?",
        "How is {country}'s currency written as a symbol?",
    ),
    "region": (
        "In which region of the world is {country}?",
        "Which continent does {country} belong to?",
        "{country} is part of which world region?",
    ),
    "subregion": (
        "In which subregion does {country} lie?",
        "Which subregion is {country} part of?",
        "What part of its continent is {country} in?",
    ),
    "native": (
        "What is the native name of {country}?",
        "What do locals call {country}?",
        "How is {country} called in its own language?",
    ),
    "translation": (
        "What is {country} called in {language}?",
        "What is the {language} name of {country}?",
        "How do {language} speakers name {country}?",
    ),
    "phone": (
        "What is the international calling code of {country}?",
        "Which telephone prefix is used to call {country}?",
        "What do you dial before a phone number in {country}?",
    ),
    "tld": (
        "What is the top-level domain of {country}?",
        "Which internet domain ending belongs to {country}?",
        "What do web addresses from {country} end with?",
    ),
    "iso2": ("What is the two-letter ISO code of {country}?", "Which alpha-2 code stands for {country}?"),
    "iso3": ("What is the three-letter ISO code of {country}?", "Which alpha-3 code abbreviates {country}?"),
    "numeric_code": (
        "What is the numeric ISO 3166 code of {country}?",
        "Which number does ISO 3166 give {country}?",
    ),
    "tz_name": ("What time zone does {country} use?", "Which time zone are clocks in {country} set to?"),
    "utc_offset": ("What is the UTC offset of {country}?", "How far from UTC is the time in {country}?"),
    "tz_count": (
        "How many IANA time zones does {country} have?",
        "How many time zones does the IANA database list for {country}?",
    ),
    "latitude": ("At what latitude is {country} centred?", "What latitude is the centre of {country} at?"),
    "longitude": ("At what longitude is {country} centred?", "What longitude is the centre of {country} at?"),
    "n_divisions": (
        "How many administrative divisions does {country} have?",
        "Into how many first-level divisions is {country} divided?",
    ),
    "town_state": (
        "In which {state_type} of {country} is {town}?",
        "{town} lies in which {state_type} of {country}?",
        "Which {state_type} of {country} contains the town of {town}?",
    ),
}

# Kinds whose sentences have the country itself as subject (not a division, a town or another country).
PRONOUN_AFTER = frozenset(SENTENCES) - {
    "divisions",
    "town",
    "gazetteer",
    "contrast_capital",
    "contrast_phone",
}

_FORMATTER = string.Formatter()
# Bidirectional marks and BOMs are invisible and stick to a word (the data has "مصر\u200e"), so an
# answer would carry them; zero-width (non-)joiners stay, they are part of Persian and Hindi spelling.
_INVISIBLE = dict.fromkeys([0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0xFEFF])


@dataclass(frozen=True)
class Fact:
    """One statement about a country: its kind (a key of SENTENCES) and the fields its templates fill."""

    kind: str
    values: Mapping[str, str]

    def templates(self, allow_pronoun: bool) -> list[str]:
        """Sentence templates whose fields this fact has."""
        return [
            t
            for t in SENTENCES[self.kind]
            if _fields(t) - {"country"} <= self.values.keys() and (allow_pronoun or not t.startswith("It"))
        ]

    def answer_fields(self) -> list[str]:
        """Fields of this fact that a question can ask for."""
        return [f for f in self.values if f in QUESTIONS]


def load(seed: int = 0, unanswerable: bool = False) -> datasets.DatasetDict:
    """Build train/validation/test splits of country-fact QA in SQuAD form, deterministic for ``seed``."""
    data_dir = _data_dir()
    countries = _read_countries(data_dir)
    random.Random(seed).shuffle(countries)
    n_held = round(len(countries) * HELD_OUT_FRACTION)
    groups = {
        "train": countries[2 * n_held :],
        "validation": countries[:n_held],
        "test": countries[n_held : 2 * n_held],
    }
    splits: dict[str, datasets.Dataset] = {}
    for split in SPLITS:
        rows: list[dict[str, Any]] = []
        for country in groups[split]:
            # One generator per country: its examples do not depend on the other countries' draws.
            rng = random.Random(f"{seed}:{country['iso2']}")
            rows.extend(_country_examples(country, groups[split], data_dir, rng, unanswerable))
        splits[split] = datasets.Dataset.from_list(rows, features=FEATURES)
    return datasets.DatasetDict(splits)


def _data_dir() -> Path:
    """The package's data folder, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "country-facts-qa needs the package countrystatecity-countries: "
            "pip install countrystatecity-countries==2.0.1"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _clean(value: Any) -> str:
    """NFC-normalise, drop invisible marks and collapse whitespace; None becomes ''."""
    return " ".join(unicodedata.normalize("NFC", str(value or "")).translate(_INVISIBLE).split())


def _read_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _read_countries(data_dir: Path) -> list[dict[str, Any]]:
    """Countries with a capital, sorted by ISO code so that the seeded shuffle alone decides order."""
    countries = []
    for raw in _read_json(data_dir / "countries.json"):
        country = {k: _clean(v) for k, v in raw.items() if isinstance(v, str | int | float) or v is None}
        country["timezones"] = raw.get("timezones") or []
        country["translations"] = {k: _clean(v) for k, v in (raw.get("translations") or {}).items()}
        if country["name"] and country["iso2"] and country["capital"]:
            countries.append(country)
    return sorted(countries, key=lambda c: c["iso2"])


def _read_states(data_dir: Path, iso2: str) -> list[dict[str, str]]:
    path = data_dir / "by-country" / iso2 / "states.json"
    if not path.exists():
        return []
    return [
        {"name": _clean(s.get("name")), "code": _clean(s.get("state_code")), "type": _clean(s.get("type"))}
        for s in _read_json(path)
        if _clean(s.get("name"))
    ]


def _read_towns(data_dir: Path, iso2: str, state: Mapping[str, str]) -> list[str]:
    # A state folder can be missing (no towns, or a renamed reserved name): it just yields no towns.
    path = data_dir / "by-country" / iso2 / "states" / state["code"] / "cities.json"
    if not state["code"] or not path.exists():
        return []
    return list(dict.fromkeys(n for n in (_clean(c.get("name")) for c in _read_json(path)) if n))


def _join(names: list[str]) -> str:
    """'A, B and C'."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _utc_name(offset_name: str) -> str:
    # The data writes "UTC+04:30" and occasionally just "UTC" for zero.
    return offset_name if offset_name.startswith("UTC") else f"UTC{offset_name}"


def _fact(kind: str, **values: str) -> Fact | None:
    """A fact with its empty values dropped, or None when no template of ``kind`` can be filled."""
    fact = Fact(kind, {k: v for k, v in values.items() if v})
    return fact if fact.templates(allow_pronoun=False) else None


def _country_facts(
    country: Mapping[str, Any],
    states: list[dict[str, str]],
    town: tuple[str, dict[str, str]] | None,
    rng: random.Random,
) -> list[Fact]:
    """The pool of facts that this country's contexts draw from."""
    name = country["name"]
    symbol = country["currency_symbol"]
    if symbol in (country["currency"], country["currency_name"]):
        symbol = ""  # a symbol equal to the code or name would make that answer ambiguous
    native = country["native"] if country["native"].casefold() != name.casefold() else ""
    candidates: list[Fact | None] = [
        _fact("capital", capital=country["capital"]),
        _fact(
            "currency",
            currency_name=country["currency_name"],
            currency=country["currency"],
            currency_symbol=symbol,
        ),
        _fact("location", region=country["region"], subregion=country["subregion"]),
        _fact("native", native=native),
        _fact("phone", phone="+" + country["phone_code"].lstrip("+") if country["phone_code"] else ""),
        _fact("tld", tld=country["tld"] if country["tld"].startswith(".") else ""),
        _fact("iso", iso2=country["iso2"], iso3=country["iso3"], numeric_code=country["numeric_code"]),
        _timezone_fact(country["timezones"]),
        _coordinates_fact(country["latitude"], country["longitude"]),
    ]
    # Names in two other languages: a source of non-ASCII answers (España, Côte d'Ivoire, 日本).
    seen = {name.casefold(), native.casefold()}
    translations = []
    for code, language in LANGUAGES.items():
        value = country["translations"].get(code, "")
        if value and value.casefold() not in seen:
            seen.add(value.casefold())
            translations.append(_fact("translation", language=language, translation=value))
    candidates += rng.sample(translations, min(2, len(translations)))
    if town is not None:
        town_name, state = town
        candidates.append(
            _fact("town", town=town_name, town_state=state["name"], state_type=state["type"] or "region")
        )
    others = [s["name"] for s in states if town is None or s["name"] != town[1]["name"]]
    if len(others) >= 3:
        examples = rng.sample(others, 3)
        candidates.append(_fact("divisions", n_divisions=str(len(states)), division_examples=_join(examples)))
    return [f for f in candidates if f is not None]


def _timezone_fact(timezones: list[dict[str, Any]]) -> Fact | None:
    zones = sorted(
        (int(z.get("gmtOffset") or 0), _utc_name(_clean(z.get("gmtOffsetName"))), _clean(z.get("tzName")))
        for z in timezones
    )
    if not zones:
        return None
    if len(zones) == 1:
        return _fact("timezone", tz_name=zones[0][2], utc_offset=zones[0][1])
    first, last = zones[0][1], zones[-1][1]
    return _fact(
        "timezone",
        tz_count=str(len(zones)),
        tz_first=first if first != last else "",
        tz_last=last if first != last else "",
    )


def _coordinates_fact(latitude: str, longitude: str) -> Fact | None:
    try:
        lat, lon = float(latitude), float(longitude)
    except ValueError:
        return None
    return _fact(
        "coordinates",
        latitude=f"{abs(lat):.2f}° {'N' if lat >= 0 else 'S'}",
        longitude=f"{abs(lon):.2f}° {'E' if lon >= 0 else 'W'}",
    )


def _pick_town(
    country: Mapping[str, Any], states: list[dict[str, str]], data_dir: Path, rng: random.Random
) -> tuple[tuple[str, dict[str, str]] | None, list[str]]:
    """A (town, state) for a town fact, and the towns of that state for a gazetteer; reads few files."""
    taken = {country["name"].casefold(), country["capital"].casefold()}
    for state in rng.sample(states, min(3, len(states))):
        towns = _read_towns(data_dir, country["iso2"], state)
        # A town named like its state, country or capital would make the answer ambiguous.
        usable = [
            t
            for t in towns
            if t.casefold() not in taken and state["name"] not in t and t not in state["name"]
        ]
        if usable:
            return (rng.choice(usable), state), towns
    return None, []


def _contrast_fact(
    country: Mapping[str, Any], peers: list[dict[str, Any]], rng: random.Random
) -> Fact | None:
    """A sentence about another country of the same split: a distractor of the same type as a real fact."""
    kind, field, key = rng.choice(
        [("contrast_capital", "other_capital", "capital"), ("contrast_phone", "other_phone", "phone_code")]
    )
    own = country[key]
    pool = [p for p in peers if p["name"] != country["name"] and p[key] and p[key] != own]
    if not pool:
        return None
    near = [p for p in pool if p["subregion"] == country["subregion"]]
    other = rng.choice(near or pool)
    value = other[key] if key == "capital" else "+" + other[key].lstrip("+")
    return Fact(kind, {"other": other["name"], field: value})


def _country_examples(
    country: dict[str, Any],
    peers: list[dict[str, Any]],
    data_dir: Path,
    rng: random.Random,
    unanswerable: bool,
) -> list[dict[str, Any]]:
    """All QA rows of one country: a few contexts, each with its questions."""
    states = _read_states(data_dir, country["iso2"])
    town, towns = _pick_town(country, states, data_dir, rng)
    pool = _country_facts(country, states, town, rng)
    if len(pool) < MIN_FACTS:
        return []
    gazetteer = None
    low, high = GAZETTEER_DIVISIONS
    if town is not None and len(towns) >= 5 and low <= len(states) <= high:
        gazetteer = Fact(
            "gazetteer",
            {
                "n_divisions": str(len(states)),
                "division_list": _join([s["name"] for s in states]),
                "list_state": town[1]["name"],
                "town_list": _join(towns[:GAZETTEER_MAX_TOWNS]),
            },
        )
    rows: list[dict[str, Any]] = []
    for ci in range(CONTEXTS_PER_COUNTRY):
        chosen = rng.sample(pool, min(len(pool), rng.randint(*FACTS_PER_CONTEXT)))
        contrast = _contrast_fact(country, peers, rng) if rng.random() < CONTRAST_RATE else None
        order = list(chosen) + ([contrast] if contrast else [])
        rng.shuffle(order)
        if gazetteer is not None and rng.random() < GAZETTEER_RATE:
            # The long paragraph goes in the middle so that some answers land in a later window.
            order = [f for f in order if f.kind != "divisions"]
            order.insert(rng.randint(1, len(order) - 1), gazetteer)
        context, spans = _compose(country["name"], order, rng)
        questions = _answerable(context, spans)
        rng.shuffle(questions)
        questions = questions[: rng.randint(*QUESTIONS_PER_CONTEXT)]
        if unanswerable:
            absent = [f for f in pool if f not in chosen]
            questions += _unanswerable(context, absent, contrast, len(questions), rng)
        for qi, (fact, field, start) in enumerate(questions):
            answers: dict[str, list[Any]] = {"text": [], "answer_start": []}
            if start is not None:
                answers = {"text": [fact.values[field]], "answer_start": [start]}
            rows.append(
                {
                    "id": f"{country['iso2']}-{ci}-{qi}",
                    "title": country["name"],
                    "context": context,
                    "question": rng.choice(QUESTIONS[field]).format(country=country["name"], **fact.values),
                    "answers": answers,
                }
            )
    return rows


def _compose(name: str, order: list[Fact], rng: random.Random) -> tuple[str, list[tuple[Fact, str, int]]]:
    """Render the facts into one paragraph; return it and the verified (fact, field, start) of each answer."""
    sentences: list[str] = []
    spans: list[tuple[Fact, str, int]] = []
    offset = 0
    for i, fact in enumerate(order):
        allow_pronoun = i > 0 and order[i - 1].kind in PRONOUN_AFTER
        template = rng.choice(fact.templates(allow_pronoun))
        sentence, starts = _render(template, {"country": name, **fact.values})
        spans += [(fact, f, offset + starts[f]) for f in fact.answer_fields() if f in starts]
        sentences.append(sentence)
        offset += len(sentence) + 1  # the joining space
    context = " ".join(sentences)
    for fact, field, start in spans:
        text = fact.values[field]
        if context[start : start + len(text)] != text:  # not an assert: it must survive python -O
            raise AssertionError(f"answer {text!r} is not at {start} in {context!r}")
    return context, spans


def _answerable(context: str, spans: list[tuple[Fact, str, int]]) -> list[tuple[Fact, str, int | None]]:
    """Spans whose text occurs once in the context as a whole word: one unambiguous start each."""
    return [(fact, f, start) for fact, f, start in spans if _occurrences(fact.values[f], context) == [start]]


def _unanswerable(
    context: str, absent: list[Fact], contrast: Fact | None, n_answerable: int, rng: random.Random
) -> list[tuple[Fact, str, int | None]]:
    """About one question in four: facts left out of the context whose value the context lacks."""
    folded = context.casefold()
    candidates: list[tuple[Fact, str, int | None]] = [
        (fact, field, None)
        for fact in absent
        for field in fact.answer_fields()
        if fact.values[field].casefold() not in folded
    ]
    rng.shuffle(candidates)
    if contrast is not None:
        # Asking for this country's capital next to another country's capital is the hard negative.
        mirrored = contrast.kind.removeprefix("contrast_")
        candidates.sort(key=lambda c: c[1] != mirrored)
    return candidates[: int(n_answerable / 3 + rng.random())]


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in _FORMATTER.parse(template) if name is not None}


def _render(template: str, values: Mapping[str, str]) -> tuple[str, dict[str, int]]:
    """Fill ``template``; return the text and where each field's value starts in it."""
    parts: list[str] = []
    starts: dict[str, int] = {}
    length = 0
    for literal, name, _, _ in _FORMATTER.parse(template):
        parts.append(literal)
        length += len(literal)
        if name is not None:
            starts.setdefault(name, length)
            parts.append(values[name])
            length += len(values[name])
    return "".join(parts), starts


def _occurrences(text: str, context: str) -> list[int]:
    """Starts of ``text`` in ``context`` that neither begin nor end inside a word."""
    left = r"(?<!\w)" if re.match(r"\w", text[0]) else ""
    right = r"(?!\w)" if re.match(r"\w", text[-1]) else ""
    return [m.start() for m in re.finditer(left + re.escape(text) + right, context)]
