"""Text generation with decoder-only (GPT-style) models: language modelling on plain text, and
supervised fine-tuning (SFT) on prompt/response pairs or chat ``messages`` lists.

Two data shapes (``data.shape``, inferred from the columns when ``auto``):

- ``text``: every row is tokenized, rows are joined with newlines into one stream, and the stream is
  cut into blocks of ``data.max_length`` tokens; every token is a target.
- ``prompt_response`` / ``messages``: the prompt goes through the tokenizer's chat template (or
  ``data.prompt_template``), the response is followed by EOS; only response tokens and EOS are
  targets. Labels are built from positions, never by masking the pad id, so EOS is learned even
  when the pad token is EOS. With ``data.packing`` several samples share a training row; each keeps
  its own positions and attention (no token attends across a sample boundary).

The loss is the mean over target tokens (token-weighted), in training batches packed or not, and
over a whole held-out split in evaluation (summed NLL / target tokens, gathered across processes);
perplexity is its exponential. Held-out test prompts (``eval.generate_samples`` of them) are also
generated for, left-padded in length-sorted batches, and scored with ROUGE-L against the references.

The helpers below (:func:`format_prompt`, :func:`build_sft_features`, :func:`pack_sft_features`,
:func:`collate_causal_lm`, :func:`generate_batched`) are plain functions so that other decoder
tasks (e.g. translation as prompt -> completion) reuse them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, TextStreamer

from finetune.config import Config, DataConfig
from finetune.data import describe_split, require_columns
from finetune.errors import ConfigError, DataError, ModelError
from finetune.metrics import load_metric
from finetune.models import Checkpoint, load_tokenizer
from finetune.tasks.base import Task

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of a position that is not a target (prompt, padding)
GENERATED_PAD = -1  # pads generated token ids across rows and processes (never a token id)
ARTIFACTS_FILE = "generation.json"
LOGITS_PER_FORWARD = 2**26  # ~256 MB of fp32 logits per evaluation forward pass
TEXT_MAP_BATCH = 1000  # rows tokenized and cut into blocks together (the last block of each batch may be short)


# --- prompts and SFT features --------------------------------------------------------------------------
def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Decoders often have no pad token: pad with EOS. Safe here because labels never come from the
    pad id, and attention masks / packed positions hide padding."""
    if tokenizer.eos_token_id is None:
        raise ModelError("the tokenizer has no EOS token: a generation model must have one to learn where to stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, use_chat_template: bool) -> bool:
    return use_chat_template and bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict[str, str]], *,
                  use_chat_template: bool = True, template: str = DataConfig.prompt_template,
                  system_prompt: str | None = None) -> str:
    """The text a response follows: the chat template with the assistant header (when the tokenizer has
    one and ``use_chat_template``), else ``template`` with ``{prompt}`` replaced. ``prompt`` is a string
    or a list of ``{role, content}`` turns (joined with newlines for the plain template). A
    ``system_prompt`` becomes the first turn of a chat that has none."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if uses_chat_template(tokenizer, use_chat_template):
        if system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = prompt if isinstance(prompt, str) else "\n".join(turn["content"] for turn in messages)
    return template.replace("{prompt}", text)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, chat_template: bool) -> list[int]:
    """Token ids of a formatted prompt. A chat template writes its own special tokens (BOS included
    where the model wants it); a plain prompt gets the tokenizer's usual ones."""
    return tokenizer(text, add_special_tokens=not chat_template)["input_ids"]


