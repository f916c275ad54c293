"""Translation: the text -> text machinery (``finetune.tasks.text_to_text``: encoder-decoder or
decoder-only, target-only loss, batched length-sorted generation) for language pairs.

* encoder-decoder (T5, Marian, BART, mBART/NLLB): T5 gets the prefix ``translate English to Spanish: ``;
  tokenizers that carry language codes (mBART, NLLB, M2M100) get ``src_lang``/``tgt_lang``, and the target
  code is forced as the first generated token when the targets start with it.
* decoder-only: the prompt is the user turn ``Translate English to Spanish:\\n<source>`` in the
  checkpoint's chat template (``data.use_chat_template``, ``data.system_prompt``), else ``...:\\n<source>\\n``.

Pairs come from a column of ``{source_lang: ..., target_lang: ...}`` (the Hub's usual shape) or from two
plain columns. Hypotheses are scored with sacreBLEU and chrF through ``evaluate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from finetune.config import check
from finetune.data import require_columns
from finetune.errors import ConfigError, DataError
from finetune.metrics import load_metric
from finetune.tasks.text_to_text import TextToTextData, TextToTextEval, TextToTextLearned, TextToTextTask

# ISO 639-1 code -> (English name for prompts and T5 prefixes, ISO 639-3 code as in NLLB's language tokens).
LANGUAGES: dict[str, tuple[str, str]] = {
    "ar": ("Arabic", "arb"), "ca": ("Catalan", "cat"), "cs": ("Czech", "ces"), "da": ("Danish", "dan"),
    "de": ("German", "deu"), "el": ("Greek", "ell"), "en": ("English", "eng"), "es": ("Spanish", "spa"),
    "fi": ("Finnish", "fin"), "fr": ("French", "fra"), "hi": ("Hindi", "hin"), "hu": ("Hungarian", "hun"),
    "it": ("Italian", "ita"), "ja": ("Japanese", "jpn"), "ko": ("Korean", "kor"), "nl": ("Dutch", "nld"),
    "pl": ("Polish", "pol"), "pt": ("Portuguese", "por"), "ro": ("Romanian", "ron"), "ru": ("Russian", "rus"),
    "sv": ("Swedish", "swe"), "tr": ("Turkish", "tur"), "uk": ("Ukrainian", "ukr"), "zh": ("Chinese", "zho"),
}
INSTRUCTION = "Translate {source_name} to {target_name}:\n{source}"


def language_name(code: str) -> str:
    """``es`` -> ``Spanish``; a code this table does not know is used as it is."""
    return LANGUAGES.get(code.lower(), (code, code))[0]


def translation_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus sacreBLEU and chrF (0-100) of detokenized hypotheses against one reference each."""
    refs = [[reference] for reference in references]
    return {
        "bleu": float(load_metric("sacrebleu").compute(predictions=hypotheses, references=refs)["score"]),
        "chrf": float(load_metric("chrf").compute(predictions=hypotheses, references=refs)["score"]),
    }


@dataclass
class TranslationData(TextToTextData):
    """``data`` keys of the translation task (with the text -> text ones: ``source_column``, ``target_column``,
    ``source_prefix``, ``use_chat_template``, ``system_prompt``)."""

    source_lang: str | None = None
    """Source language code (``en``); the key in ``translation_column`` and the prompt's language."""
    target_lang: str | None = None
    """Target language code (``es``)."""
    translation_column: str = "translation"
    """Column of ``{source_lang: ..., target_lang: ...}`` pairs (the Hub's usual shape)."""
    source_column: str | None = None
    """A plain column of source texts, instead of ``translation_column`` (with ``target_column``)."""
    target_column: str | None = None
    """A plain column of reference translations (with ``source_column``)."""
    source_lang_code: str | None = None
    """The tokenizer's source language token (mBART ``en_XX``, NLLB ``eng_Latn``); null: found."""
    target_lang_code: str | None = None
    """The tokenizer's target language token (forced as first generated token)."""

    def validate(self) -> None:
        super().validate()
        for key in ("source_lang", "target_lang"):
            check(bool(getattr(self, key)), f"data.{key}", "a language code (e.g. en, es) for task translation: the "
                  "key of the pairs in data.translation_column, and the language of the prompt", getattr(self, key))
        check(self.source_lang != self.target_lang, "data.target_lang", "another language than data.source_lang",
              self.target_lang)
        check((self.source_column is None) == (self.target_column is None), "data.target_column",
              "set together with data.source_column (two plain text columns), or neither (pairs in "
              "data.translation_column)", self.target_column)


@dataclass
class TranslationEval(TextToTextEval):
    """``eval`` keys of the translation task: ``max_new_tokens`` (default 64) and ``num_beams``."""


@dataclass(frozen=True)
class TranslationLearned(TextToTextLearned):
    """Encoder-decoder or decoder-only, and the model type."""


