"""`finetune eval RUN` reproduces the test metrics of metrics.json exactly: same examples, same batches, same
precision and the same kernels as the evaluation at the end of training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import synthetic_reviews, tiny_overrides, write_csv
from finetune.evaluation import evaluate_run
from finetune.recipes import RECIPES_DIR, load_config
from finetune.trained_run import load_run
from finetune.train import train


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_eval_of_a_finished_run_equals_its_metrics_json(tiny_bert: Path, tmp_path: Path, precision: str) -> None:
    """Under bf16 the run trained with the fused LoRA layers (train.fused_lora), whose bf16 roundings differ from
    peft's own layers in the 4th decimal of the loss; evaluation applies the same speed options as training."""
    data = write_csv(tmp_path / "reviews.csv", synthetic_reviews(240))
    config = load_config(RECIPES_DIR / "classify.yaml", tiny_overrides(
        tiny_bert, data, tmp_path, **{"train.mixed_precision": precision, "train.learning_rate": 0.05,
                                      "train.epochs": 3}))
    run_dir = train(config, "classify")
    saved = json.loads((run_dir / "metrics.json").read_text())["test"]
    again = evaluate_run(load_run(run_dir)).metrics
    assert again["loss"] == saved["loss"]  # exactly, not approximately
    assert again["accuracy"] == saved["accuracy"] and again["per_class"] == saved["per_class"]
