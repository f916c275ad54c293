"""PEFT methods through peft: DoRA trains and reloads (and keeps peft's own layers, not the fused LoRA one),
rsLoRA scales by alpha / sqrt(r), and QLoRA on a machine without a CUDA GPU stops with one clear line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_reviews, tiny_overrides, write_csv
from finetune import speed
from finetune.config import LoraSettings, TrainConfig
from finetune.errors import ConfigError
from finetune.evaluation import evaluate_run
from finetune.models import apply_lora
from finetune.recipes import RECIPES_DIR, load_config
from finetune.train import train
from finetune.trained_run import load_run

ROOT = Path(__file__).resolve().parent.parent


def tiny_classifier() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=2))


def test_dora_keeps_peft_layers_instead_of_the_fused_lora_layer() -> None:
    settings = LoraSettings(r=4, alpha=8, use_dora=True)
    model = apply_lora(tiny_classifier(), settings, "SEQ_CLS", ["classifier"])
    notes = speed.apply_speed_options(model, TrainConfig(), settings, "bf16", on_gpu=False)
    assert "fused LoRA and bf16 base off (peft's own layers for DoRA / a 4-bit base)" in notes
    assert speed.fuse_lora_layers(model) == 0  # asked directly, it refuses too
    assert not any("forward" in module.__dict__ for module in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the base was not cast to bf16
    ids = torch.randint(0, 64, (2, 6))
    out = model.train()(input_ids=ids, labels=torch.tensor([0, 1]))
    assert type(out.loss.grad_fn).__name__ != "LoraLinearFunctionBackward"
    out.loss.backward()
    magnitudes = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes and all(p.grad is not None for p in magnitudes)


def test_rslora_scales_by_alpha_over_sqrt_r() -> None:
    for use_rslora, expected in ((False, 16 / 8), (True, 16 / math.sqrt(8))):
        model = apply_lora(tiny_classifier(), LoraSettings(r=8, alpha=16, use_rslora=use_rslora), "SEQ_CLS",
                           ["classifier"])
        layer = model.get_base_model().bert.encoder.layer[0].attention.self.query
        assert layer.scaling["default"] == pytest.approx(expected)


def test_dora_trains_and_reloads(tiny_bert: Path, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "reviews.csv", synthetic_reviews(96))
    config = load_config(RECIPES_DIR / "classify.yaml", tiny_overrides(
        tiny_bert, data, tmp_path, **{"lora.use_dora": True, "train.epochs": 1, "train.eval_every_steps": None}))
    run_dir = train(config, "classify")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    adapter = run_dir / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    # it trained: B starts at zero, and each magnitude starts as the norm of the base weight's rows
    base = load_file(str(tiny_bert / "model.safetensors"))
    magnitudes = {name: value for name, value in weights.items() if "lora_magnitude_vector" in name}
    assert magnitudes and all(value.abs().sum() > 0 for name, value in weights.items() if "lora_B" in name)
    moved = 0
    for name, magnitude in magnitudes.items():
        module = name.split("base_model.model.", 1)[1].split(".lora_magnitude_vector")[0]
        key = module.removeprefix("bert.") + ".weight"  # the checkpoint is a bare BertModel
        moved += not torch.allclose(magnitude, base[key].norm(dim=1), atol=1e-6)
    assert moved == len(magnitudes), (moved, len(magnitudes))
    # reloaded from the run folder, the DoRA model gives exactly the test metrics of the end of training
    again = evaluate_run(load_run(run_dir)).metrics
    assert again["loss"] == metrics["test"]["loss"] and again["accuracy"] == metrics["test"]["accuracy"]


def test_qlora_needs_a_cuda_gpu_one_line(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: QLoRA is allowed here")
    from finetune.models import quantized_loading

    with pytest.raises(ConfigError, match=r"^config key 'lora.quantize' \('4bit', QLoRA\) needs a CUDA GPU"):
        quantized_loading(LoraSettings(quantize="4bit"), "auto")
    with pytest.raises(ConfigError, match="lora.quantize"):
        load_config(RECIPES_DIR / "classify.yaml", ["lora.quantize=8bit"])
    done = subprocess.run([sys.executable, "-m", "finetune", "train", "classify", "lora.quantize=4bit",
                           f"run.output_dir={tmp_path}", "run.name=qlora"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config key 'lora.quantize'"), done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "qlora").exists()
