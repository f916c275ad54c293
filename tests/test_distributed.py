"""Several processes on CPU (gloo), launched like users launch them: the same results as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import build_tiny_bert, synthetic_reviews, tiny_overrides, write_csv
from finetune.checkpoints import FAULT_ENV
from finetune.evaluation import evaluate_run
from finetune.trained_run import load_run

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parent.parent
# Full fine-tuning so the tiny model learns; constant schedule; validation every 5 steps.
SETTINGS = {"lora.method": "full", "train.learning_rate": 0.003, "train.epochs": 5, "train.scheduler": "constant",
            "train.warmup_ratio": 0, "train.eval_every_steps": 15, "train.save_every_steps": 8,
            "train.log_every_steps": 1, "train.keep_checkpoints": 2,
            # Plain shuffled batches: the 2-process step sees exactly the 16 examples of the 1-process step.
            "train.group_by_length": False}


def launch(nproc: int, args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    """``torchrun`` with accelerate on CPU, as `make finetune NPROC=2` does without GPUs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29500 + os.getpid() % 1000), "-m", "finetune", "train", "classify", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One process with batch 16 and two processes with batch 8 each: the same global batch, the same
    examples in each step, and a model without dropout, so the two runs do the same arithmetic up to the
    order of floating-point sums.
    600 train rows -> 120 validation + 480 train (30 steps per epoch, 5 epochs); a test file of 21 rows (odd)."""
    folder = tmp_path_factory.mktemp("distributed")
    tiny_bert = build_tiny_bert(folder / "tiny-bert", dropout=0.0)
    data = write_csv(folder / "reviews.csv", synthetic_reviews(600))
    test = write_csv(folder / "test.csv", synthetic_reviews(21, seed=5))
    extra = {**SETTINGS, "data.test_file": test, "data.validation_size": 0.2}
    one = launch(1, tiny_overrides(tiny_bert, data, folder / "one", **extra, **{"train.batch_size": 16}))
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(2, tiny_overrides(tiny_bert, data, folder / "two", **extra, **{"train.batch_size": 8}))
    assert two.returncode == 0, two.stderr[-3000:]
    return {"one": folder / "one" / "tiny", "two": folder / "two" / "tiny", "data": data, "folder": folder,
            "extra": extra, "model": tiny_bert}


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "split" not in r]


def test_two_processes_match_one_process_of_the_same_global_batch(runs: dict[str, Path]) -> None:
    one, two = metrics(runs["one"]), metrics(runs["two"])
    assert one["global_step"] == two["global_step"] == 150
    # Same examples per step, no dropout: only the order of floating-point sums differs (gradients are
    # averaged across processes), and over 150 steps those differences grow. Tolerance: each loss of the
    # first epoch within 0.05; the mean loss of the last epoch (30 steps) within 0.05; test accuracy
    # within two examples of the 21.
    one_losses, two_losses = train_losses(runs["one"]), train_losses(runs["two"])
    assert len(one_losses) == len(two_losses) == 150
    for a, b in zip(one_losses[:30], two_losses[:30]):
        assert abs(a - b) <= 0.05
    assert abs(sum(one_losses[-30:]) / 30 - sum(two_losses[-30:]) / 30) <= 0.05
    assert abs(one["test"]["accuracy"] - two["test"]["accuracy"]) <= 2 / 21 + 1e-9
    assert two["test"]["accuracy"] >= two["baseline"]["accuracy"] + 0.15  # it did learn
    launched = (runs["two"] / "train_log.jsonl").read_text()
    assert launched  # only the main process writes, so each step appears once
    steps = [json.loads(line)["step"] for line in launched.splitlines() if "split" not in json.loads(line)]
    assert steps == list(range(1, 151))


def test_effective_batch_is_reported(runs: dict[str, Path]) -> None:
    result = launch(2, tiny_overrides(runs["model"], runs["data"], runs["folder"] / "report", **runs["extra"], **{
        "train.batch_size": 8, "train.gradient_accumulation_steps": 2, "train.max_steps": 1}))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "effective batch 32 = 8 per device x 2 process(es) x 2 accumulation" in result.stdout


def test_held_out_metric_counts_each_example_once(runs: dict[str, Path]) -> None:
    """21 test examples over 2 processes: accelerate repeats one to even out the last round;
    gather_for_metrics drops it, so the metric equals a single-process evaluation exactly."""
    saved = metrics(runs["two"])["test"]
    single = evaluate_run(load_run(runs["two"])).metrics
    assert saved["accuracy"] == single["accuracy"]
    assert saved["per_class"] == single["per_class"]
    assert saved["loss"] == pytest.approx(single["loss"], abs=1e-6)
    predictions = [json.loads(line) for line in (runs["two"] / "predictions_test.jsonl").read_text().splitlines()]
    assert len(predictions) == metrics(runs["two"])["split_sizes"]["test"] == 21
    assert [p["text"] for p in predictions] == [p["text"] for p in
                                               map(json.loads, (runs["one"] / "predictions_test.jsonl")
                                                   .read_text().splitlines())]


def test_two_process_run_killed_and_resumed_finishes_like_uninterrupted(runs: dict[str, Path]) -> None:
    args = tiny_overrides(runs["model"], runs["data"], runs["folder"] / "killed", **runs["extra"], **{"train.batch_size": 8})
    killed = launch(2, args, fault="kill-after-step:50")
    assert killed.returncode != 0
    run_dir = runs["folder"] / "killed" / "tiny"
    assert not (run_dir / "metrics.json").exists()
    resumed = launch(2, args + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step-00000048" in resumed.stdout
    ours = load_file(str(run_dir / "model" / "model.safetensors"))
    reference = load_file(str(runs["two"] / "model" / "model.safetensors"))
    worst = max(float((ours[k] - reference[k]).abs().max()) for k in reference)
    assert worst <= 1e-6, worst
    assert metrics(run_dir)["test"]["accuracy"] == metrics(runs["two"])["test"]["accuracy"]
    assert signal.SIGKILL  # the fault kills each process with SIGKILL at step 50