def build_sft_features(prompt_ids: Sequence[int], response_ids: Sequence[int], eos: int, max_length: int,
                       overlength: str = "truncate") -> dict[str, Any] | None:
    """One SFT sample: ``input_ids`` = prompt + response + EOS, ``labels`` = -100 over the prompt and the
    response tokens and EOS as targets, ``prompt_length``, ``truncated``.

    Truncation policy when prompt + response + EOS exceeds ``max_length``: ``drop`` returns None;
    ``truncate`` keeps the end of the prompt (where the template puts the assistant header) and
    the start of the response. The prompt keeps what the whole response + EOS leaves, but at least
    half of ``max_length`` (or all of itself when shorter); the response is cut to fit, and EOS
    survives only when the response is whole: a cut answer is never taught to stop early."""
    prompt, response = list(prompt_ids), list(response_ids) + [eos]
    truncated = len(prompt) + len(response) > max_length
    if truncated:
        if overlength == "drop":
            return None
        keep = min(len(prompt), max(max_length - len(response), max_length // 2))
        prompt = prompt[len(prompt) - keep:]
        response = response[:max_length - keep]
    return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response,
            "prompt_length": len(prompt), "truncated": truncated}


def pack_sft_features(features: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Pack samples in order into rows of at most ``max_length`` tokens. ``position_ids`` restart at 0
    for each sample; batched by :func:`collate_causal_lm` (no attention mask, no KV cache),
    transformers turns them into a block-diagonal causal mask, so no token attends across samples.
    The first token of a sample is never a target (it would be predicted from the previous sample)."""
    rows: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for feature in features:
        ids = feature["input_ids"]
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > max_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ids
        current["labels"] += [IGNORE_INDEX] + list(feature["labels"][1:])
        current["position_ids"] += list(range(len(ids)))
    if current["input_ids"]:
        rows.append(current)
    for row in rows:
        row["length"] = len(row["input_ids"])
    return rows


def collate_causal_lm(features: Sequence[dict[str, Any]], pad_id: int,
                      pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Right-padded batch with ``labels`` (-100 on padding). Unpacked rows get an ``attention_mask``.
    Packed rows (with ``position_ids``) get none and ``use_cache=False``: transformers then reads
    each position reset as a sample boundary and builds a block-diagonal causal mask in the form the
    attention kernel wants (it skips that detection whenever a KV cache exists, and models create
    one by default). Their padding becomes one more sample (positions from 0, no targets) that no
    real token can see, being last."""
    width = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    packed = "position_ids" in features[0]
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    positions = torch.zeros((len(features), width), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.tensor(feature["input_ids"])
        labels[row, :n] = torch.tensor(feature["labels"])
        mask[row, :n] = 1
        if packed:
            positions[row, :n] = torch.tensor(feature["position_ids"])
            positions[row, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        batch.update(position_ids=positions, use_cache=False)
    else:
        batch["attention_mask"] = mask
    return batch


def token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor],
              max_logits: int = LOGITS_PER_FORWARD) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, number of target tokens) per row; label t is predicted from the tokens before it.
    Rows go through the model in chunks of at most ``max_logits`` logits (rows x length x vocabulary),
    so a large evaluation batch does not hold the logits of every row at once."""
    input_ids = batch["input_ids"]
    vocab = getattr(getattr(getattr(model, "module", model), "config", None), "vocab_size", None) or 1
    rows = max(1, max_logits // (input_ids.shape[1] * vocab))
    sums, counts = [], []
    for start in range(0, input_ids.shape[0], rows):
        part = {k: v[start:start + rows] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        targets = part.pop("labels")[:, 1:]
        logits = model(**part).logits
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                              reduction="none")
        sums.append(nll.sum(dim=1))
        counts.append((targets != IGNORE_INDEX).sum(dim=1))
    return torch.cat(sums), torch.cat(counts)


# --- generation ---------------------------------------------------------------------------------------
@dataclass
class Generation:
    token_ids: list[int]
    """New tokens, up to and including the first EOS."""
    ended_with_eos: bool


class StreamWriter(TextStreamer):
    """A TextStreamer that writes to a given stream (stderr by default) instead of stdout."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stream: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module | None = None) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config names (e.g. an end-of-turn token)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in configured if isinstance(configured, list) else [configured]:
        if token is not None and token not in ids:
            ids.append(int(token))
    return ids


def generate_batched(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]],
                     *, max_new_tokens: int, batch_size: int = 16, do_sample: bool = False,
                     temperature: float = 1.0, top_p: float = 1.0,
                     streamer: TextStreamer | None = None) -> list[Generation]:
    """Generate for tokenized prompts, in input order. Prompts are sorted by length (longest first)
    and LEFT-padded in batches, so every row's new tokens start at the same column; generation
    stops at EOS (or ``max_new_tokens``). A ``streamer`` needs ``batch_size=1``."""
    model = getattr(model, "module", model)  # DDP wraps; generate lives on the model itself
    if streamer is not None and batch_size != 1:
        raise ValueError("streaming generation needs batch_size=1")
    pad_id = ensure_pad_token(tokenizer).pad_token_id
    eos_ids = eos_token_ids(tokenizer, model)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                               "pad_token_id": pad_id, "eos_token_id": eos_ids}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
    results: list[Generation | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(prompts[i])
            input_ids[row, width - n:] = torch.tensor(list(prompts[i]), dtype=torch.long)
            attention[row, width - n:] = 1
        with torch.no_grad():
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                    streamer=streamer, **options)
        for row, i in enumerate(chunk):
            new = output[row, width:].tolist()
            stop = next((j for j, token in enumerate(new) if token in eos_ids), None)
            results[i] = Generation(new if stop is None else new[:stop + 1], stop is not None)
    return results  # type: ignore[return-value]


