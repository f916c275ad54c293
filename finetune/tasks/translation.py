"""Translation with encoder-decoder models (T5, Marian, BART, mBART/NLLB) or decoder-only LMs (prompted).

Which kind a run uses follows the checkpoint's ``config.is_encoder_decoder``:

* encoder-decoder: ``AutoModelForSeq2SeqLM``; the source (with T5's task prefix) is the encoder input
  and the reference the ``labels`` (padded with -100); the model shifts labels into decoder inputs
  itself, so each architecture's own decoder start token is used. Tokenizers that carry language
  codes (mBART, NLLB, M2M100) get ``src_lang``/``tgt_lang``, and the target code is forced as the
  first generated token when the targets start with it.
* decoder-only: ``AutoModelForCausalLM``, as prompt -> completion SFT with the shared decoder
  helpers (``finetune.tasks.decoding``): ``prompt + reference + eos`` with the loss on the reference and eos only (labels -100 on
  the prompt, never derived from the pad id), so the model learns to stop even when pad == eos. The
  prompt is the user turn ``Translate English to Spanish:\\n<source>`` in the checkpoint's chat
  template (``data.use_chat_template``, ``data.system_prompt``), else ``...:\\n<source>\\n``.

Evaluation generates for the held-out pairs in length-sorted batches (left-padded prompts for
decoders), greedy or beam search, at most ``eval.max_new_tokens`` new tokens, and scores the
detokenized hypotheses with sacreBLEU and chrF through ``evaluate``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedTokenizerBase

from finetune.config import Config, DataConfig, EvalConfig, check
from finetune.data import describe_split, require_columns
from finetune.errors import ConfigError, DataError, ModelError
from finetune.metrics import load_metric
from finetune.models import Checkpoint
from finetune.tasks.base import Learned, Task
from finetune.tasks.decoding import (IGNORE_INDEX, build_sft_features, collate_causal_lm, encode_prompt,
                                     ensure_pad_token, eos_token_ids, format_prompt, pad_rows, token_nll,
                                     uses_chat_template)

logger = logging.getLogger(__name__)

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
PLAIN_TEMPLATE = "{prompt}\n"  # without a chat template the translation follows the source's line
# model types trained with a task prefix on the source ("translate English to German: ...")
PREFIX_MODEL_TYPES = ("t5",)


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
class TranslationData(DataConfig):
    """``data`` keys of the translation task."""

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
    source_prefix: str | None = None
    """Encoder-decoder: text put before each source; null: T5's ``translate English to Spanish: ``."""
    source_lang_code: str | None = None
    """The tokenizer's source language token (mBART ``en_XX``, NLLB ``eng_Latn``); null: found."""
    target_lang_code: str | None = None
    """The tokenizer's target language token (forced as first generated token)."""
    use_chat_template: bool = True
    """Decoder-only: put the instruction in the tokenizer's chat template when it has one."""
    system_prompt: str | None = None
    """Decoder-only with a chat template: a system turn before each prompt; null keeps the template's own."""

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
class TranslationEval(EvalConfig):
    """``eval`` keys of the translation task."""

    max_new_tokens: int = 64
    """Cap on new tokens per translation."""
    num_beams: int = 1
    """1 = greedy decoding, more = beam search."""

    def validate(self) -> None:
        super().validate()
        check(self.max_new_tokens >= 1, "eval.max_new_tokens", ">= 1", self.max_new_tokens)
        check(self.num_beams >= 1, "eval.num_beams", ">= 1", self.num_beams)


@dataclass(frozen=True)
class TranslationLearned(Learned):
    kind: Literal["seq2seq", "decoder"]
    """Encoder-decoder or decoder-only, from the checkpoint's config."""
    model_type: str
    """The checkpoint's ``model_type`` (T5 gets a task prefix)."""


