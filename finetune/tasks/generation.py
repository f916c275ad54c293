"""Text generation with decoder-only (GPT-style) models: language modelling on plain text, and
supervised fine-tuning (SFT) on prompt/response pairs or chat ``messages`` lists.

Three data shapes (``data.shape``; ``auto`` picks from the training split's columns, and the choice is
what the task learns):

- ``text``: every row is tokenized, rows are joined with newlines into one stream, and the stream is
  cut into blocks of ``data.max_length`` tokens; every token is a target.
- ``prompt_response`` / ``messages``: the prompt goes through the tokenizer's chat template (or
  ``data.prompt_template``), the response is followed by EOS; only response tokens and EOS are
  targets (the helpers in ``finetune.tasks.decoding``). With ``data.packing`` several samples share a
  training row; each keeps its own positions and attention (no token attends across a sample boundary).

The loss is the mean over target tokens (token-weighted), in training batches packed or not, and
over a whole held-out split in evaluation (summed NLL / target tokens, gathered across processes);
perplexity is its exponential. Held-out test prompts (``eval.generate_samples`` of them) are also
generated for, left-padded in length-sorted batches, and scored with ROUGE-L against the references.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import datasets
import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from finetune.config import DataConfig, EvalConfig, check
from finetune.data import describe_split, require_columns, training_split
from finetune.errors import DataError
from finetune.metrics import load_metric
from finetune.models import Checkpoint
from finetune.tasks.base import Learned, Task
from finetune.tasks.decoding import (DEFAULT_PROMPT_TEMPLATE, StreamWriter, build_sft_features,
                                     collate_causal_lm, encode_prompt, ensure_pad_token, eos_token_ids,
                                     format_prompt, generate_batched, pack_sft_features, packs_exactly,
                                     token_nll, uses_chat_template)
from finetune.tasks.lm_loss import IGNORE_INDEX, causal_lm_loss

logger = logging.getLogger(__name__)

GENERATED_PAD = -1  # pads generated token ids across rows and processes (never a token id)
TEXT_MAP_BATCH = 1000  # rows tokenized and cut into blocks together (the last block of each batch may be short)
SHAPES = ("text", "prompt_response", "messages")


@dataclass
class GenerationData(DataConfig):
    """``data`` keys of the generation task."""

    shape: Literal["auto", "text", "prompt_response", "messages"] = "auto"
    """Plain ``text`` (language modelling), ``prompt_response`` pairs or chat ``messages`` lists (supervised
    fine-tuning); ``auto`` picks from the columns: messages, else prompt + response, else text."""
    text_column: str = "text"
    """Plain text: the column of texts."""
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    """A list of ``{role, content}`` turns; the last (assistant) turn is the response."""
    use_chat_template: bool = True
    """Format prompts with the tokenizer's chat template when it has one (else ``prompt_template``)."""
    system_prompt: str | None = None
    """With a chat template: a system turn put before each prompt; null keeps the template's own default
    (some templates insert a long one: a short one saves tokens on every sample)."""
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    """Without a chat template: the text the response follows; ``{prompt}`` is replaced."""
    packing: bool | Literal["auto"] = "auto"
    """SFT: pack several training samples into each row of up to ``max_length`` tokens; attention and
    positions stay inside each sample, so the loss is the same as unpacked (no padding computed: faster). ``auto``
    packs when the checkpoint's architecture masks attention across packed samples (transformers' mask builders:
    Llama, Mistral, Qwen, GPT-2 and most others); ``true`` packs anyway. ``train.batch_size`` counts rows. Plain
    text is always concatenated and cut into blocks."""
    overlength: Literal["truncate", "drop"] = "truncate"
    """SFT samples longer than ``max_length``: ``truncate`` (the prompt loses its start, the response its end;
    EOS is kept only with a whole response) or ``drop``; counted in the log."""

    def validate(self) -> None:
        super().validate()
        check("{prompt}" in self.prompt_template, "data.prompt_template", "a text containing {prompt}",
              self.prompt_template)


