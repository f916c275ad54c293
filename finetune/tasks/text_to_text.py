"""Text -> text tasks (translation, summarization) with encoder-decoder models (T5, Marian, BART, mBART/NLLB)
or decoder-only LMs (prompted): what they share. A task built on it says how rows become (source, target)
pairs, what the prompt says, and how hypotheses are scored; everything else is here.

Which kind a run uses follows the checkpoint's ``config.is_encoder_decoder`` (what the task learns):

* encoder-decoder: ``AutoModelForSeq2SeqLM``; the source (with T5's task prefix) is the encoder input
  and the reference the ``labels`` (padded with -100); the model shifts labels into decoder inputs
  itself, so each architecture's own decoder start token is used. Tokenizers that carry language
  codes (mBART, NLLB, M2M100) get ``src_lang``/``tgt_lang`` from the task, and the target code is forced
  as the first generated token when the targets start with it.
* decoder-only: ``AutoModelForCausalLM``, as prompt -> completion SFT with the shared decoder
  helpers (``finetune.tasks.decoding``): ``prompt + reference + eos`` with the loss on the reference and
  eos only (labels -100 on the prompt, never derived from the pad id), so the model learns to stop even
  when pad == eos. The prompt is the task's instruction as the user turn of the checkpoint's chat
  template (``data.use_chat_template``, ``data.system_prompt``), else the instruction and a newline.

Evaluation generates for the held-out pairs in length-sorted batches (left-padded prompts for
decoders), greedy or beam search, at most ``eval.max_new_tokens`` new tokens, and scores the
detokenized hypotheses with the task's metrics; validation generates only when it picks the best
checkpoint by such a metric.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TextIO

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedTokenizerBase

from finetune.config import Config, DataConfig, EvalConfig, check
from finetune.data import describe_split, require_columns
from finetune.errors import DataError, ModelError
from finetune.models import Checkpoint
from finetune.tasks.base import Learned, Task
from finetune.tasks.decoding import (IGNORE_INDEX, build_sft_features, collate_causal_lm, encode_prompt,
                                     ensure_pad_token, eos_token_ids, format_prompt, pad_rows, token_nll,
                                     uses_chat_template)
from finetune.tasks.lm_loss import causal_lm_loss

PLAIN_TEMPLATE = "{prompt}\n"  # without a chat template the target follows the instruction's line
# model types trained with a task prefix on the source ("translate English to German: ", "summarize: ")
PREFIX_MODEL_TYPES = ("t5",)


@dataclass
class TextToTextData(DataConfig):
    """``data`` keys every text -> text task has."""

    source_column: str | None = None
    """Column of source texts."""
    target_column: str | None = None
    """Column of reference targets (with ``source_column``)."""
    source_prefix: str | None = None
    """Encoder-decoder: text put before each source; null: the task's T5 prefix for T5, nothing for others."""
    use_chat_template: bool = True
    """Decoder-only: put the instruction in the tokenizer's chat template when it has one."""
    system_prompt: str | None = None
    """Decoder-only with a chat template: a system turn before each prompt; null keeps the template's own."""


@dataclass
class TextToTextEval(EvalConfig):
    """``eval`` keys every text -> text task has."""

    max_new_tokens: int = 64
    """Cap on new tokens per generated target."""
    num_beams: int = 1
    """1 = greedy decoding, more = beam search."""

    def validate(self) -> None:
        super().validate()
        check(self.max_new_tokens >= 1, "eval.max_new_tokens", ">= 1", self.max_new_tokens)
        check(self.num_beams >= 1, "eval.num_beams", ">= 1", self.num_beams)


@dataclass(frozen=True)
class TextToTextLearned(Learned):
    kind: Literal["seq2seq", "decoder"]
    """Encoder-decoder or decoder-only, from the checkpoint's config."""
    model_type: str
    """The checkpoint's ``model_type`` (T5 gets a task prefix)."""