class TranslationTask(TextToTextTask):
    name = "translation"
    Data = TranslationData
    Eval = TranslationEval
    Learned = TranslationLearned
    metrics_higher_is_better = {"loss": False, "bleu": True, "chrf": True}
    headline_metrics = ["bleu", "chrf"]
    pipeline_tag = "translation"
    predict_example = '--text "Good morning, my friend."'
    output_key = "translation"
    preview_heading = "sample translations"
    data: TranslationData
    eval: TranslationEval

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        """Decoders get a pad token; mBART/NLLB/M2M100-style tokenizers the recipe's language codes."""
        super().prepare_tokenizer(tokenizer)
        if hasattr(tokenizer, "src_lang"):
            d = self.data
            tokenizer.src_lang = d.source_lang_code or _language_token(tokenizer, d.source_lang,
                                                                       "data.source_lang_code")
            tokenizer.tgt_lang = d.target_lang_code or _language_token(tokenizer, d.target_lang,
                                                                       "data.target_lang_code")
        return tokenizer

    # --- data ------------------------------------------------------------------------------------
    def pairs(self, dataset: datasets.Dataset, where: str) -> datasets.Dataset:
        d = self.data
        if d.source_column is not None:
            return self.column_pairs(dataset, where)
        require_columns(dataset, [d.translation_column], where)
        pairs = dataset[d.translation_column]
        languages = _languages(dataset.features[d.translation_column], pairs)
        if languages is None:
            raise DataError(f"{where}: column {d.translation_column!r} (data.translation_column) must hold "
                            f"{{language: text}} pairs such as {{{d.source_lang!r}: ..., {d.target_lang!r}: ...}}; "
                            f"got {dataset.features[d.translation_column]}; for two plain columns set "
                            f"data.source_column and data.target_column")
        for lang, key in ((d.source_lang, "data.source_lang"), (d.target_lang, "data.target_lang")):
            if lang not in languages:
                raise DataError(f"{where}: column {d.translation_column!r} has no language {lang!r} ({key}); "
                                f"its languages: {', '.join(languages)}")
        sources = [pair.get(d.source_lang) if pair else None for pair in pairs]
        targets = [pair.get(d.target_lang) if pair else None for pair in pairs]
        names = (f"{d.translation_column}.{d.source_lang}", f"{d.translation_column}.{d.target_lang}")
        return self.checked_pairs(dataset, sources, targets, names, where)

    def describe(self, splits: datasets.DatasetDict) -> list[str]:
        d = self.data
        lines = []
        for name, split in splits.items():
            words = np.mean([len(s.split()) for s in split["source"]]) if len(split) else 0.0
            lines.append(f"{name}: {len(split)} pairs {d.source_lang} -> {d.target_lang} "
                         f"(source {words:.1f} words on average)")
        return lines

    def t5_prefix(self) -> str:
        d = self.data
        return f"translate {language_name(d.source_lang)} to {language_name(d.target_lang)}: "

    def instruction(self, source: str) -> str:
        d = self.data
        return INSTRUCTION.format(source_name=language_name(d.source_lang), target_name=language_name(d.target_lang),
                                  source=source)

    def input_keys(self) -> list[str]:
        d = self.data
        return [k for k in ("text", d.source_column, d.source_lang) if k]

    # --- generation and metrics ------------------------------------------------------------------
    def _forced_bos_token_id(self, tokenizer: PreTrainedTokenizerBase) -> int | None:
        """The target language token when references start with it (mBART-50, NLLB, M2M100)."""
        if self.learned.kind != "seq2seq" or not hasattr(tokenizer, "tgt_lang") or not tokenizer.tgt_lang:
            return None
        code = tokenizer.convert_tokens_to_ids(tokenizer.tgt_lang)
        first = tokenizer(text_target="a")["input_ids"][:1]
        return code if first == [code] else None

    def scores(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        return translation_scores(hypotheses, references)

    def baseline(self, train: datasets.Dataset, test: datasets.Dataset,
                 validation: datasets.Dataset | None = None) -> dict[str, Any]:
        """Copy the source as its own translation (names and numbers often match)."""
        return {"name": "copy the source", **translation_scores(list(test["source"]), list(test["target"]))}

    @classmethod
    def worst_predictions(cls, rows: list[dict[str, Any]], count: int) -> tuple[str, list[dict[str, Any]]]:
        """Hypotheses furthest from their reference: lowest sentence chrF (sacreBLEU) first."""
        import sacrebleu

        scored = [{**row, "chrf": round(sacrebleu.sentence_chrf(str(row.get("hypothesis", "")),
                                                                [str(row.get("reference", ""))]).score, 2)}
                  for row in rows if "hypothesis" in row]
        worst = sorted(scored, key=lambda row: row["chrf"])[:count]
        return f"translations furthest from the reference, lowest sentence chrF first (of {len(rows)} pairs)", worst


def _languages(feature: Any, pairs: list[Any]) -> list[str] | None:
    """Language keys of a pairs column (a ``Translation`` feature, a struct, or JSON objects whose keys
    vary between rows: the union, in order of appearance); None when it does not hold pairs."""
    if isinstance(feature, datasets.Translation):
        return list(feature.languages)
    if isinstance(feature, dict):
        return list(feature)
    if not all(pair is None or isinstance(pair, dict) for pair in pairs):
        return None
    return list(dict.fromkeys(key for pair in pairs if pair for key in pair))


def _language_token(tokenizer: PreTrainedTokenizerBase, lang: str, key: str) -> str:
    """The tokenizer's special token for a language: ``en`` -> ``en_XX`` (mBART), ``eng_Latn`` (NLLB),
    ``__en__`` (M2M100), or ``en`` itself."""
    iso3 = LANGUAGES.get(lang.lower(), (lang, lang))[1]
    tokens = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    found = sorted(t for t in tokens if t in (lang, f"__{lang}__") or t.startswith((f"{lang}_", f"{iso3}_")))
    if len(found) != 1:
        listed = ", ".join(found[:8]) if found else "none"
        raise ConfigError(f"this tokenizer marks languages with special tokens; set config key '{key}' to the one "
                          f"for {lang!r} (candidates: {listed})")
    return found[0]
