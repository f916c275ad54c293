"""Generation evaluation across processes (CPU, gloo): the same perplexity and generations as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.evaluation import evaluate_run
from finetune.trained_run import load_run
from tiny_decoder import build_checkpoint, synthetic_pairs

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parent.parent


def test_two_process_evaluation_equals_one_process(tmp_path: Path) -> None:
    """21 test pairs (odd, and batches of 4: the last round is uneven), 9 of them generated for.
    Token-weighted loss, perplexity, ROUGE-L and the generations must equal a single-process
    evaluation of the same run: every example counted once, generated once."""
    model = build_checkpoint(tmp_path / "tiny", "llama")
    train = tmp_path / "train.jsonl"
    test = tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(64, seed=4)), encoding="utf-8")
    test.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(21, seed=5)), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29500 + os.getpid() % 1000), "-m", "finetune", "train", "generate",
               f"model.name_or_path={model}", "data.source=files", f"data.train_file={train}",
               f"data.test_file={test}", "data.system_prompt=null", "data.max_length=48", "lora.method=full",
               "train.max_steps=4", "train.batch_size=8", "train.mixed_precision=no", "eval.batch_size=4",
               "eval.generate_samples=9", "eval.max_new_tokens=6", "eval.before_training=false",
               f"run.output_dir={tmp_path}", "run.name=two"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "two"
    saved = json.loads((run_dir / "metrics.json").read_text())["test"]
    single = evaluate_run(load_run(run_dir)).metrics
    assert saved["target_tokens"] == single["target_tokens"]
    assert saved["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert saved["perplexity"] == pytest.approx(single["perplexity"], rel=1e-6)
    assert saved["generated"] == single["generated"] == 9
    assert (saved["rougeL"], saved["eos_share"], saved["mean_new_tokens"]) == \
        (single["rougeL"], single["eos_share"], single["mean_new_tokens"])
    rows = [json.loads(line) for line in (run_dir / "predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == 21 and sum("generation" in row for row in rows) == 9


@pytest.mark.slow
def test_two_processes_training_in_passes_give_the_adapter_of_one_pass(tmp_path: Path) -> None:
    """With DDP only the last pass of a batch synchronises gradients (the others run under no_sync): two
    processes training batches of 8 rows of 48 tokens in passes of 96 tokens (4 passes) end with the same adapter
    as two processes training each batch in one pass: the same logged losses, and weights within a twentieth of
    one Adam step (Adam's first steps are about lr per element whatever the gradient's size, so rounding in a
    near-zero gradient can move an element by a part of lr)."""
    from safetensors.torch import load_file

    model = build_checkpoint(tmp_path / "tiny", "llama")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(96, seed=6)), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    adapters, losses = {}, {}
    for budget in ("null", "96"):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(29600 + os.getpid() % 1000 + len(adapters)), "-m", "finetune", "train", "generate",
                   f"model.name_or_path={model}", "data.source=files", f"data.train_file={train}",
                   "data.system_prompt=null", "data.max_length=48", "data.packing=false", "lora.dropout=0",
                   "train.max_steps=3", "train.batch_size=8", "train.learning_rate=0.01", "train.mixed_precision=no",
                   f"train.max_tokens_per_pass={budget}", "train.eval_every_steps=null", "train.log_every_steps=1",
                   "eval.generate_samples=0",
                   "eval.before_training=false", f"run.output_dir={tmp_path}", f"run.name=passes-{budget}"]
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("passes of at most 96 tokens" in result.stdout) == (budget == "96")
        adapters[budget] = load_file(tmp_path / f"passes-{budget}" / "adapter" / "adapter_model.safetensors")
        log = (tmp_path / f"passes-{budget}" / "train_log.jsonl").read_text().splitlines()
        losses[budget] = [row["loss"] for row in map(json.loads, log) if "loss" in row and "lr" in row]
    assert len(losses["null"]) == 3 and losses["96"] == pytest.approx(losses["null"], rel=1e-5)
    assert adapters["96"].keys() == adapters["null"].keys()
    for name, weight in adapters["null"].items():
        torch.testing.assert_close(adapters["96"][name], weight, rtol=0, atol=0.01 / 20, msg=name)
    assert any("lora_B" in name and weight.abs().sum() > 0 for name, weight in adapters["null"].items())
