"""Generation task: SFT labels, truncation, packing, batched generation, GGUF cache, bad input, and a
tiny decoder through train -> eval -> predict on the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from finetune.config import ModelConfig
from finetune.models import Checkpoint
from finetune.data import load_raw
from finetune.errors import DataError
from finetune.recipes import load_config
from finetune.tasks.decoding import (
    IGNORE_INDEX,
    build_sft_features,
    collate_causal_lm,
    encode_prompt,
    format_prompt,
    generate_batched,
    pack_sft_features,
)
from finetune.tasks.generation import GenerationLearned, GenerationTask
from finetune.tasks.lm_loss import causal_lm_loss
from tiny_decoder import build_checkpoint, build_model, build_tokenizer, synthetic_pairs, write_gguf

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


def sft_samples(tokenizer, pairs: list[dict[str, str]], max_length: int = 64) -> list[dict]:
    samples = []
    for pair in pairs:
        text = format_prompt(tokenizer, pair["prompt"])
        samples.append(build_sft_features(encode_prompt(tokenizer, text, True),
                                          tokenizer(pair["response"], add_special_tokens=False)["input_ids"],
                                          tokenizer.eos_token_id, max_length))
    return samples


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- labels and truncation --------------------------------------------------------------------------
def test_labels_mask_the_prompt_and_keep_eos_when_pad_is_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap: masking by pad id would drop EOS
    prompt = encode_prompt(tokenizer, format_prompt(tokenizer, "what color is the sky?"), True)
    response = tokenizer("the sky is blue.", add_special_tokens=False)["input_ids"]
    feature = build_sft_features(prompt, response, tokenizer.eos_token_id, max_length=64)
    assert feature["input_ids"] == prompt + response + [tokenizer.eos_token_id]
    assert feature["labels"] == [IGNORE_INDEX] * len(prompt) + response + [tokenizer.eos_token_id]
    assert feature["prompt_length"] == len(prompt) and not feature["truncated"]

    other = build_sft_features(prompt[:3], response[:2], tokenizer.eos_token_id, max_length=64)
    batch = collate_causal_lm([feature, other], tokenizer.pad_token_id, pad_to_multiple_of=8)
    # EOS keeps its label in both rows; the padding (the same token id) does not.
    assert batch["labels"][1, 5].item() == tokenizer.eos_token_id
    assert (batch["labels"][1, 6:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, 6:] == tokenizer.eos_token_id).all()
    assert batch["attention_mask"][1].tolist() == [1] * 6 + [0] * (batch["input_ids"].shape[1] - 6)


def test_truncation_policy():
    eos = 99
    prompt, response = list(range(1, 21)), list(range(101, 106))  # 20 + 5 + EOS = 26 tokens
    cut = build_sft_features(prompt, response, eos, max_length=16)
    # The response fits: it stays whole with EOS, the prompt loses its start.
    assert cut["truncated"] and cut["input_ids"] == prompt[-10:] + response + [eos]
    assert cut["labels"][-6:] == response + [eos] and len(cut["input_ids"]) == 16

    long_response = list(range(101, 131))  # 30 tokens: cannot fit
    cut = build_sft_features(prompt, long_response, eos, max_length=16)
    # The prompt keeps half the budget; the response is cut and gets no EOS (never taught to stop mid-answer).
    assert cut["input_ids"] == prompt[-8:] + long_response[:8]
    assert eos not in cut["labels"] and cut["prompt_length"] == 8

    assert build_sft_features(prompt, response, eos, max_length=16, overlength="drop") is None
    assert not build_sft_features(prompt[:4], response, eos, max_length=16)["truncated"]


# --- packing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,attn", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")])
def test_packed_loss_equals_unpacked_loss(tokenizer, kind, attn):
    """The loss is the mean over target tokens of the batch. Packed rows (positions restart per sample,
    no attention mask: transformers builds a block-diagonal causal mask) give the same loss as the
    same samples padded one per row."""
    # Train mode (models create a KV cache by default there too); dropout 0: no randomness. A larger
    # initialisation makes outputs depend on the context, so a leak across samples shows.
    model = build_model(kind, tokenizer, attn_implementation=attn, initializer_range=0.2, dropout=0.0).train()
    samples = sft_samples(tokenizer, synthetic_pairs(5, seed=3))
    lengths = [len(s["input_ids"]) for s in samples]
    packed_rows = pack_sft_features(samples, max_length=sum(lengths[:3]))
    assert len(packed_rows) == 2  # three samples share the first row, two the second
    with torch.no_grad():
        unpacked = model(**collate_causal_lm(samples, tokenizer.pad_token_id)).loss
        packed_batch = collate_causal_lm(packed_rows, tokenizer.pad_token_id, pad_to_multiple_of=8)
        assert "attention_mask" not in packed_batch
        packed = model(**packed_batch).loss
        # Control: the same packed rows with plain positions attend across samples and differ.
        crossing = {**packed_batch, "position_ids": torch.arange(packed_batch["input_ids"].shape[1]).expand(2, -1)}
        leaky = model(**crossing).loss
        # The same rows with a KV cache: transformers skips packed-sequence detection, samples leak.
        cached = model(**{**packed_batch, "use_cache": True}).loss
        # The chunked loss (train.chunked_loss, the default) on the packed rows: the same loss again.
        chunked = causal_lm_loss(model, packed_batch)
        chunked_unpacked = causal_lm_loss(model, collate_causal_lm(samples, tokenizer.pad_token_id))
    assert packed.item() == pytest.approx(unpacked.item(), rel=1e-5)  # fp32 sums in another order
    assert chunked.item() == pytest.approx(unpacked.item(), rel=1e-5)
    assert chunked_unpacked.item() == pytest.approx(unpacked.item(), rel=1e-5)
    # and the packed batch counts its real tokens, not its padding
    assert packed_batch["non_pad_tokens"].item() == sum(lengths)
    assert packed_batch["packed_samples"].item() == len(samples)
    assert abs(leaky.item() - unpacked.item()) > 1e-2
    assert abs(cached.item() - unpacked.item()) > 1e-2


def test_packing_is_on_by_default_where_it_is_exact(tmp_path, tiny_llama_dir):
    """data.packing=auto packs for architectures whose masks transformers builds from packed positions (Llama),
    not for one that has no such masks (Mamba: a recurrent state would carry over from sample to sample)."""
    from transformers import MambaConfig

    from finetune.tasks.decoding import packs_exactly

    assert packs_exactly(str(tiny_llama_dir))[0]
    MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1).save_pretrained(tmp_path / "mamba")
    exact, why = packs_exactly(str(tmp_path / "mamba"))
    assert not exact and "Mamba" in why

    config = load_config(ROOT / "recipes" / "generate.yaml", [
        f"model.name_or_path={tiny_llama_dir}", "data.max_length=64", "data.system_prompt=null"])
    assert config.data.packing == "auto"  # the default, and the recipe's
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_list(synthetic_pairs(40))})
    task = GenerationTask(config)
    task.bind(task.learn(raw, Checkpoint(str(tiny_llama_dir), str(tiny_llama_dir), "local")), build_tokenizer())
    packed = task.features(raw["train"], "train")
    assert "position_ids" in packed.column_names and len(packed) < 40


def test_packing_preprocess_keeps_every_target(tmp_path, tiny_llama_dir):
    config = load_config(ROOT / "recipes" / "generate.yaml", [
        f"model.name_or_path={tiny_llama_dir}", "data.packing=true", "data.max_length=64", "data.system_prompt=null"])
    task = GenerationTask(config)
    task.bind(GenerationLearned("prompt_response"), build_tokenizer())
    examples = datasets.Dataset.from_list(synthetic_pairs(40))
    plain = GenerationTask(load_config(ROOT / "recipes" / "generate.yaml", [
        f"model.name_or_path={tiny_llama_dir}", "data.max_length=64", "data.system_prompt=null"]))
    plain.bind(GenerationLearned("prompt_response"), build_tokenizer())
    packed = task.features(examples, "train")
    unpacked = plain.features(examples, "train")
    assert len(packed) < len(unpacked) and max(packed["length"]) <= 64
    count = lambda rows: sum(sum(t != IGNORE_INDEX for t in labels) for labels in rows["labels"])  # noqa: E731
    assert count(packed) == count(unpacked)


# --- generation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_left_padded_batch_generates_like_one_by_one(tokenizer, kind):
    model = build_model(kind, tokenizer, seed=1, initializer_range=0.2)  # outputs that depend on the context
    texts = ["hi", "what color is the sky?", "good evening, what color is the lemon and the rose?", "hello there"]
    prompts = [encode_prompt(tokenizer, format_prompt(tokenizer, t), True) for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: padding matters
    batched = generate_batched(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    single = [generate_batched(model, tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert all(len(g.token_ids) == 12 or g.ended_with_eos for g in batched)


# --- GGUF ------------------------------------------------------------------------------------------------
def test_gguf_is_converted_once_and_cached(tmp_path, monkeypatch, tokenizer):
    from finetune import models

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    source = build_model("llama", tokenizer, seed=2)
    gguf_path = write_gguf(tmp_path / "tiny.gguf", source, tokenizer)
    calls = []
    real_convert = models._convert_gguf
    monkeypatch.setattr(models, "_convert_gguf", lambda path, out: (calls.append(path), real_convert(path, out)))

    first = models.resolve_checkpoint(ModelConfig(name_or_path=str(gguf_path)))
    second = models.resolve_checkpoint(ModelConfig(name_or_path=str(gguf_path)))
    assert len(calls) == 1 and first == second
    assert first.converted_from == str(gguf_path) and first.gguf_file is None
    assert Path(first.path).parent == tmp_path / "cache" / "models"
    assert not list((tmp_path / "cache" / "models").glob("*.tmp*"))  # converted under a temporary name

    # The cached folder is a plain HF checkpoint with the same weights and tokenizer.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(first.path)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(first.path)
    ids = tokenizer("what color is the sky?", return_tensors="pt")["input_ids"]
    assert reloaded_tokenizer("what color is the sky?")["input_ids"] == ids[0].tolist()
    assert reloaded_tokenizer.eos_token == "<|im_end|>" and reloaded_tokenizer.chat_template
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, source(ids).logits)

    # The folder form (model.gguf_file) is the same file: cached. A changed file is converted anew.
    assert models.resolve_checkpoint(ModelConfig(name_or_path=str(tmp_path), gguf_file="tiny.gguf")).path == first.path
    assert len(calls) == 1
    write_gguf(gguf_path, build_model("llama", tokenizer, seed=3), tokenizer)
    changed = models.resolve_checkpoint(ModelConfig(name_or_path=str(gguf_path)))
    assert len(calls) == 2 and changed.path != first.path


def test_smollm2_hub_id_resolves_to_the_offline_package():
    from finetune.models import OFFLINE_ALIASES, OFFLINE_PACKAGES, _locate_checkpoint

    assert OFFLINE_ALIASES["SmolLM2-135M-Instruct"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    package = OFFLINE_PACKAGES["HuggingFaceTB/SmolLM2-135M-Instruct"]
    located = _locate_checkpoint(ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert located.source == f"package:{package.package}"
    assert (Path(located.path) / located.gguf_file).is_file()


@pytest.mark.real
def test_smollm2_converts_once_and_answers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.models import GGUF_SOURCE_FILE, resolve_checkpoint

    checkpoint = resolve_checkpoint(ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert checkpoint.converted_from.endswith(".gguf")
    assert (Path(checkpoint.path) / GGUF_SOURCE_FILE).is_file()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    model = AutoModelForCausalLM.from_pretrained(checkpoint.path)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    prompt = tokenizer("The capital of France is")["input_ids"]
    result = generate_batched(model, tokenizer, [prompt], max_new_tokens=3)[0]
    assert "Paris" in tokenizer.decode(result.token_ids)


# --- bad input ---------------------------------------------------------------------------------------
def _task_on(path: Path, *overrides: str) -> GenerationTask:
    config = load_config(ROOT / "recipes" / "generate.yaml",
                         ["data.source=files", f"data.train_file={path}", "data.shape=auto", "data.system_prompt=null",
                          *overrides])
    return GenerationTask(config)


def _prepared(task: GenerationTask) -> datasets.DatasetDict:
    """The task learns the shape from its file (no checkpoint needed for that), is bound to the tiny
    tokenizer, and checks every row."""
    raw = load_raw(task.data, 0)
    task.bind(task.learn(raw, checkpoint=None), build_tokenizer())
    return task.prepare(raw)


def test_missing_field_and_empty_response_name_the_row(tmp_path):
    rows = synthetic_pairs(6)
    missing = write_jsonl(tmp_path / "missing.jsonl", rows[:3] + [{"prompt": "hey"}] + rows[3:])
    with pytest.raises(DataError, match=r"missing\.jsonl: row 4, column 'response': missing"):
        _prepared(_task_on(missing))

    empty = write_jsonl(tmp_path / "empty.jsonl", rows[:2] + [{"prompt": "hey", "response": "  "}])
    with pytest.raises(DataError, match=r"empty\.jsonl: row 3, column 'response': empty"):
        _prepared(_task_on(empty))

    no_shape = write_jsonl(tmp_path / "question.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(DataError, match=r"cannot tell the data shape.*question, answer"):
        _prepared(_task_on(no_shape))


def test_overlong_samples_are_truncated_or_dropped_and_counted(tmp_path, tiny_llama_dir, caplog):
    rows = synthetic_pairs(8) + [{"prompt": "tell me a story", "response": " ".join(["once upon a time"] * 30)}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    examples = datasets.Dataset.from_list(rows)
    tokenizer = build_tokenizer()
    for policy, count in (("truncate", 9), ("drop", 8)):
        task = _task_on(path, f"data.overlength={policy}", "data.max_length=48")
        task.bind(GenerationLearned("prompt_response"), tokenizer)
        with caplog.at_level("INFO", logger="finetune.tasks.generation"):
            features = task.features(examples, "test")
        assert len(features) == count and max(features["length"]) <= 48
        assert f"test: 1 of 9 samples longer than data.max_length=48 tokens {policy[:5]}" in caplog.text
        caplog.clear()


def test_messages_train_only_the_last_assistant_turn(tmp_path):
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "what color is the sky?"},
                           {"role": "assistant", "content": "the sky is blue."}]}] * 4
    path = write_jsonl(tmp_path / "chat.jsonl", chats)
    task = _task_on(path)
    prepared = _prepared(task)
    assert task.learned.shape == "messages" and prepared["train"][0]["response"] == "the sky is blue."
    feature = task.features(prepared["train"], "validation")[0]
    targets = [t for t in feature["labels"] if t != IGNORE_INDEX]
    assert task.tokenizer.decode(targets) == "the sky is blue.<|im_end|>"

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 2)
    with pytest.raises(DataError, match=r"row 1, column 'messages': expected a list of at least two"):
        _prepared(_task_on(bad))


# --- end to end on the command line -----------------------------------------------------------------------
def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_tiny_decoder_train_eval_predict_cli(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(160, seed=1))
    result = run_cli(
        "train", "generate", f"model.name_or_path={tiny_llama_dir}", "data.source=files",
        f"data.train_file={data}", "data.shape=auto", "data.system_prompt=null", "data.max_length=48",
        "data.packing=true",
        "lora.method=full", "train.epochs=4", "train.batch_size=16", "train.learning_rate=0.003",
        "train.scheduler=constant", "train.warmup_ratio=0", "train.eval_every_steps=10",
        "train.mixed_precision=no", "eval.generate_samples=8", "eval.max_new_tokens=12", "eval.batch_size=16",
        f"run.output_dir={tmp_path}", "run.name=tiny", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "tiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["perplexity"] < metrics["before_training"]["perplexity"]
    assert metrics["test"]["generated"] == 8 and 0 <= metrics["test"]["eos_share"] <= 1
    assert "before training:" in result.stdout and "sample generations" in result.stdout
    rows = [json.loads(line) for line in (run_dir / "predictions_test.jsonl").read_text().splitlines()]
    generated = [row for row in rows if "generation" in row]
    assert len(generated) == 8 and all({"prompt", "reference", "ended_with_eos"} <= row.keys() for row in generated)
    assert json.loads((run_dir / "source.json").read_text())["path"] == str(tiny_llama_dir)

    result = run_cli("eval", str(run_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"\"perplexity\": {metrics['test']['perplexity']}" in result.stdout.replace(",\n", "\n")

    result = run_cli("predict", str(run_dir), "--prompt", "what color is the snow?", "--prompt", "hey",
                     "--stream", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    outputs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["prompt"] for o in outputs] == ["what color is the snow?", "hey"]
    assert all(isinstance(o["generation"], str) and o["new_tokens"] > 0 for o in outputs)
    # The streamed text went to stderr, each answer after its prompt.
    assert "> what color is the snow?\n" + outputs[0]["generation"] in result.stderr

    quiet = run_cli("predict", str(run_dir), "--prompt", "what color is the snow?", "--no-stream", cwd=tmp_path)
    assert quiet.returncode == 0 and "> what color" not in quiet.stderr
    assert json.loads(quiet.stdout)["generation"] == outputs[0]["generation"]  # greedy: same answer


def test_bad_file_fails_cleanly_on_the_cli(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(10) + [{"prompt": "hi", "response": ""}])
    result = run_cli("train", "generate", f"model.name_or_path={tiny_llama_dir}", "data.source=files",
                     f"data.train_file={data}", f"run.output_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert f"error: {data}: row 11, column 'response': empty" in result.stderr
    assert "Traceback" not in result.stderr


def test_plain_text_language_modelling(tmp_path, tiny_llama_dir):
    story = "once upon a time there was a little cat who liked to sleep in the sun all day long.\n"
    text = tmp_path / "story.txt"
    text.write_text((story + "\n") * 60, encoding="utf-8")
    result = run_cli("train", "generate-text", f"model.name_or_path={tiny_llama_dir}", "data.source=files",
                     f"data.train_file={text}", "data.text_column=text",
                     "data.max_length=32", "lora.method=full", "train.epochs=2", "train.learning_rate=0.003",
                     "train.mixed_precision=no", f"run.output_dir={tmp_path}", "run.name=text", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "text" / "metrics.json").read_text())
    assert metrics["test"]["perplexity"] < metrics["before_training"]["perplexity"]
    assert "rougeL" not in metrics["test"]  # plain text has no prompts to answer
    result = run_cli("predict", str(tmp_path / "text"), "--prompt", "once upon a", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["generation"]


def test_plain_text_writes_one_prediction_row_per_test_block_and_warns_of_a_tiny_test_split(
        tmp_path, tiny_llama_dir, capsys):
    """Plain text is evaluated in blocks of data.max_length tokens: predictions_test.jsonl has one row per block
    (its loss), and the first eval.generate_samples blocks also a continuation of their first half beside the
    second half. A test split of a few lines gives meaningless numbers: the run says so."""
    from finetune.train import train

    lines = ["once upon a time there was a little cat who liked to sleep in the sun all day long."] * 40
    text = tmp_path / "story.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = load_config(ROOT / "recipes" / "generate-text.yaml", [
        f"model.name_or_path={tiny_llama_dir}", "data.source=files", f"data.train_file={text}",
        "data.text_column=text", "data.max_length=16", "data.test_size=0.05", "data.validation_size=0.05",
        "eval.generate_samples=2", "eval.max_new_tokens=8", "eval.before_training=false", "train.max_steps=2",
        "train.mixed_precision=no", f"run.output_dir={tmp_path}", "run.name=text"])
    run_dir = train(config, "generate-text")
    out = capsys.readouterr().out
    assert "warning: the test split has only 2 examples" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert any("the test split has only 2 examples" in w for w in metrics["warnings"])
    rows = [json.loads(line) for line in (run_dir / "predictions_test.jsonl").read_text().splitlines()]
    assert rows, "predictions_test.jsonl is empty"
    tokens = sum(row["tokens"] for row in rows)
    assert tokens == metrics["test"]["target_tokens"]  # every evaluated block has its row
    generated = [row for row in rows if "generation" in row]
    assert len(generated) == min(2, len(rows))
    for row in generated:
        assert row["prompt"] and row["reference"] and isinstance(row["generation"], str)
    assert all(isinstance(row["loss"], float) for row in rows)