# --- the task ---------------------------------------------------------------------------------------
class GenerationTask(Task):
    name = "generation"
    auto_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"
    metrics_higher_is_better = {"loss": False, "perplexity": False}
    headline_metrics = ["perplexity", "loss", "rougeL", "eos_share", "mean_new_tokens"]
    pipeline_tag = "text-generation"
    eval_pad_values = {"generated": GENERATED_PAD}

    def __init__(self, config: Config):
        super().__init__(config)
        self.shape: str | None = None if config.data.shape == "auto" else config.data.shape
        self.tokenizer: PreTrainedTokenizerBase | None = None
        """The tokenizer features were built with (eval_step and compute_metrics need its ids)."""

    @classmethod
    def validate_config(cls, config: Config) -> None:
        super().validate_config(config)
        d, e = config.data, config.eval

        def need(ok: bool, key: str, expected: str, value: Any) -> None:
            if not ok:
                raise ConfigError(f"config key '{key}' must be {expected}; got {value!r}")

        need("{prompt}" in d.prompt_template, "data.prompt_template", "a text containing {prompt}",
             d.prompt_template)
        need(e.generate_samples >= 0, "eval.generate_samples", ">= 0", e.generate_samples)
        need(e.max_new_tokens > 0, "eval.max_new_tokens", "> 0", e.max_new_tokens)
        need(e.temperature > 0, "eval.temperature", "> 0", e.temperature)
        need(0 < e.top_p <= 1, "eval.top_p", "in (0, 1]", e.top_p)

    # --- data ------------------------------------------------------------------------------------
    def prepare_raw(self, raw: datasets.DatasetDict) -> datasets.DatasetDict:
        """Pick the shape, check every row, and normalise columns to ``text`` | ``prompt`` + ``response``
        | ``messages`` + ``response``."""
        d = self.config.data
        if self.shape is None:
            self.shape = self._infer_shape(raw)
        result = {}
        for split, dataset in raw.items():
            where = describe_split(raw, split, d)
            if self.shape == "text":
                result[split] = self._check_text(dataset, where)
            elif self.shape == "prompt_response":
                result[split] = self._check_pairs(dataset, where)
            else:
                result[split] = self._check_messages(dataset, where)
        return datasets.DatasetDict(result)

    def _infer_shape(self, raw: datasets.DatasetDict) -> str:
        d = self.config.data
        columns = next(iter(raw.values())).column_names
        if d.messages_column in columns:
            return "messages"
        if d.prompt_column in columns and d.response_column in columns:
            return "prompt_response"
        if d.text_column in columns:
            return "text"
        raise DataError(f"{describe_split(raw, next(iter(raw)), d)}: cannot tell the data shape from its columns "
                        f"({', '.join(columns)}): expected {d.messages_column!r} (data.messages_column), "
                        f"{d.prompt_column!r} + {d.response_column!r} (data.prompt_column, data.response_column) "
                        f"or {d.text_column!r} (data.text_column); or set data.shape")

    def _check_text(self, dataset: datasets.Dataset, where: str) -> datasets.Dataset:
        column = self.config.data.text_column
        require_columns(dataset, [column], where)
        values = dataset[column]
        for row, value in enumerate(values):
            if not isinstance(value, str):  # empty strings are fine: blank lines of a text file
                raise DataError(f"{where}: row {row + 1}, column {column!r}: expected text, got {value!r}")
        if not any(value.strip() for value in values):
            raise DataError(f"{where}: column {column!r} holds no text")
        return datasets.Dataset.from_dict({"text": values})

    def _check_pairs(self, dataset: datasets.Dataset, where: str) -> datasets.Dataset:
        d = self.config.data
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
        column = self.config.data.messages_column
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
                "messages": "conversations"}[self.shape or "text"]
        return [f"{name}: {len(split)} {kind}" for name, split in splits.items()]

    def preprocess(self, examples: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                   split: str) -> datasets.Dataset:
        self.tokenizer = ensure_pad_token(tokenizer)
        if self.shape == "text":
            return self._preprocess_text(examples, tokenizer, split)
        return self._preprocess_sft(examples, tokenizer, split)

    def _preprocess_text(self, examples: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                         split: str) -> datasets.Dataset:
        """Rows joined with newlines (a .txt file is read line by line), cut into ``max_length`` blocks."""
        block = self.config.data.max_length

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
        logger.info("%s: %d lines -> %d blocks of up to %d tokens (%d tokens)", split, len(examples),
                    len(features), block, sum(features["length"]))
        return features

    def _preprocess_sft(self, examples: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                        split: str) -> datasets.Dataset:
        d = self.config.data
        chat = uses_chat_template(tokenizer, d.use_chat_template)
        eos = tokenizer.eos_token_id
        prompt_key = "messages" if self.shape == "messages" else "prompt"
        generate = self.config.eval.generate_samples if split == "test" else 0

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
        if split == "train" and d.packing:
            packed = features.map(lambda batch: _columns(pack_sft_features(_rows(batch), d.max_length)),
                                  batched=True, batch_size=TEXT_MAP_BATCH, remove_columns=features.column_names,
                                  desc="packing train")
            logger.info("train: %d samples packed into %d rows of up to %d tokens", len(features), len(packed),
                        d.max_length)
            return packed
        if split == "train":
            features = features.remove_columns(["example_index", "generate"])
        return features

    def collate(self, features: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        batch = collate_causal_lm(features, ensure_pad_token(tokenizer).pad_token_id,
                                  self.config.train.pad_to_multiple_of)
        if "generate" in features[0]:  # held-out features: which rows to generate for, from which prompt
            batch["generate"] = torch.tensor([bool(f["generate"]) for f in features])
            batch["prompt_length"] = torch.tensor([f["prompt_length"] for f in features])
        return batch

    # --- model -----------------------------------------------------------------------------------
    def load_tokenizer(self, checkpoint: Checkpoint) -> PreTrainedTokenizerBase:
        return ensure_pad_token(load_tokenizer(checkpoint, self.config.model))

    def save_artifacts(self, folder: Path) -> None:
        (folder / ARTIFACTS_FILE).write_text(json.dumps({"shape": self.shape}, indent=2) + "\n", encoding="utf-8")

    def load_artifacts(self, folder: Path) -> None:
        self.shape = json.loads((folder / ARTIFACTS_FILE).read_text(encoding="utf-8"))["shape"]

    # --- evaluation ------------------------------------------------------------------------------
    def eval_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        generate = batch.pop("generate", None)
        prompt_length = batch.pop("prompt_length", None)
        nll, tokens = token_nll(model, batch)
        outputs = {"loss": nll / tokens.clamp(min=1), "nll": nll, "tokens": tokens}
        if generate is None:
            return outputs
        generated = torch.full((len(generate), 1), GENERATED_PAD, dtype=torch.long, device=nll.device)
        rows = generate.nonzero().flatten().tolist()
        if rows:
            e = self.config.eval
            prompts = [batch["input_ids"][i, :prompt_length[i]].tolist() for i in rows]
            results = generate_batched(model, self.tokenizer, prompts, max_new_tokens=e.max_new_tokens,
                                       batch_size=len(rows), do_sample=e.do_sample, temperature=e.temperature,
                                       top_p=e.top_p)
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
        if "generated" not in outputs or self.shape == "text":
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
                           max_new_tokens=self.config.eval.max_new_tokens, generated=len(predictions))
        return metrics, rows

    def preview(self, predictions: list[dict[str, Any]], count: int = 3) -> list[str]:
        generated = [row for row in predictions if "generation" in row][:count]
        if not generated:
            return []
        lines = ["\nsample generations (held-out test prompts):"]
        for row in generated:
            prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
            stop = "" if row["ended_with_eos"] else f" [no EOS after {row['new_tokens']} tokens]"
            lines += [f"  prompt:    {prompt}", f"  reference: {row['reference']}",
                      f"  generated: {row['generation']}{stop}", ""]
        return lines

    # --- inference -------------------------------------------------------------------------------
    def predict(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Complete ``prompt`` (or ``messages``; ``text`` for a plain-text model). With ``self.stream``
        set, tokens are written there as they come, one prompt at a time."""
        d, e = self.config.data, self.config.eval
        ensure_pad_token(tokenizer)
        chat = self.shape != "text" and uses_chat_template(tokenizer, d.use_chat_template)
        prompts = []
        for row, item in enumerate(inputs):
            prompt = item.get("messages") or item.get("prompt") or item.get("text")
            if isinstance(prompt, list):
                problem = _messages_problem(prompt + [{"role": "assistant", "content": "-"}])
                if problem:
                    raise DataError(f"input {row + 1}, 'messages': {problem}")
            elif not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f"input {row + 1}: a generation input needs a non-empty 'prompt'")
            if self.shape == "text":
                ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            else:
                text = format_prompt(tokenizer, prompt, use_chat_template=chat, template=d.prompt_template,
                                     system_prompt=d.system_prompt)
                ids = encode_prompt(tokenizer, text, chat)
            if len(ids) > d.max_length:
                logger.warning("input %d: prompt of %d tokens keeps its last data.max_length=%d", row + 1,
                               len(ids), d.max_length)
                ids = ids[-d.max_length:]
            prompts.append(ids)
        options = {"max_new_tokens": e.max_new_tokens, "do_sample": e.do_sample, "temperature": e.temperature,
                   "top_p": e.top_p}
        if self.stream is None:
            results = generate_batched(model, tokenizer, prompts, batch_size=e.batch_size, **options)
        else:
            results = []
            for item, ids in zip(inputs, prompts):
                self.stream.write(f"> {item.get('prompt') or item.get('text') or item.get('messages')}\n")
                results += generate_batched(model, tokenizer, [ids], batch_size=1,
                                            streamer=StreamWriter(tokenizer, self.stream), **options)
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
