"""Memory options: activation checkpointing gives the same gradients with LoRA and the speed options, and a run
reports its peak memory (and counts the real tokens of packed rows) in metrics.json."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from finetune import speed
from conftest import bound_task
from finetune.config import LoraSettings, TrainConfig
from finetune.data import load_splits
from finetune.models import enable_gradient_checkpointing
from finetune.recipes import RECIPES_DIR, load_config
from finetune.tasks.decoding import collate_causal_lm
from finetune.tasks.lm_loss import causal_lm_loss
from finetune.train import train
from tiny_decoder import build_checkpoint, build_model, build_tokenizer, synthetic_pairs


def batch(tokenizer) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in (9, 14, 20):
        ids = torch.randint(3, len(tokenizer), (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    return collate_causal_lm(rows, tokenizer.pad_token_id)


@pytest.mark.parametrize("speed_options", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients_with_lora(speed_options: bool) -> None:
    """LoRA freezes every base weight, so a checkpointed block gets gradients only because the embeddings' output
    requires them; dropout (in LoRA and in attention) draws the same masks when a block is recomputed."""
    tokenizer = build_tokenizer()
    base = build_model("llama", tokenizer, initializer_range=0.2, dropout=0.1).train()
    models = []
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        if checkpointing:
            enable_gradient_checkpointing(model)
        torch.manual_seed(0)  # the same LoRA initialisation
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.1,
                                                 target_modules="all-linear"))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.2, generator=torch.Generator().manual_seed(len(name)))
        if speed_options:
            notes = speed.apply_speed_options(model, TrainConfig(), LoraSettings(), "no", on_gpu=False)
            assert any(note.startswith("fused LoRA (14") for note in notes), notes
        models.append(model.train())

    layer_calls = []
    hook = models[1].get_base_model().model.layers[0].mlp.register_forward_pre_hook(lambda *args: layer_calls.append(1))
    results = []
    for model in models:
        torch.manual_seed(3)
        loss = causal_lm_loss(model, batch(tokenizer))
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    hook.remove()
    assert len(layer_calls) == 2  # the forward, and its recomputation in the backward pass: really checkpointed
    (loss, grads), (checkpointed_loss, checkpointed_grads) = results
    assert checkpointed_loss == loss
    assert grads.keys() == checkpointed_grads.keys() and sum("lora_A" in n for n in grads) == 14
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_refuses_a_model_without_it() -> None:
    from finetune.errors import ConfigError

    class NoCheckpointing(torch.nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):
        enable_gradient_checkpointing(NoCheckpointing())


def test_a_packed_checkpointed_run_reports_peak_memory_and_real_tokens(tmp_path: Path) -> None:
    folder = build_checkpoint(tmp_path / "tiny-llama", "llama")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in synthetic_pairs(120, seed=1)), encoding="utf-8")
    config = load_config(RECIPES_DIR / "generate.yaml", [
        f"model.name_or_path={folder}", "data.source=files", f"data.train_file={data}", "data.system_prompt=null",
        "data.max_length=64", "train.batch_size=4", "train.epochs=1", "train.gradient_checkpointing=true",
        "train.mixed_precision=no", "train.eval_every_steps=null", "eval.generate_samples=0",
        "eval.before_training=false", f"run.output_dir={tmp_path}", "run.name=tiny"])
    assert config.data.packing == "auto" and config.train.chunked_loss
    run_dir = train(config, "generate")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    memory = metrics["peak_memory"]
    assert memory["rss_mib"] > 100 and memory["gpu_mib"] is None
    # tokens counted are the packed rows' real tokens (no padding), over the one epoch
    task = bound_task(config)
    train_examples = load_splits(task, config)["train"]
    train_features = task.features(train_examples, "train")
    assert "position_ids" in train_features.column_names and len(train_features) < len(train_examples)  # packed
    assert metrics["throughput"]["tokens"] == sum(train_features["length"])
    assert metrics["throughput"]["samples"] == len(train_examples)  # samples, not packed rows


def test_split_batch_cuts_rows_within_the_token_budget() -> None:
    from finetune.batching import split_batch

    batch = {"input_ids": torch.arange(5 * 8).view(5, 8), "labels": torch.zeros(5, 8), "note": "kept",
             "scalar": torch.tensor(3)}
    parts = split_batch(batch, max_tokens=16)
    assert [part["input_ids"].shape[0] for part in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([part["input_ids"] for part in parts]), batch["input_ids"])
    assert all(part["note"] == "kept" and part["scalar"] is batch["scalar"] for part in parts)
    assert split_batch(batch, max_tokens=40) == [batch]
    assert len(split_batch(batch, max_tokens=3)) == 5  # at least one row per part


def test_training_in_passes_gives_the_same_adapter_as_one_pass(tmp_path: Path, capsys) -> None:
    """train.max_tokens_per_pass splits each batch of 4 packed rows of 64 tokens into 4 passes; with each pass's
    loss weighted by its share of the batch's target tokens the optimizer sees the same gradients, so the trained
    adapter and the logged losses are those of one pass per batch (dropout off: its masks are drawn per pass)."""
    from safetensors.torch import load_file

    folder = build_checkpoint(tmp_path / "tiny-llama", "llama")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in synthetic_pairs(80, seed=2)), encoding="utf-8")
    adapters, losses = {}, {}
    for budget in ("null", "64"):
        config = load_config(RECIPES_DIR / "generate.yaml", [
            f"model.name_or_path={folder}", "data.source=files", f"data.train_file={data}", "data.system_prompt=null",
            "data.max_length=64", "train.batch_size=4", "train.epochs=1", "lora.dropout=0", "train.learning_rate=0.01",
            f"train.max_tokens_per_pass={budget}", "train.mixed_precision=no", "train.eval_every_steps=null",
            "train.log_every_steps=1", "eval.generate_samples=0", "eval.before_training=false",
            f"run.output_dir={tmp_path}", f"run.name=passes-{budget}"])
        run_dir = train(config, "generate")
        printed = capsys.readouterr().out
        assert ("passes of at most 64 tokens" in printed) == (budget == "64")
        adapters[budget] = load_file(run_dir / "adapter" / "adapter_model.safetensors")
        log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        losses[budget] = [row["loss"] for row in log if "loss" in row and "lr" in row]
    assert len(losses["null"]) >= 3 and losses["64"] == pytest.approx(losses["null"], rel=1e-5)
    assert adapters["64"].keys() == adapters["null"].keys()
    moved = 0
    for name, weight in adapters["null"].items():
        # within a twentieth of one Adam step (lr 0.01): Adam moves an element by about lr whatever its gradient's
        # size, so rounding in a near-zero gradient can show as a part of lr; the losses above are the sharp check
        torch.testing.assert_close(adapters["64"][name], weight, rtol=0, atol=0.01 / 20, msg=name)
        moved += "lora_B" in name and weight.abs().sum() > 0
    assert moved  # LoRA B starts at zero: it trained


def test_max_tokens_per_pass_refuses_skipped_losses_and_bad_values() -> None:
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match="train.on_nonfinite_loss"):
        TrainConfig(max_tokens_per_pass=256, on_nonfinite_loss="skip").validate()
    with pytest.raises(ConfigError, match="train.max_tokens_per_pass"):
        TrainConfig(max_tokens_per_pass=0).validate()
    TrainConfig(max_tokens_per_pass="auto", on_nonfinite_loss="skip").validate()  # auto then trains in one pass


def test_a_pass_without_target_tokens_is_left_out() -> None:
    """A part of a batch whose rows have no targets (e.g. responses cut away) would have a nan loss (0 / 0); it
    adds nothing to the gradient, so it is not trained, while the batch as a whole still is."""
    from types import SimpleNamespace

    from finetune.tasks.generation import GenerationTask
    from finetune.train import TrainingRun

    labels = torch.full((4, 8), -100)
    labels[2:, 3:] = 7  # rows 0 and 1: no targets
    batch = {"input_ids": torch.ones(4, 8, dtype=torch.long), "labels": labels}
    run = SimpleNamespace(max_tokens_per_pass=16, task=GenerationTask.__new__(GenerationTask))
    passes = TrainingRun._passes(run, batch)
    assert [part["input_ids"].shape[0] for part, _ in passes] == [2]
    assert torch.equal(passes[0][0]["labels"], labels[2:]) and passes[0][1] == 1.0
