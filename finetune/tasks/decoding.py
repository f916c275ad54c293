"""Shared helpers of the decoder tasks (generation, and translation with decoder-only models): prompts,
SFT features with the loss on the response only, packing, collation, per-token NLL and batched generation.

Plain functions, so that any task with a decoder-only model reuses them. Labels are built from positions,
never by masking the pad id, so EOS is learned even when the pad token is EOS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase, TextStreamer

from finetune.errors import ModelError
from finetune.tasks.base import NON_PAD_TOKENS, PACKED_SAMPLES
from finetune.tasks.lm_loss import IGNORE_INDEX, causal_lm_nll

LOGITS_PER_FORWARD = 2**26  # ~256 MB of fp32 logits per evaluation forward pass
DEFAULT_PROMPT_TEMPLATE = "### Prompt:\n{prompt}\n### Response:\n"
"""The text a response follows when the tokenizer has no chat template (``{prompt}`` is replaced)."""


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
                  use_chat_template: bool = True, template: str = DEFAULT_PROMPT_TEMPLATE,
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


def packs_exactly(checkpoint_path: str, **config_kwargs: Any) -> tuple[bool, str]:
    """Whether packed rows train exactly like separate samples with this checkpoint's architecture, and why.

    Packed rows carry no attention mask; transformers' mask builders (``masking_utils.create_causal_mask`` and
    its sliding-window twin) then read each restart of ``position_ids`` as a sample boundary and mask attention
    across it. An architecture whose modeling code builds its masks another way (or code shipped with the
    checkpoint) would let samples attend to each other, so it is not packed by default."""
    import sys

    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(checkpoint_path, **config_kwargs)
    except (OSError, ValueError) as exc:
        return False, f"its config could not be read ({type(exc).__name__})"
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if name is None or getattr(config, "auto_map", None):
        return False, f"{config.model_type} is not a transformers causal LM whose masks are known"
    module = sys.modules[getattr(transformers, name).__module__]
    if hasattr(module, "create_causal_mask") or hasattr(module, "create_sliding_window_causal_mask"):
        return True, f"{name} builds block-diagonal masks from packed positions"
    return False, f"{name} builds its attention masks without transformers' packed-sequence detection"


def collate_causal_lm(features: Sequence[dict[str, Any]], pad_id: int,
                      pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Right-padded batch with ``labels`` (-100 on padding). Unpacked rows get an ``attention_mask``.
    Packed rows (with ``position_ids``) get none and ``use_cache=False``: transformers then reads
    each position reset as a sample boundary and builds a block-diagonal causal mask in the form the
    attention kernel wants (it skips that detection whenever a KV cache exists, and models create
    one by default). Their padding becomes one more sample (positions from 0, no targets) that no
    real token can see, being last; ``NON_PAD_TOKENS`` counts their real tokens, ``PACKED_SAMPLES`` their
    samples."""
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
        batch[NON_PAD_TOKENS] = mask.sum()
        batch[PACKED_SAMPLES] = ((positions == 0) & (mask == 1)).sum()  # each sample starts at position 0
    else:
        batch["attention_mask"] = mask
    return batch


def token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], max_logits: int = LOGITS_PER_FORWARD,
              chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, number of target tokens) per row; label t is predicted from the tokens before it.
    ``chunked`` (``train.chunked_loss``): the logits of target positions only, a chunk of rows at a time
    (``finetune.tasks.lm_loss``), where the model allows it. Otherwise rows go through the model in chunks
    of at most ``max_logits`` logits (rows x length x vocabulary), so a large evaluation batch does not
    hold the logits of every row at once."""
    if chunked:
        found = causal_lm_nll(model, batch)
        if found is not None:
            return found
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
                     temperature: float = 1.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
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
    if repetition_penalty != 1.0:
        options["repetition_penalty"] = repetition_penalty
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


def pad_rows(rows: Sequence[Sequence[int]], value: int, side: Literal["left", "right"],
             multiple: int | None = None) -> torch.Tensor:
    """Pad lists of ids to one length (rounded up to ``multiple``) on the given side. Generation continues
    prompts padded on the left, so that every row's new tokens start in the same column."""
    width = max(len(r) for r in rows)
    if multiple:
        width = -(-width // multiple) * multiple
    padded = [([value] * (width - len(r)) + list(r)) if side == "left" else (list(r) + [value] * (width - len(r)))
              for r in rows]
    return torch.tensor(padded, dtype=torch.long)