class TranslationTask(Task):
    name = "translation"
    Data = TranslationData
    Eval = TranslationEval
    Learned = TranslationLearned
    metrics_higher_is_better = {"loss": False, "bleu": True, "chrf": True}
    headline_metrics = ["bleu", "chrf"]
    pipeline_tag = "translation"
    predict_example = '--text "Good morning, my friend."'
    eval_pad_values = {"generated": IGNORE_INDEX}
    input_columns = ("source",)
    data: TranslationData
    eval: TranslationEval

    def __init__(self, config: Config):
        super().__init__(config)
        self.generate_now = True
        """Whether this evaluation pass generates (see begin_evaluation)."""
        self.generation_seconds = 0.0

    @property
    def auto_class(self) -> type:  # type: ignore[override]
        return AutoModelForSeq2SeqLM if self.learned.kind == "seq2seq" else AutoModelForCausalLM

    @property
    def peft_task_type(self) -> str:  # type: ignore[override]
        return "SEQ_2_SEQ_LM" if self.learned.kind == "seq2seq" else "CAUSAL_LM"

    # --- learn and bind --------------------------------------------------------------------------
    def learn(self, raw: datasets.DatasetDict, checkpoint: Checkpoint) -> TranslationLearned:
        """Encoder-decoder or decoder-only, from the checkpoint's config (cheap: no weights)."""
        try:
            model_config = AutoConfig.from_pretrained(checkpoint.path, gguf_file=checkpoint.gguf_file,
                                                      revision=checkpoint.revision,
                                                      trust_remote_code=self.config.model.trust_remote_code)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"could not read the config of {checkpoint.requested!r} (model.name_or_path): {first}") \
                from None
        kind = "seq2seq" if getattr(model_config, "is_encoder_decoder", False) else "decoder"
        return TranslationLearned(kind, model_config.model_type)

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        """Decoders get a pad token; mBART/NLLB/M2M100-style tokenizers the recipe's language codes."""
        if self.learned.kind == "decoder":
            ensure_pad_token(tokenizer)
        if hasattr(tokenizer, "src_lang"):
            d = self.data
            tokenizer.src_lang = d.source_lang_code or _language_token(tokenizer, d.source_lang,
                                                                       "data.source_lang_code")
            tokenizer.tgt_lang = d.target_lang_code or _language_token(tokenizer, d.target_lang,
                                                                       "data.target_lang_code")
        return tokenizer

    # --- data ------------------------------------------------------------------------------------
    def prepare(self, raw: datasets.DatasetDict) -> datasets.DatasetDict:
        """Every split -> columns ``id``, ``source``, ``target`` (non-empty strings), checked row by row."""
        return datasets.DatasetDict({split: self._pairs(dataset, describe_split(raw, split, self.data))
                                     for split, dataset in raw.items()})

    def _pairs(self, dataset: datasets.Dataset, where: str) -> datasets.Dataset:
        d = self.data
        if d.source_column is not None:
            require_columns(dataset, [d.source_column, d.target_column], where)
            sources, targets = dataset[d.source_column], dataset[d.target_column]
            names = (f"column {d.source_column!r}", f"column {d.target_column!r}")
        else:
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
        ids = [str(i) for i in dataset["id"]] if "id" in dataset.column_names else \
            [str(row + 1) for row in range(len(dataset))]
        for texts, name in zip((sources, targets), names):
            for row, text in enumerate(texts):
                if not isinstance(text, str) or not text.strip():
                    label = f"row {row + 1}" + (f" (id {ids[row]})" if "id" in dataset.column_names else "")
                    state = "missing" if text is None else "empty" if isinstance(text, str) else "non-text"
                    raise DataError(f"{where}: {label}: {state} text in {name} ({text!r}); every pair needs "
                                    f"both sides")
        return datasets.Dataset.from_dict({"id": ids, "source": [s.strip() for s in sources],
                                           "target": [t.strip() for t in targets]})

    def describe(self, splits: datasets.DatasetDict) -> list[str]:
        d = self.data
        lines = []
        for name, split in splits.items():
            words = np.mean([len(s.split()) for s in split["source"]]) if len(split) else 0.0
            lines.append(f"{name}: {len(split)} pairs {d.source_lang} -> {d.target_lang} "
                         f"(source {words:.1f} words on average)")
        return lines

    def features(self, examples: datasets.Dataset, split: str) -> datasets.Dataset:
        """Seq2seq: ``input_ids`` + ``labels``. Decoder: prompt + target + eos in ``input_ids``, labels -100
        on the prompt, and for held-out splits ``prompt_length`` (generation starts from the prompt).
        ``length`` is the whole example for training (batching) and the source or prompt for
        evaluation (what generation pads). One feature per example, in order."""
        tokenizer, held_out, max_length = self.tokenizer, split != "train", self.data.max_length
        if self.learned.kind == "seq2seq":
            def tokenize(batch: dict[str, list]) -> dict[str, list]:
                encoded = self._encode_sources(tokenizer, batch["source"])
                encoded["labels"] = tokenizer(text_target=batch["target"], truncation=True,
                                              max_length=max_length)["input_ids"]
                encoded["length"] = [len(s) if held_out else len(s) + len(t)
                                     for s, t in zip(encoded["input_ids"], encoded["labels"])]
                return dict(encoded)
        else:
            def tokenize(batch: dict[str, list]) -> dict[str, list]:
                out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
                if held_out:
                    out["prompt_length"] = []
                for source, target in zip(batch["source"], batch["target"]):
                    # Over-long pairs are truncated, never dropped: every example keeps its feature.
                    feature = build_sft_features(self._prompt_ids(tokenizer, source),
                                                 tokenizer(target, add_special_tokens=False)["input_ids"],
                                                 tokenizer.eos_token_id, max_length, "truncate")
                    out["input_ids"].append(feature["input_ids"])
                    out["labels"].append(feature["labels"])
                    out["length"].append(feature["prompt_length"] if held_out else len(feature["input_ids"]))
                    if held_out:
                        out["prompt_length"].append(feature["prompt_length"])
                return out
        return examples.map(tokenize, batched=True, remove_columns=examples.column_names,
                            desc=f"tokenizing {split}")

    def _encode_sources(self, tokenizer: PreTrainedTokenizerBase, sources: list[str], **kwargs: Any) -> Any:
        prefix = self._source_prefix()
        return tokenizer([prefix + s for s in sources], truncation=True, max_length=self.data.max_length,
                         **kwargs)

    def _source_prefix(self) -> str:
        d = self.data
        if d.source_prefix is not None:
            return d.source_prefix
        if self.learned.model_type in PREFIX_MODEL_TYPES:
            return f"translate {language_name(d.source_lang)} to {language_name(d.target_lang)}: "
        return ""

    def _prompt_ids(self, tokenizer: PreTrainedTokenizerBase, source: str) -> list[int]:
        """The decoder prompt for one source, in the chat template when there is one."""
        d = self.data
        chat = uses_chat_template(tokenizer, d.use_chat_template)
        instruction = INSTRUCTION.format(source_name=language_name(d.source_lang),
                                         target_name=language_name(d.target_lang), source=source)
        text = format_prompt(tokenizer, instruction, use_chat_template=chat, template=PLAIN_TEMPLATE,
                             system_prompt=d.system_prompt)
        return encode_prompt(tokenizer, text, chat)

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-padded inputs, labels padded with -100; decoder held-out batches carry ``prompt_length``."""
        multiple = self.config.train.pad_to_multiple_of
        if self.learned.kind == "decoder":
            batch = collate_causal_lm(features, self.tokenizer.pad_token_id, multiple)
            if "prompt_length" in features[0]:
                batch["prompt_length"] = torch.tensor([f["prompt_length"] for f in features])
            return batch
        inputs = [f["input_ids"] for f in features]
        return {
            "input_ids": pad_rows(inputs, self.tokenizer.pad_token_id, "right", multiple),
            "attention_mask": pad_rows([[1] * len(ids) for ids in inputs], 0, "right", multiple),
            "labels": pad_rows([f["labels"] for f in features], IGNORE_INDEX, "right", multiple),
        }

    # --- model -----------------------------------------------------------------------------------
    def _forced_bos_token_id(self, tokenizer: PreTrainedTokenizerBase) -> int | None:
        """The target language token when references start with it (mBART-50, NLLB, M2M100)."""
        if self.learned.kind != "seq2seq" or not hasattr(tokenizer, "tgt_lang") or not tokenizer.tgt_lang:
            return None
        code = tokenizer.convert_tokens_to_ids(tokenizer.tgt_lang)
        first = tokenizer(text_target="a")["input_ids"][:1]
        return code if first == [code] else None

    # --- evaluation ------------------------------------------------------------------------------
    def begin_evaluation(self, split: str) -> None:
        # Validation generates only when it picks the best checkpoint by BLEU or chrF; the loss needs
        # one forward pass, generation one per new token.
        self.generate_now = split != "validation" or self.config.train.metric_for_best != "loss"
        self.generation_seconds = 0.0

    def eval_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prompt_length = batch.pop("prompt_length", None)
        if self.learned.kind == "seq2seq":
            labels = batch["labels"]
            logits = model(**batch).logits.float()  # the model builds decoder inputs from the labels
            nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none").sum(1)
            tokens = (labels != IGNORE_INDEX).sum(1)
            prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
        else:
            nll, tokens = token_nll(model, batch)
            # Generation continues each prompt: left-pad them so new tokens start in one column.
            prompts = [ids[:n].tolist() for ids, n in zip(batch["input_ids"], prompt_length.tolist())]
            prompt_ids = pad_rows(prompts, self.tokenizer.pad_token_id, "left", None).to(nll.device)
            prompt_mask = pad_rows([[1] * len(p) for p in prompts], 0, "left", None).to(nll.device)
        outputs = {"loss": nll / tokens.clamp(min=1)}
        if self.generate_now:
            started = time.perf_counter()
            outputs["generated"] = self.generate(model, prompt_ids, prompt_mask)
            self.generation_seconds += time.perf_counter() - started
        return outputs

    def generate(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """New tokens per input (greedy or beam search), -100 after each sequence's first stop token.
        Decoder inputs must be left-padded."""
        tokenizer = self.tokenizer
        e = self.eval
        generator = getattr(model, "module", model)  # unwrap DDP; accelerate's autocast stays on forward
        kwargs: dict[str, Any] = {"max_new_tokens": e.max_new_tokens, "num_beams": e.num_beams, "do_sample": False}
        stops = [tokenizer.eos_token_id]
        if self.learned.kind == "decoder":
            stops = eos_token_ids(tokenizer, generator)  # e.g. an end-of-turn token besides eos
            kwargs.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
        elif (forced := self._forced_bos_token_id(tokenizer)) is not None:
            kwargs["forced_bos_token_id"] = forced
        out = generator.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        # Decoders return prompt + continuation; encoder-decoders start with the decoder start token.
        new = out[:, input_ids.shape[1]:] if self.learned.kind == "decoder" else out[:, 1:]
        stop = torch.isin(new, torch.tensor(stops, device=new.device))
        after_first_stop = (stop.cumsum(1) - stop.long()) > 0
        return new.masked_fill(after_first_stop, IGNORE_INDEX)

    def decode(self, generated: np.ndarray) -> list[str]:
        """Generated ids (-100 padded) -> detokenized texts."""
        return [self.tokenizer.decode(row[row != IGNORE_INDEX].tolist(), skip_special_tokens=True).strip()
                for row in generated]

    def compute_metrics(self, outputs: dict[str, np.ndarray], examples: datasets.Dataset,
                        features: datasets.Dataset) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        metrics: dict[str, Any] = {"loss": float(outputs["loss"].mean())}
        if "generated" not in outputs:
            return metrics, []
        hypotheses = self.decode(outputs["generated"])
        references = list(examples["target"])
        metrics.update(translation_scores(hypotheses, references))
        tokens = int((outputs["generated"] != IGNORE_INDEX).sum())
        seconds = max(self.generation_seconds, 1e-9)
        metrics["generated_tokens"] = tokens
        metrics["generation_tokens_per_second"] = round(tokens / seconds, 1)
        e = self.eval
        logger.info("generation: %d tokens for %d pairs in %.1f s = %.1f tokens/s (batch %d, %s, max %d new tokens)",
                    tokens, len(hypotheses), seconds, tokens / seconds, e.batch_size,
                    "greedy" if e.num_beams == 1 else f"beam search x{e.num_beams}", e.max_new_tokens)
        rows = [{"id": i, "source": s, "reference": r, "hypothesis": h}
                for i, s, r, h in zip(examples["id"], examples["source"], references, hypotheses)]
        return metrics, rows

    def baseline(self, train: datasets.Dataset, test: datasets.Dataset) -> dict[str, Any]:
        """Copy the source as its own translation (names and numbers often match)."""
        return {"name": "copy the source", **translation_scores(list(test["source"]), list(test["target"]))}

    def preview(self, predictions: list[dict[str, Any]], count: int = 3) -> list[str]:
        lines = ["\nsample translations (held-out test pairs):"] if predictions else []
        for row in predictions[:count]:
            lines += [f"  source:     {row['source']}", f"  reference:  {row['reference']}",
                      f"  hypothesis: {row['hypothesis']}", ""]
        return lines

    @classmethod
    def worst_predictions(cls, rows: list[dict[str, Any]], count: int) -> tuple[str, list[dict[str, Any]]]:
        """Hypotheses furthest from their reference: lowest sentence chrF (sacreBLEU) first."""
        import sacrebleu

        scored = [{**row, "chrf": round(sacrebleu.sentence_chrf(str(row.get("hypothesis", "")),
                                                                [str(row.get("reference", ""))]).score, 2)}
                  for row in rows if "hypothesis" in row]
        worst = sorted(scored, key=lambda row: row["chrf"])[:count]
        return f"translations furthest from the reference, lowest sentence chrF first (of {len(rows)} pairs)", worst

    # --- inference -------------------------------------------------------------------------------
    def predict(self, model: torch.nn.Module, inputs: list[dict[str, Any]],
                stream: TextIO | None = None) -> list[dict[str, Any]]:
        """``{"text": source}`` rows (or the recipe's source column / language key) -> ``translation``."""
        d = self.data
        keys = [k for k in ("text", d.source_column, d.source_lang) if k]
        sources = []
        for row, item in enumerate(inputs):
            text = next((item[k] for k in keys if isinstance(item.get(k), str)), None)
            if text is None or not text.strip():
                raise DataError(f"input {row + 1}: a translation input needs a non-empty "
                                f"{' or '.join(repr(k) for k in keys)}")
            sources.append(text.strip())
        tokenizer = self.tokenizer
        device = next(model.parameters()).device
        hypotheses: list[str] = [""] * len(sources)
        order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))  # similar lengths batch together
        batch_size = self.eval.batch_size
        model.eval()
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            if self.learned.kind == "seq2seq":
                encoded = self._encode_sources(tokenizer, [sources[i] for i in chunk], padding=True,
                                               return_tensors="pt")
                ids, mask = encoded["input_ids"], encoded["attention_mask"]
            else:
                prompts = [self._prompt_ids(tokenizer, sources[i]) for i in chunk]
                ids = pad_rows(prompts, tokenizer.pad_token_id, "left", None)
                mask = pad_rows([[1] * len(p) for p in prompts], 0, "left", None)
            with torch.no_grad():
                generated = self.generate(model, ids.to(device), mask.to(device))
            for i, text in zip(chunk, self.decode(generated.cpu().numpy())):
                hypotheses[i] = text
        return [{**item, "translation": hyp} for item, hyp in zip(inputs, hypotheses)]


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
