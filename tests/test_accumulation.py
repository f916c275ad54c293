"""Gradient accumulation: the optimizer steps once per N micro-batches, never at micro-batch 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import finetune.train as train_module
from conftest import synthetic_reviews, tiny_overrides, write_csv
from finetune.recipes import load_config


def test_optimizer_steps_once_per_accumulation_window(tiny_bert: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    forwards = {"n": 0}
    steps_at: list[int] = []
    zero_grad_at: list[int] = []

    real_apply_lora = train_module.apply_lora

    def apply_lora(*args, **kwargs):
        model = real_apply_lora(*args, **kwargs)

        def count(module, _inputs):
            if module.training:
                forwards["n"] += 1
        model.register_forward_pre_hook(count)
        return model

    real_make_optimizer = train_module.make_optimizer

    def make_optimizer(model, config):
        optimizer = real_make_optimizer(model, config)
        real_step, real_zero_grad = optimizer.step, optimizer.zero_grad

        def step(*args, **kwargs):
            steps_at.append(forwards["n"])
            return real_step(*args, **kwargs)

        def zero_grad(*args, **kwargs):
            zero_grad_at.append(forwards["n"])
            return real_zero_grad(*args, **kwargs)
        optimizer.step, optimizer.zero_grad = step, zero_grad
        return optimizer

    monkeypatch.setattr(train_module, "apply_lora", apply_lora)
    monkeypatch.setattr(train_module, "make_optimizer", make_optimizer)
    data = write_csv(tmp_path / "r.csv", synthetic_reviews(100))
    # 100 rows - 10 test - 10 validation = 80 train rows = 10 micro-batches of 8.
    config = load_config(None, tiny_overrides(tiny_bert, data, tmp_path / "runs", **{
        "train.batch_size": 8, "train.gradient_accumulation_steps": 4, "train.epochs": 1,
        "train.eval_every_steps": None}))
    run_dir = train_module.train(config, "test")
    # Windows of 4 micro-batches, and the last partial window (2) steps at the end of the epoch.
    assert steps_at == [4, 8, 10]
    assert zero_grad_at == steps_at, "gradients are cleared only right after an optimizer step"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 3
