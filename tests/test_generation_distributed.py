"""Generation evaluation across processes (CPU, gloo): the same perplexity and generations as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