@dataclass
class GenerationEval(EvalConfig):
    """``eval`` keys of the generation task."""

    generate_samples: int = 32
    """Held-out test prompts to generate for (the first N of the test split); 0 skips generation."""
    max_new_tokens: int = 64
    """Cap on new tokens per generated answer."""
    do_sample: bool = False
    """Sample (with ``temperature`` and ``top_p``) instead of greedy decoding."""
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    """Above 1, tokens already in the prompt or the answer are made less likely (1: off)."""

    def validate(self) -> None:
        super().validate()
        check(self.repetition_penalty > 0, "eval.repetition_penalty", "> 0", self.repetition_penalty)
        check(self.generate_samples >= 0, "eval.generate_samples", ">= 0", self.generate_samples)
        check(self.max_new_tokens > 0, "eval.max_new_tokens", "> 0", self.max_new_tokens)
        check(self.temperature > 0, "eval.temperature", "> 0", self.temperature)
        check(0 < self.top_p <= 1, "eval.top_p", "in (0, 1]", self.top_p)


@dataclass(frozen=True)
class GenerationLearned(Learned):
    shape: str
    """``text``, ``prompt_response`` or ``messages``."""


class GenerationTask(Task):
    name = "generation"
    Data = GenerationData
    Eval = GenerationEval
    Learned = GenerationLearned
    auto_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"
    metrics_higher_is_better = {"loss": False, "perplexity": False}
    headline_metrics = ["perplexity", "loss", "rougeL", "eos_share", "mean_new_tokens"]
    pipeline_tag = "text-generation"
    predict_example = '--prompt "Hello, how are you?" --max-new-tokens 48'
    eval_pad_values = {"generated": GENERATED_PAD}
    input_columns = ("text", "prompt", "messages")
    data: GenerationData
    eval: GenerationEval

    # --- learn and bind --------------------------------------------------------------------------
    packing_exact: tuple[bool, str] = (False, "the checkpoint was not inspected")
    """Whether ``data.packing=auto`` packs (set by :meth:`learn`, which sees the checkpoint), and why."""

    def learn(self, raw: datasets.DatasetDict, checkpoint: Checkpoint) -> GenerationLearned:
        """The data shape: the recipe's, or the one the training split's columns show. Also whether packing is
        exact for the checkpoint's architecture (for ``data.packing=auto``; training only, so not saved)."""
        if self.data.packing == "auto" and checkpoint is not None:  # None: only the data is looked at
            self.packing_exact = packs_exactly(checkpoint.path, gguf_file=checkpoint.gguf_file,
                                               revision=checkpoint.revision,
                                               trust_remote_code=self.config.model.trust_remote_code)
        if self.data.shape != "auto":
            return GenerationLearned(self.data.shape)
        d = self.data
        train, where = training_split(raw, d)
        columns = train.column_names
        if d.messages_column in columns:
            return GenerationLearned("messages")
        if d.prompt_column in columns and d.response_column in columns:
            return GenerationLearned("prompt_response")
        if d.text_column in columns:
            return GenerationLearned("text")
        raise DataError(f"{where}: cannot tell the data shape from its columns ({', '.join(columns)}): expected "
                        f"{d.messages_column!r} (data.messages_column), {d.prompt_column!r} + {d.response_column!r} "
                        f"(data.prompt_column, data.response_column) or {d.text_column!r} (data.text_column); "
                        f"or set data.shape")

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        return ensure_pad_token(tokenizer)

    # --- data ------------------------------------------------------------------------------------
    def prepare(self, raw: datasets.DatasetDict) -> datasets.DatasetDict:
        """Check every row and normalise columns to ``text`` | ``prompt`` + ``response`` | ``messages`` +
        ``response``."""
        check_rows = {"text": self._check_text, "prompt_response": self._check_pairs,
                      "messages": self._check_messages}[self.learned.shape]
        return datasets.DatasetDict({split: check_rows(dataset, describe_split(raw, split, self.data))
                                     for split, dataset in raw.items()})

    def _check_text(self, dataset: datasets.Dataset, where: str) -> datasets.Dataset:
        column = self.data.text_column
        require_columns(dataset, [column], where)
        values = dataset[column]
        for row, value in enumerate(values):
            if not isinstance(value, str):  # empty strings are fine: blank lines of a text file
                raise DataError(f"{where}: row {row + 1}, column {column!r}: expected text, got {value!r}")
        if not any(value.strip() for value in values):
            raise DataError(f"{where}: column {column!r} holds no text")
        return datasets.Dataset.from_dict({"text": values})

    def _check_pairs(self, dataset: datasets.Dataset, where: str) -> datasets.Dataset:
        d = self.data
        require_columns(dataset, [d.prompt_column, d.response_column], where)
        prompts, responses = dataset[d.prompt_column], dataset[d.response_column]
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            for column, value in ((d.prompt_column, prompt), (d.response_column, response)):
                if not isinstance(value, str) or not value.strip():
                    what = ("missing" if value is None else "empty" if isinstance(value, str)
                            else f"not text ({value!r})")
                    raise DataError(f"{where}: row {row + 1}, column {column!r}: {what}; every row needs a "
                                    f"non-empty {d.prompt_column!r} and {d.response_column!r}")
        return datasets.Dataset.from_dict({"prompt": prompts, "response": responses})

    def _check_messages(self, dataset: datasets.Dataset, where: str) -> datasets.Dataset:
        column = self.data.messages_column
        require_columns(dataset, [column], where)
        contexts, responses = [], []
        for row, messages in enumerate(dataset[column]):
            problem = _messages_problem(messages)
            if problem:
                raise DataError(f"{where}: row {row + 1}, column {column!r}: {problem}")
            turns = [{"role": m["role"], "content": m["content"]} for m in messages]
            contexts.append(turns[:-1])
            responses.append(turns[-1]["content"])
        return datasets.Dataset.from_dict({"messages": contexts, "response": responses})

    def describe(self, splits: datasets.DatasetDict) -> list[str]:
        kind = {"text": "lines of text", "prompt_response": "prompt/response pairs",
                "messages": "conversations"}[self.learned.shape]
        return [f"{name}: {len(split)} {kind}" for name, split in splits.items()]

    def features(self, examples: datasets.Dataset, split: str) -> datasets.Dataset:
        if self.learned.shape == "text":
            return self._text_features(examples, split)
        return self._sft_features(examples, split)

    def _text_features(self, examples: datasets.Dataset, split: str) -> datasets.Dataset:
        """Rows joined with newlines (a .txt file is read line by line), cut into ``max_length`` blocks."""
        block, tokenizer = self.data.max_length, self.tokenizer

        def tokenize_and_cut(batch: dict[str, list]) -> dict[str, list]:
            ids = [token for text in batch["text"]
                   for token in tokenizer(text + "\n", add_special_tokens=False)["input_ids"]]
            blocks = [ids[i:i + block] for i in range(0, len(ids), block)]
            blocks = [b for b in blocks if len(b) > 1]  # one token has nothing to predict
            return {"input_ids": blocks, "labels": blocks, "length": [len(b) for b in blocks]}

        features = examples.map(tokenize_and_cut, batched=True, batch_size=TEXT_MAP_BATCH,
                                remove_columns=examples.column_names, desc=f"tokenizing {split}")
        if len(features) == 0:
            raise DataError(f"{split}: the text has too few tokens to form a block")
        if split == "test":  # the first generate_samples blocks: continue their first half (a prediction row each)
            count = len(features)
            features = features.add_column("generate", [i < self.eval.generate_samples for i in range(count)])
            features = features.add_column("prompt_length", [max(1, n // 2) for n in features["length"]])
        logger.info("%s: %d lines -> %d blocks of up to %d tokens (%d tokens)", split, len(examples),
                    len(features), block, sum(features["length"]))
        return features

    def _sft_features(self, examples: datasets.Dataset, split: str) -> datasets.Dataset:
        d, tokenizer = self.data, self.tokenizer
        chat = uses_chat_template(tokenizer, d.use_chat_template)
        eos = tokenizer.eos_token_id
        prompt_key = "messages" if self.learned.shape == "messages" else "prompt"
        generate = self.eval.generate_samples if split == "test" else 0

        def tokenize(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "prompt_length", "truncated",
                                                    "length", "example_index", "generate")}
            for index, prompt, response in zip(indices, batch[prompt_key], batch["response"]):
                text = format_prompt(tokenizer, prompt, use_chat_template=chat, template=d.prompt_template,
                                     system_prompt=d.system_prompt)
                feature = build_sft_features(encode_prompt(tokenizer, text, chat),
                                             tokenizer(response, add_special_tokens=False)["input_ids"],
                                             eos, d.max_length, d.overlength)
                if feature is None:  # dropped: too long
                    continue
                for key, value in feature.items():
                    out[key].append(value)
                out["length"].append(len(feature["input_ids"]))
                out["example_index"].append(index)
                out["generate"].append(index < generate)
            return out

        features = examples.map(tokenize, batched=True, with_indices=True, remove_columns=examples.column_names,
                                desc=f"tokenizing {split}")
        longer = len(examples) - len(features) if d.overlength == "drop" else sum(features["truncated"])
        if longer:
            policy = ("dropped" if d.overlength == "drop" else
                      "truncated (prompt cut from its start, response from its end; no EOS on a cut response)")
            logger.info("%s: %d of %d samples longer than data.max_length=%d tokens %s", split, longer,
                        len(examples), d.max_length, policy)
        if len(features) == 0:
            raise DataError(f"{split}: every sample is longer than data.max_length={d.max_length} and was dropped")
        packing = d.packing if d.packing != "auto" else self.packing_exact[0]
        if split == "train" and d.packing == "auto":
            logger.info("data.packing=auto: %s (%s)", "packing" if packing else "not packing", self.packing_exact[1])
        if split == "train" and packing:
            packed = features.map(lambda batch: _columns(pack_sft_features(_rows(batch), d.max_length)),
                                  batched=True, batch_size=TEXT_MAP_BATCH, remove_columns=features.column_names,
                                  desc="packing train")
            logger.info("train: %d samples packed into %d rows of up to %d tokens", len(features), len(packed),
                        d.max_length)
            return packed
        if split == "train":
            features = features.remove_columns(["example_index", "generate"])
        return features

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_causal_lm(features, self.tokenizer.pad_token_id,
                                  self.config.train.pad_to_multiple_of)
        if "generate" in features[0]:  # held-out features: which rows to generate for, from which prompt
            batch["generate"] = torch.tensor([bool(f["generate"]) for f in features])
            batch["prompt_length"] = torch.tensor([f["prompt_length"] for f in features])
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The mean over target tokens, without full logits (``train.chunked_loss``) or the model's own."""
        if self.config.train.chunked_loss:
            return causal_lm_loss(model, batch)
        return super().loss(model, batch)

    def loss_weight(self, batch: dict[str, Any]) -> int | None:
        """Target tokens: labels after the shift to next-token prediction that are not ignored."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    # --- evaluation ------------------------------------------------------------------------------
    def eval_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        generate = batch.pop("generate", None)
        prompt_length = batch.pop("prompt_length", None)
        nll, tokens = token_nll(model, batch, chunked=self.config.train.chunked_loss)
        outputs = {"loss": nll / tokens.clamp(min=1), "nll": nll, "tokens": tokens}
        if generate is None:
            return outputs
        generated = torch.full((len(generate), 1), GENERATED_PAD, dtype=torch.long, device=nll.device)
        rows = generate.nonzero().flatten().tolist()
        if rows:
            e = self.eval
            prompts = [batch["input_ids"][i, :prompt_length[i]].tolist() for i in rows]
            results = generate_batched(model, self.tokenizer, prompts, max_new_tokens=e.max_new_tokens,
                                       batch_size=len(rows), do_sample=e.do_sample, temperature=e.temperature,
                                       top_p=e.top_p, repetition_penalty=e.repetition_penalty)
            width = max(1, max(len(r.token_ids) for r in results))
            generated = torch.full((len(generate), width), GENERATED_PAD, dtype=torch.long, device=nll.device)
            for i, result in zip(rows, results):
                generated[i, :len(result.token_ids)] = torch.tensor(result.token_ids, dtype=torch.long)
        outputs["generated"] = generated
        return outputs

    def compute_metrics(self, outputs: dict[str, np.ndarray], examples: datasets.Dataset,
                        features: datasets.Dataset) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        tokens = int(outputs["tokens"].sum())
        loss = float(outputs["nll"].sum() / max(tokens, 1))
        metrics: dict[str, Any] = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"),
                                   "target_tokens": tokens}
        if self.learned.shape == "text":
            return metrics, self._text_rows(outputs, features)
        if "generated" not in outputs:
            return metrics, []
        eos_ids = set(eos_token_ids(self.tokenizer))
        rows, predictions, references, ended, lengths = [], [], [], [], []
        flags = features["generate"]
        for i, index in enumerate(features["example_index"]):
            example = examples[index]
            row: dict[str, Any] = {"prompt": example.get("prompt", example.get("messages")),
                                   "reference": example["response"], "loss": round(float(outputs["loss"][i]), 6)}
            ids = [int(t) for t in outputs["generated"][i] if t != GENERATED_PAD]
            if flags[i]:
                text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                row.update(generation=text, ended_with_eos=bool(ids) and ids[-1] in eos_ids, new_tokens=len(ids))
                predictions.append(text)
                references.append(example["response"])
                ended.append(row["ended_with_eos"])
                lengths.append(len(ids))
            rows.append(row)
        if predictions:
            rouge = load_metric("rouge").compute(predictions=predictions, references=references,
                                                 rouge_types=["rougeL"])
            metrics.update(rougeL=float(rouge["rougeL"]), eos_share=float(np.mean(ended)),
                           mean_new_tokens=float(np.mean(lengths)),
                           max_new_tokens=self.eval.max_new_tokens, generated=len(predictions))
        return metrics, rows

    def _text_rows(self, outputs: dict[str, np.ndarray], features: datasets.Dataset) -> list[dict[str, Any]]:
        """Plain text: one row per evaluated block (its loss and target tokens); a block generated for also has
        its first half (``prompt``), its second half (``reference``) and the model's continuation (``generation``,
        cut to the reference's length: a plain-text model rarely stops by itself)."""
        decode = self.tokenizer.decode
        rows = []
        flags = features["generate"] if "generate" in features.column_names else [False] * len(features)
        for i, ids in enumerate(features["input_ids"]):
            row: dict[str, Any] = {"block": i}
            if flags[i] and "generated" in outputs:
                half = features["prompt_length"][i]
                new = [int(t) for t in outputs["generated"][i] if t != GENERATED_PAD][:len(ids) - half]
                row.update(prompt=decode(ids[:half]), reference=decode(ids[half:]),
                           generation=decode(new, skip_special_tokens=True))
            else:
                row["text"] = decode(ids)
            row.update(loss=round(float(outputs["loss"][i]), 6), tokens=int(outputs["tokens"][i]))
            rows.append(row)
        return rows

    def preview(self, predictions: list[dict[str, Any]], count: int = 3) -> list[str]:
        generated = [row for row in predictions if "generation" in row and "ended_with_eos" in row][:count]
        if not generated:
            return []
        lines = ["\nsample generations (held-out test prompts):"]
        for row in generated:
            prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
            stop = "" if row["ended_with_eos"] else f" [no EOS after {row['new_tokens']} tokens]"
            lines += [f"  prompt:    {prompt}", f"  reference: {row['reference']}",
                      f"  generated: {row['generation']}{stop}", ""]
        return lines

    @classmethod
    def worst_predictions(cls, rows: list[dict[str, Any]], count: int) -> tuple[str, list[dict[str, Any]]]:
        """Generations furthest from their reference (lowest ROUGE-L F1, the metric of the run); without any
        generation (``eval.generate_samples=0``), the rows of highest loss."""
        generated = [row for row in rows if isinstance(row.get("generation"), str)]
        if not generated:
            return super().worst_predictions(rows, count)
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        scored = [{**row, "rougeL": round(scorer.score(str(row["reference"]), row["generation"])["rougeL"].fmeasure, 4)}
                  for row in generated]
        worst = sorted(scored, key=lambda row: (row["rougeL"], -float(row.get("loss", 0))))[:count]
        return f"generations furthest from the reference, lowest ROUGE-L first (of {len(generated)} generated)", worst

    # --- inference -------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | list[dict[str, str]]) -> list[int]:
        """Token ids of one prompt (a string, or a chat as ``{role, content}`` turns) formatted as in
        training: the chat template or ``data.prompt_template`` (with ``data.system_prompt``); a plain-text
        model (``shape: text``) continues the text as it is."""
        d, tokenizer = self.data, self.tokenizer
        if self.learned.shape == "text":
            return tokenizer(prompt, add_special_tokens=False)["input_ids"]
        chat = uses_chat_template(tokenizer, d.use_chat_template)
        text = format_prompt(tokenizer, prompt, use_chat_template=chat, template=d.prompt_template,
                             system_prompt=d.system_prompt)
        return encode_prompt(tokenizer, text, chat)

    def predict(self, model: torch.nn.Module, inputs: list[dict[str, Any]],
                stream: TextIO | None = None) -> list[dict[str, Any]]:
        """Complete ``prompt`` (or ``messages``; ``text`` for a plain-text model). With ``stream``, tokens are
        written there as they come, one prompt at a time."""
        d, e, tokenizer = self.data, self.eval, self.tokenizer
        prompts = []
        for row, item in enumerate(inputs):
            prompt = item.get("messages") or item.get("prompt") or item.get("text")
            if isinstance(prompt, list):
                problem = _messages_problem(prompt + [{"role": "assistant", "content": "-"}])
                if problem:
                    raise DataError(f"input {row + 1}, 'messages': {problem}")
            elif not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f"input {row + 1}: a generation input needs a non-empty 'prompt'")
            ids = self.prompt_ids(prompt)
            if len(ids) > d.max_length:
                logger.warning("input %d: prompt of %d tokens keeps its last data.max_length=%d", row + 1,
                               len(ids), d.max_length)
                ids = ids[-d.max_length:]
            prompts.append(ids)
        options = {"max_new_tokens": e.max_new_tokens, "do_sample": e.do_sample, "temperature": e.temperature,
                   "top_p": e.top_p, "repetition_penalty": e.repetition_penalty}
        if stream is None:
            results = generate_batched(model, tokenizer, prompts, batch_size=e.batch_size, **options)
        else:
            results = []
            for item, ids in zip(inputs, prompts):
                stream.write(f"> {item.get('prompt') or item.get('text') or item.get('messages')}\n")
                results += generate_batched(model, tokenizer, [ids], batch_size=1,
                                            streamer=StreamWriter(tokenizer, stream), **options)
        return [{**item, "generation": tokenizer.decode(r.token_ids, skip_special_tokens=True).strip(),
                 "ended_with_eos": r.ended_with_eos, "new_tokens": len(r.token_ids)}
                for item, r in zip(inputs, results)]


def _messages_problem(messages: Any) -> str | None:
    """What is wrong with a chat (a list of {role, content} ending with the assistant's answer), or None."""
    if not isinstance(messages, list) or len(messages) < 2:
        return "expected a list of at least two {role, content} turns"
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            return f"turn {turn + 1} is not a {{role, content}} mapping of strings"
    if messages[-1]["role"] != "assistant":
        return f"the last turn must be the assistant's response; got role {messages[-1]['role']!r}"
    if not messages[-1]["content"].strip():
        return "the assistant's response (last turn) is empty"
    return None


def _rows(batch: dict[str, list]) -> list[dict[str, Any]]:
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def _columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in ("input_ids", "labels", "position_ids", "length")}
