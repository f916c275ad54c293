"""Tiny translation models built from configs, with tokenizers trained here, and a toy en -> es corpus.

Nothing is downloaded: T5 gets a Unigram tokenizer (``tokenizers``), Marian two SentencePiece models
trained with ``sentencepiece`` (what the real MarianTokenizer reads), BART a byte-level BPE, and the
decoder-only case a 2-layer Llama with a byte-level BPE whose pad token is its eos (as SmolLM2's).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch

EN_ES = {"the": "el", "red": "rojo", "house": "casa", "big": "grande", "dog": "perro", "cat": "gato",
         "eats": "come", "sees": "ve", "water": "agua", "bread": "pan", "and": "y", "small": "chico",
         "black": "negro", "runs": "corre", "sleeps": "duerme", "man": "hombre"}


def toy_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(English, Spanish) pairs translated word by word: a mapping a tiny model can learn."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = [rng.choice(sorted(EN_ES)) for _ in range(rng.randint(2, 6))]
        pairs.append((" ".join(words), " ".join(EN_ES[w] for w in words)))
    return pairs


def write_pairs_jsonl(path: Path, pairs: list[tuple[str, str]], src: str = "en", tgt: str = "es") -> Path:
    """The Hub's usual shape: ``{"id": ..., "translation": {src: ..., tgt: ...}}`` per line."""
    with path.open("w", encoding="utf-8") as handle:
        for i, (source, target) in enumerate(pairs):
            handle.write(json.dumps({"id": f"pair-{i}", "translation": {src: source, tgt: target}}) + "\n")
    return path


def _corpus() -> list[str]:
    texts = [side for pair in toy_pairs(400, seed=123) for side in pair]
    return texts + ["translate English to Spanish:", " ".join(EN_ES), " ".join(EN_ES.values())]


def _save_model(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def build_tiny_t5(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.NFKC()
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.train_from_iterator(_corpus(), trainers.UnigramTrainer(
        vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    vocab = [tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]]  # pad, eos, unk first
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=128)
    tokenizer.save_pretrained(folder)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=2,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return _save_model(T5ForConditionalGeneration(config), folder)


def build_tiny_marian(folder: Path) -> Path:
    import sentencepiece as spm
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    pairs = toy_pairs(400, seed=123)
    vocab: dict[str, int] = {}
    for side, index in (("source", 0), ("target", 1)):
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([pair[index] for pair in pairs]), model_writer=model, vocab_size=40,
            hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0, minloglevel=2)
        (folder / f"{side}.spm").write_bytes(model.getvalue())
        processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
        for i in range(processor.get_piece_size()):  # Marian shares one vocabulary between both sides
            vocab.setdefault(processor.id_to_piece(i), len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tokenizer = MarianTokenizer(source_spm=str(folder / "source.spm"), target_spm=str(folder / "target.spm"),
                                vocab=str(folder / "vocab.json"), source_lang="en", target_lang="es",
                                model_max_length=128)
    tokenizer.save_pretrained(folder)
    config = MarianConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                          forced_eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return _save_model(MarianMTModel(config), folder)


def _byte_level_bpe(specials: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(), vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    model = json.loads(bpe._tokenizer.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


def build_tiny_bart(folder: Path) -> Path:
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizer

    vocab, merges = _byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"], 320)
    tokenizer = BartTokenizer(vocab=vocab, merges=merges, model_max_length=128)
    tokenizer.save_pretrained(folder)
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        decoder_start_token_id=tokenizer.eos_token_id, forced_bos_token_id=tokenizer.bos_token_id,
                        init_std=1.0)  # large random weights: greedy outputs that differ between inputs
    torch.manual_seed(0)
    return _save_model(BartForConditionalGeneration(config), folder)


def build_tiny_llama(folder: Path) -> Path:
    """A 2-layer Llama whose tokenizer has pad == eos (``<|im_end|>``), as SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab, merges = _byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], 320)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        bos_token="<|im_start|>", unk_token="<|endoftext|>", model_max_length=256)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
                         initializer_range=0.3)  # large random weights: greedy outputs that differ between inputs
    torch.manual_seed(0)
    return _save_model(LlamaForCausalLM(config), folder)


BUILDERS = {"t5": build_tiny_t5, "marian": build_tiny_marian, "bart": build_tiny_bart, "llama": build_tiny_llama}
