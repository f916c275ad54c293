"""Tiny decoder checkpoints for tests, built locally: a byte-level BPE tokenizer shaped like SmolLM2's
(``<|im_end|>`` is both EOS and pad, ChatML chat template), tiny Llama / GPT-2 models from configs,
a GGUF file written with the ``gguf`` package from the tiny Llama, and learnable prompt/response data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow",
          "sea": "blue", "leaf": "green", "milk": "white", "night": "black", "rose": "red", "lemon": "yellow"}
GREETINGS = ["hello", "hi there", "good morning", "hey", "good evening"]


def synthetic_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/response pairs a tiny model learns quickly (fixed answers to templated questions)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if rng.random() < 0.7:
            thing = rng.choice(sorted(COLORS))
            rows.append({"prompt": f"what color is the {thing}?", "response": f"the {thing} is {COLORS[thing]}."})
        else:
            rows.append({"prompt": rng.choice(GREETINGS), "response": "hello, how can i help?"})
    return rows


def corpus() -> list[str]:
    pairs = synthetic_pairs(300)
    return [p["prompt"] for p in pairs] + [p["response"] for p in pairs] + [
        "user assistant system the a of to and in is it was for on that with as",
        "once upon a time there was a little cat who liked to sleep in the sun all day long.",
    ]


def build_tokenizer(folder: Path | None = None, chat_template: bool = True):
    """A byte-level BPE (GPT-2 style) fast tokenizer; EOS = pad = ``<|im_end|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def llama_config(tokenizer, **overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5)
    values.update(overrides)
    return LlamaConfig(**values)


def gpt2_config(tokenizer, **overrides):
    from transformers import GPT2Config

    values = dict(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    values.update(overrides)
    return GPT2Config(**values)


def build_model(kind: str, tokenizer, seed: int = 0, attn_implementation: str = "sdpa",
                initializer_range: float = 0.02, dropout: float | None = None):
    """A tiny random decoder. A larger ``initializer_range`` (e.g. 0.2) makes its outputs depend
    strongly on the context, for tests that must see attention leaks; the default is near-uniform."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        extra = {} if dropout is None else {"attention_dropout": dropout}
        model = LlamaForCausalLM(llama_config(tokenizer, initializer_range=initializer_range, **extra))
    elif kind == "gpt2":
        extra = {} if dropout is None else {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}
        model = GPT2LMHeadModel(gpt2_config(tokenizer, initializer_range=initializer_range, **extra))
    else:
        raise ValueError(kind)
    model.config._attn_implementation = attn_implementation
    return model.eval()


def build_checkpoint(folder: Path, kind: str = "llama", chat_template: bool = True) -> Path:
    """A folder with a tiny decoder and its tokenizer, loadable by ``from_pretrained``."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, chat_template=chat_template)
    build_model(kind, tokenizer).save_pretrained(folder)
    return folder


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (transformers' GGUF loader undoes it)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(path: Path, model, tokenizer) -> Path:
    """Write a tiny Llama + its byte-level BPE tokenizer as an F32 GGUF, the way llama.cpp's converter
    lays it out (tensor names, q/k permutation, ``gpt2`` tokenizer metadata)."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            weights = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weights = _permute(weights, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weights = _permute(weights, config.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", np.ascontiguousarray(weights))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
