"""What checkpoints hold and what a finished run keeps: a LoRA run's checkpoints carry the trainable weights and
the optimizer state, not the frozen base; after a clean finish only ``train.keep_checkpoints`` of them stay
(none by default), and the best weights always do. Exact resume from such checkpoints: tests/test_resume.py."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from conftest import synthetic_reviews, tiny_overrides, write_csv
from finetune.checkpoints import complete_checkpoints
from finetune.recipes import RECIPES_DIR, load_config
from finetune.run_folder import RunFolder
from finetune.train import train


def tiny_run(tiny_bert: Path, tmp_path: Path, name: str, **extra: object) -> RunFolder:
    data = write_csv(tmp_path / "reviews.csv", synthetic_reviews(120))
    settings = {"train.save_every_steps": 2, "train.epochs": 1, "run.name": name, **extra}
    return RunFolder(train(load_config(RECIPES_DIR / "classify.yaml", tiny_overrides(tiny_bert, data, tmp_path,
                                                                                     **settings)), "classify"))


def test_a_lora_checkpoint_holds_the_trainable_weights_not_the_frozen_base(tiny_bert: Path, tmp_path: Path) -> None:
    run = tiny_run(tiny_bert, tmp_path, "kept", **{"train.keep_checkpoints": 1})
    kept = complete_checkpoints(run)
    assert len(kept) == 1
    files = {p.name for p in kept[0].iterdir()}
    assert "model.safetensors" not in files, files  # accelerate's whole-model file: the frozen base included
    trainable = load_file(str(kept[0] / "trainable.safetensors"))
    # LoRA factors and the head trained whole (the classifier and the pooler before it: modules_to_save).
    head = [name for name in trainable if "lora_" not in name]
    assert trainable and all("classifier" in name or "pooler" in name for name in head), sorted(head)[:5]
    assert any("lora_" in name for name in trainable) and len(head) < len(trainable) / 2
    assert set(trainable) == set(load_file(str(run.best_weights)))
    assert {"optimizer.bin", "scheduler.bin"} <= files


def test_a_finished_run_keeps_no_checkpoint_by_default_but_its_best_weights(tiny_bert: Path, tmp_path: Path) -> None:
    run = tiny_run(tiny_bert, tmp_path, "default")
    assert run.is_finished()
    assert complete_checkpoints(run) == [] and not run.checkpoints.exists()
    assert run.best_weights.is_file()
