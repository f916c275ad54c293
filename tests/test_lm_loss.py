"""The chunked causal-LM loss (finetune.tasks.lm_loss) is the plain loss: values and gradients, in fp32 and
under bf16 autocast, with LoRA and with full fine-tuning, padded and packed; it never computes the logits of
every position, and a model whose logits are not its output layer's output gets its own loss."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from finetune.tasks import lm_loss
from finetune.tasks.decoding import collate_causal_lm, pack_sft_features, token_nll
from tiny_decoder import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def samples(tokenizer, count: int = 6) -> list[dict]:
    """SFT-like rows: a prompt without targets, then targets, of different lengths."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(count):
        ids = torch.randint(3, len(tokenizer), (7 + 3 * i,), generator=generator).tolist()
        prompt = 3 + i % 3
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def lora(model: torch.nn.Module) -> torch.nn.Module:
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter do something
            torch.nn.init.normal_(param, std=0.2)
    return model


def loss_and_gradients(model: torch.nn.Module, batch: dict, chunked: bool, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = lm_loss.causal_lm_loss(model, batch) if chunked else model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture()
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 5 rows: every batch here spans several chunks."""
    monkeypatch.setattr(lm_loss, "rows_per_chunk", lambda vocab: 5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_loss_equals_the_plain_loss_in_values_and_gradients(tokenizer, small_chunks, kind, method,
                                                                    packed) -> None:
    model = build_model(kind, tokenizer, initializer_range=0.2, dropout=0.0).train()
    if method == "lora":
        model = lora(model)
    rows = samples(tokenizer)
    if packed:
        rows = pack_sft_features(rows, max_length=40)
    batch = collate_causal_lm(rows, tokenizer.pad_token_id, pad_to_multiple_of=8)
    plain = lm_loss.model_inputs(batch)
    expected, expected_grads = loss_and_gradients(model, plain, chunked=False, autocast=False)
    actual, grads = loss_and_gradients(model, batch, chunked=True, autocast=False)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and len(grads) > 2
    if method == "full":  # the output layer (tied to the embeddings) is trained: its gradient too
        assert any("wte" in name or "embed_tokens" in name for name in grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_under_bf16_autocast_matches_within_rounding(tokenizer, small_chunks) -> None:
    model = lora(build_model("llama", tokenizer, initializer_range=0.2, dropout=0.0)).train()
    batch = collate_causal_lm(samples(tokenizer), tokenizer.pad_token_id)
    expected, expected_grads = loss_and_gradients(model, batch, chunked=False, autocast=True)
    actual, grads = loss_and_gradients(model, batch, chunked=True, autocast=True)
    # The same bf16 matmul, the same fp32 log-softmax: equal up to the order of sums
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    for name, grad in expected_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads[name], grad, rtol=0.02, atol=0.01 * scale, msg=name)
    # and not the fp32 result: autocast really applied to the output layer
    fp32, _ = loss_and_gradients(model, batch, chunked=True, autocast=False)
    assert fp32.item() != actual.item()


def test_only_the_last_position_gets_full_logits(tokenizer) -> None:
    model = lora(build_model("llama", tokenizer)).train()
    batch = collate_causal_lm(samples(tokenizer), tokenizer.pad_token_id)
    head = lm_loss.unwrap_causal_lm(model).get_output_embeddings()
    shapes = []
    handle = head.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    try:
        lm_loss.causal_lm_loss(model, batch).backward()
    finally:
        handle.remove()
    assert shapes == [(batch["input_ids"].shape[0], 1, len(tokenizer))]
    # the capture is off again: a plain forward (generation, evaluation without chunks) is untouched
    assert model(**batch).logits.shape == (*batch["input_ids"].shape, len(tokenizer))


def test_token_nll_chunked_equals_plain(tokenizer, small_chunks) -> None:
    model = build_model("gpt2", tokenizer, initializer_range=0.2).eval()
    batch = collate_causal_lm(samples(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        sums, counts = token_nll(model, batch, chunked=True)
        plain_sums, plain_counts = token_nll(model, batch, chunked=False)
    assert torch.equal(counts, plain_counts) and counts.min() > 0
    torch.testing.assert_close(sums, plain_sums, rtol=1e-5, atol=1e-5)


def test_softcapped_logits_fall_back_to_the_models_own_loss(tokenizer, caplog) -> None:
    """Gemma 2 softcaps its logits after the output layer: the chunked loss would differ, so the model's own
    loss is used (and said so)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
                          initializer_range=0.5, pad_token_id=tokenizer.pad_token_id)
    model = Gemma2ForCausalLM(config).train()
    batch = collate_causal_lm(samples(tokenizer), tokenizer.pad_token_id)
    expected = model(**batch).loss
    with caplog.at_level("WARNING"):
        actual = lm_loss.causal_lm_loss(copy.deepcopy(model), batch)
    torch.testing.assert_close(actual, expected)
    assert "not the output layer's output" in caplog.text


def test_decoder_translation_loss_chunked_equals_plain(tmp_path, small_chunks) -> None:
    """The translation task's training loss on a decoder-only model (``train.chunked_loss``, the default) is the
    model's own loss, values and gradients; the prompt (the source sentence) has no targets."""
    import datasets

    from conftest import bound_task
    from finetune.models import load_pretrained, resolve_checkpoint
    from finetune.recipes import RECIPES_DIR, load_config
    from tiny_translation import build_tiny_llama, toy_pairs, write_pairs_jsonl

    folder = build_tiny_llama(tmp_path / "llama")
    data = write_pairs_jsonl(tmp_path / "pairs.jsonl", toy_pairs(20))
    config = load_config(RECIPES_DIR / "translate-seq2seq.yaml", [
        f"model.name_or_path={folder}", "data.source=files", f"data.train_file={data}", "data.max_length=48"])
    assert config.train.chunked_loss
    task = bound_task(config)
    assert task.learned.kind == "decoder"
    examples = datasets.Dataset.from_dict({"id": ["a", "b", "c"], "source": ["the dog", "the big red house", "a"],
                                           "target": ["el perro", "el grande rojo casa", "una"]})
    batch = task.collate(list(task.features(examples, "train")))
    model = lora(load_pretrained(task.auto_class, resolve_checkpoint(config.model), config.model)).train()
    head = lm_loss.unwrap_causal_lm(model).get_output_embeddings()
    results = []
    for chunked in (True, False):
        task.config.train.chunked_loss = chunked
        model.zero_grad(set_to_none=True)
        shapes = []
        handle = head.register_forward_hook(lambda module, args, output: shapes.append(output.shape[1]))
        loss = task.loss(model, batch)
        handle.remove()
        assert shapes == [1 if chunked else batch["input_ids"].shape[1]]  # chunked: no full logits
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (chunked_loss, chunked_grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert chunked_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