class TextToTextTask(Task):
    """Base of the text -> text tasks. A subclass sets its settings classes, ``output_key``, and implements
    :meth:`pairs` (rows -> ids, sources, targets), :meth:`instruction`, :meth:`t5_prefix` and :meth:`scores`."""

    Learned = TextToTextLearned
    eval_pad_values = {"generated": IGNORE_INDEX}
    input_columns = ("source",)
    output_key: ClassVar[str]
    """The key ``predict`` puts each generated text under."""
    unit: ClassVar[str] = "pairs"
    """What the examples are called in messages ("pairs", "documents")."""
    preview_heading: ClassVar[str] = "sample outputs"
    """The heading of the sample outputs printed at the end of a run."""
    data: TextToTextData
    eval: TextToTextEval

    def __init__(self, config: Config):
        super().__init__(config)
        self.generate_now = True
        """Whether this evaluation pass generates (see begin_evaluation)."""
        self.generation_seconds = 0.0
        # The subclass's module logger, so that its messages carry its name.
        self.logger = logging.getLogger(type(self).__module__)

    @property
    def auto_class(self) -> type:  # type: ignore[override]
        return AutoModelForSeq2SeqLM if self.learned.kind == "seq2seq" else AutoModelForCausalLM

    @property
    def peft_task_type(self) -> str:  # type: ignore[override]
        return "SEQ_2_SEQ_LM" if self.learned.kind == "seq2seq" else "CAUSAL_LM"

    # --- what a subclass says ----------------------------------------------------------------------
    def pairs(self, dataset: datasets.Dataset, where: str) -> datasets.Dataset:
        """One split's rows -> columns ``id``, ``source``, ``target`` (checked: see :meth:`checked_pairs`)."""
        raise NotImplementedError

    def instruction(self, source: str) -> str:
        """Decoder-only: the user turn asking for the target of ``source``."""
        raise NotImplementedError

    def t5_prefix(self) -> str:
        """The task prefix T5 checkpoints were trained with (``translate English to German: ``)."""
        raise NotImplementedError

    def scores(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        """Metrics of detokenized hypotheses against one reference each."""
        raise NotImplementedError

    def clip_source(self, tokenizer: PreTrainedTokenizerBase, source: str) -> str:
        """The part of a source the model sees (all of it here; summarization keeps its start)."""
        return source

    def input_keys(self) -> list[str]:
        """Keys of a ``predict`` input row that may hold the source, in order of preference."""
        return [k for k in ("text", self.data.source_column) if k]

    # --- learn and bind --------------------------------------------------------------------------
    def learn(self, raw: datasets.DatasetDict, checkpoint: Checkpoint) -> TextToTextLearned:
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
        return self.Learned(kind, model_config.model_type)

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        """Decoders get a pad token."""
        if self.learned.kind == "decoder":
            ensure_pad_token(tokenizer)
        return tokenizer

    # --- data ------------------------------------------------------------------------------------
    def prepare(self, raw: datasets.DatasetDict) -> datasets.DatasetDict:
        """Every split -> columns ``id``, ``source``, ``target`` (non-empty strings), checked row by row."""
        return datasets.DatasetDict({split: self.pairs(dataset, describe_split(raw, split, self.data))
                                     for split, dataset in raw.items()})

    def column_pairs(self, dataset: datasets.Dataset, where: str) -> datasets.Dataset:
        """Pairs from two plain columns, ``data.source_column`` and ``data.target_column``."""
        d = self.data
        require_columns(dataset, [d.source_column, d.target_column], where)
        return self.checked_pairs(dataset, dataset[d.source_column], dataset[d.target_column],
                                  (f"column {d.source_column!r}", f"column {d.target_column!r}"), where)

    def checked_pairs(self, dataset: datasets.Dataset, sources: list[Any], targets: list[Any],
                      names: tuple[str, str], where: str) -> datasets.Dataset:
        """``id`` (the data's ``id`` column, else the row number), ``source``, ``target``; a missing or empty
        text stops with an error naming the row (and id) and which side (``names``)."""
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

    def features(self, examples: datasets.Dataset, split: str) -> datasets.Dataset:
        """Seq2seq: ``input_ids`` + ``labels``. Decoder: prompt + target + eos in ``input_ids``, labels -100
        on the prompt, and for held-out splits ``prompt_length`` (generation starts from the prompt).
        ``length`` is the whole example for training (batching) and the source or prompt for
        evaluation (what generation pads). One feature per example, in order."""
        tokenizer, held_out, max_length = self.tokenizer, split != "train", self.data.max_length
        if self.learned.kind == "seq2seq":
            def tokenize(batch: dict[str, list]) -> dict[str, list]:
                encoded = self.encode_sources(tokenizer, batch["source"])
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
                    feature = build_sft_features(self.prompt_ids(tokenizer, source),
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

    def encode_sources(self, tokenizer: PreTrainedTokenizerBase, sources: list[str], **kwargs: Any) -> Any:
        """Encoder inputs: the source prefix + each (clipped) source, truncated to ``data.max_length``."""
        prefix = self.source_prefix()
        return tokenizer([prefix + self.clip_source(tokenizer, s) for s in sources], truncation=True,
                         max_length=self.data.max_length, **kwargs)

    def source_prefix(self) -> str:
        if self.data.source_prefix is not None:
            return self.data.source_prefix
        return self.t5_prefix() if self.learned.model_type in PREFIX_MODEL_TYPES else ""

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, source: str) -> list[int]:
        """The decoder prompt for one source, in the chat template when there is one."""
        d = self.data
        chat = uses_chat_template(tokenizer, d.use_chat_template)
        text = format_prompt(tokenizer, self.instruction(self.clip_source(tokenizer, source)), use_chat_template=chat,
                             template=PLAIN_TEMPLATE, system_prompt=d.system_prompt)
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

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Decoders: the loss without full logits (``train.chunked_loss``); encoder-decoders: the model's own."""
        if self.learned.kind == "decoder" and self.config.train.chunked_loss:
            return causal_lm_loss(model, batch)
        return super().loss(model, batch)

    # --- generation ------------------------------------------------------------------------------
    def _forced_bos_token_id(self, tokenizer: PreTrainedTokenizerBase) -> int | None:
        """A token every target starts with and generation must start with (translation: a language code)."""
        return None

    def begin_evaluation(self, split: str) -> None:
        # Validation generates only when it picks the best checkpoint by a generation metric; the loss needs
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
            nll, tokens = token_nll(model, batch, chunked=self.config.train.chunked_loss)
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

    # --- evaluation ------------------------------------------------------------------------------
    def compute_metrics(self, outputs: dict[str, np.ndarray], examples: datasets.Dataset,
                        features: datasets.Dataset) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        metrics: dict[str, Any] = {"loss": float(outputs["loss"].mean())}
        if "generated" not in outputs:
            return metrics, []
        hypotheses = self.decode(outputs["generated"])
        references = list(examples["target"])
        metrics.update(self.scores(hypotheses, references))
        tokens = int((outputs["generated"] != IGNORE_INDEX).sum())
        seconds = max(self.generation_seconds, 1e-9)
        metrics["generated_tokens"] = tokens
        metrics["generation_tokens_per_second"] = round(tokens / seconds, 1)
        e = self.eval
        self.logger.info("generation: %d tokens for %d %s in %.1f s = %.1f tokens/s (batch %d, %s, max %d new "
                         "tokens)", tokens, len(hypotheses), self.unit, seconds, tokens / seconds, e.batch_size,
                         "greedy" if e.num_beams == 1 else f"beam search x{e.num_beams}", e.max_new_tokens)
        rows = [{"id": i, "source": s, "reference": r, "hypothesis": h}
                for i, s, r, h in zip(examples["id"], examples["source"], references, hypotheses)]
        return metrics, rows

    def preview(self, predictions: list[dict[str, Any]], count: int = 3) -> list[str]:
        lines = [f"\n{self.preview_heading} (held-out test {self.unit}):"] if predictions else []
        for row in predictions[:count]:
            lines += [f"  source:     {self.preview_source(row['source'])}", f"  reference:  {row['reference']}",
                      f"  hypothesis: {row['hypothesis']}", ""]
        return lines

    def preview_source(self, source: str) -> str:
        return source

    # --- inference -------------------------------------------------------------------------------
    def predict(self, model: torch.nn.Module, inputs: list[dict[str, Any]],
                stream: TextIO | None = None) -> list[dict[str, Any]]:
        """Input rows with a source (``text``, or a key of :meth:`input_keys`) -> the same rows with the
        generated text under ``output_key``."""
        keys = self.input_keys()
        sources = []
        for row, item in enumerate(inputs):
            text = next((item[k] for k in keys if isinstance(item.get(k), str)), None)
            if text is None or not text.strip():
                raise DataError(f"input {row + 1}: a {self.name} input needs a non-empty "
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
                encoded = self.encode_sources(tokenizer, [sources[i] for i in chunk], padding=True,
                                              return_tensors="pt")
                ids, mask = encoded["input_ids"], encoded["attention_mask"]
            else:
                prompts = [self.prompt_ids(tokenizer, sources[i]) for i in chunk]
                ids = pad_rows(prompts, tokenizer.pad_token_id, "left", None)
                mask = pad_rows([[1] * len(p) for p in prompts], 0, "left", None)
            with torch.no_grad():
                generated = self.generate(model, ids.to(device), mask.to(device))
            for i, text in zip(chunk, self.decode(generated.cpu().numpy())):
                hypotheses[i] = text
        return [{**item, self.output_key: hyp} for item, hyp in zip(inputs, hypotheses)]
