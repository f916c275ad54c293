"""Crash safety: a run killed at any instant resumes mid-epoch and ends exactly like an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_reviews, tiny_overrides, write_csv
from finetune.checkpoints import FAULT_ENV, complete_checkpoints
from finetune.run_folder import RunFolder

ROOT = Path(__file__).resolve().parent.parent


def overrides(tiny_bert: Path, data: Path, out: Path, **extra: object) -> list[str]:
    """LoRA with dropout (so RNG state matters), accumulation 2, two epochs of 10 optimizer steps,
    validation every 3 steps, a checkpoint every 4 steps and at each epoch end, every step logged."""
    values = {"train.batch_size": 8, "train.gradient_accumulation_steps": 2, "train.epochs": 2,
              "train.eval_every_steps": 3, "train.save_every_steps": 4, "train.log_every_steps": 1,
              "train.keep_checkpoints": 3, "lora.dropout": 0.2, "train.learning_rate": 0.01}
    values.update(extra)
    return tiny_overrides(tiny_bert, data, out, **values)


def run_cli(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> dict:
    folder = tmp_path_factory.mktemp("resume")
    # 200 rows -> 160 train rows -> 20 micro-batches of 8 -> 10 optimizer steps per epoch.
    data = write_csv(folder / "reviews.csv", synthetic_reviews(200))
    reference = run_cli(["train", "classify", *overrides(tiny_bert, data, folder / "reference")])
    assert reference.returncode == 0, reference.stderr[-3000:]
    return {"folder": folder, "data": data, "reference": folder / "reference" / "tiny"}


def assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    ours = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    assert worst <= 1e-6, f"max abs weight difference {worst}"
    ours_metrics = json.loads((run_dir / "metrics.json").read_text())
    theirs_metrics = json.loads((reference / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "per_class"):
        assert ours_metrics["test"][key] == theirs_metrics["test"][key]
    assert ours_metrics["test"]["loss"] == pytest.approx(theirs_metrics["test"]["loss"], abs=1e-6)
    assert ours_metrics["best_step"] == theirs_metrics["best_step"]


def assert_log_has_each_step_once(run_dir: Path, reference: Path) -> None:
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "split" not in r]
    eval_steps = [r["step"] for r in records if r.get("split") == "validation"]
    assert train_steps == list(range(1, 21))
    assert len(eval_steps) == len(set(eval_steps)), f"an evaluation ran twice: {eval_steps}"
    expected = [json.loads(line) for line in (reference / "train_log.jsonl").read_text().splitlines()]
    assert eval_steps == [r["step"] for r in expected if r.get("split") == "validation"]
    # Validation results after resuming equal those of the uninterrupted run.
    ours = {r["step"]: r["accuracy"] for r in records if r.get("split") == "validation"}
    assert ours == {r["step"]: r["accuracy"] for r in expected if r.get("split") == "validation"}


@pytest.mark.parametrize("fault", [
    "kill-after-step:5",  # mid-epoch 1: resumes from the checkpoint of step 4
    "kill-in-checkpoint:8",  # while step 8's checkpoint is being written: that one is ignored
    "kill-after-step:13",  # mid-epoch 2, after an epoch-end checkpoint
])
def test_sigkill_then_resume_equals_uninterrupted(setup: dict, tiny_bert: Path, fault: str) -> None:
    out = setup["folder"] / fault.replace(":", "-")
    args = ["train", "classify", *overrides(tiny_bert, setup["data"], out)]
    killed = run_cli(args, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = out / "tiny"
    assert not (run_dir / "metrics.json").exists()
    if fault.startswith("kill-in-checkpoint"):
        assert (run_dir / "checkpoints" / "step-00000008.tmp").is_dir()
    resumed = run_cli(args + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    if fault.startswith("kill-in-checkpoint"):
        assert "ignoring incomplete checkpoint" in resumed.stdout and "step-00000008.tmp" in resumed.stdout
        assert "step-00000004 (step 4" in resumed.stdout
    assert_same_as_reference(run_dir, setup["reference"])
    assert_log_has_each_step_once(run_dir, setup["reference"])


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(setup: dict, tiny_bert: Path) -> None:
    out = setup["folder"] / "sigterm"
    args = ["train", "classify", *overrides(tiny_bert, setup["data"], out, **{"train.epochs": 30})]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "finetune", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    log = out / "tiny" / "train_log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and log.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "stopped by SIGTERM at step" in stderr
    assert f"Resume with: finetune train {out / 'tiny' / 'config.yaml'} --resume auto" in stderr
    state = json.loads((complete_checkpoints(RunFolder(out / "tiny"))[-1] / "trainer_state.json").read_text())
    assert state["global_step"] >= 3


def test_resume_auto_falls_back_past_a_damaged_checkpoint(setup: dict, tiny_bert: Path) -> None:
    out = setup["folder"] / "damaged"
    args = ["train", "classify", *overrides(tiny_bert, setup["data"], out)]
    assert run_cli(args, fault="kill-after-step:13").returncode == -signal.SIGKILL
    run_dir = out / "tiny"
    checkpoints = complete_checkpoints(RunFolder(run_dir))
    assert [p.name for p in checkpoints] == ["step-00000008", "step-00000010", "step-00000012"]
    # Simulate a half-written newest checkpoint (state file present, weights truncated) and a stray
    # folder without its state file.
    weights = checkpoints[-1] / "trainable.safetensors"  # a LoRA run's checkpoint: the trainable weights only
    weights.write_bytes(weights.read_bytes()[:100])
    (run_dir / "checkpoints" / "step-00000013").mkdir()
    resumed = run_cli(args + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-00000012 is damaged" in resumed.stdout and "falling back" in resumed.stdout
    assert "ignoring incomplete checkpoint" in resumed.stdout
    assert "step-00000010 (step 10" in resumed.stdout
    assert_same_as_reference(run_dir, setup["reference"])


def test_resume_refuses_another_config(setup: dict, tiny_bert: Path) -> None:
    out = setup["folder"] / "otherconfig"
    args = ["train", "classify", *overrides(tiny_bert, setup["data"], out)]
    assert run_cli(args, fault="kill-after-step:5").returncode == -signal.SIGKILL
    changed = run_cli(args + ["train.learning_rate=0.5", "--resume", "auto"])
    assert changed.returncode == 2
    assert "train.learning_rate: 0.01 -> 0.5" in changed.stderr


def test_nonfinite_loss_stops_with_the_step(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.cli import main

    data = write_csv(tmp_path / "r.csv", synthetic_reviews(100))
    code = main(["train", "classify", *tiny_overrides(tiny_bert, data, tmp_path, **{"train.learning_rate": 1e30,
                                                                                    "lora.method": "full"})])
    assert code == 2
    assert not (tmp_path / "tiny" / "metrics.json").exists()


def test_nonfinite_loss_skip_counts_batches(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    """With on_nonfinite_loss=skip a NaN batch is skipped, counted, and training goes on."""
    import finetune.train as train_module
    from finetune.cli import main

    real = train_module.apply_lora
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        model = real(*args, **kwargs)

        def hook(module, _inputs, output):
            calls["n"] += 1
            if module.training and calls["n"] == 3:  # the third training forward returns a NaN loss
                output.loss = output.loss * torch.tensor(float("nan"))
            return output
        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_module, "apply_lora", poisoned)
    data = write_csv(tmp_path / "r.csv", synthetic_reviews(100))
    assert main(["train", "classify", *tiny_overrides(tiny_bert, data, tmp_path, **{
        "train.on_nonfinite_loss": "skip", "train.eval_every_steps": None})]) == 0
    metrics = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    assert metrics["skipped_batches"] == 1
    assert "loss is nan; batch skipped (1 so far)" in capsys.readouterr().out
