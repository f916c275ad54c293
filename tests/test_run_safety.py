"""A pulled run never runs code it was not allowed to; one process owns a run folder at a time; only a
recognisable run folder is ever cleared or resumed; a run that failed while starting blocks nothing."""

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
import yaml
from huggingface_hub import HfApi

from conftest import synthetic_reviews, tiny_overrides, write_csv
from finetune.errors import RunFolderError
from finetune.recipes import RECIPES_DIR, load_config
from finetune.run_folder import RunFolder
from finetune.trained_run import without_code_settings
from hub_server import HubServer, hub_server  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
EVIL_CODE = '''
import os
from transformers import BertForSequenceClassification

with open(os.environ["EVIL_MARKER"], "w") as marker:  # runs when transformers imports this file
    marker.write("remote code ran")


class EvilBert(BertForSequenceClassification):
    pass
'''


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=600)


def test_a_pulled_run_never_runs_the_code_its_config_asks_for(hub_server: HubServer, tiny_bert: Path,  # noqa: F811
                                                               tmp_path: Path) -> None:
    from finetune.hub import push
    from finetune.train import train

    api = HfApi()
    api.create_repo("test-user/tiny-bert")
    api.upload_folder(repo_id="test-user/tiny-bert", folder_path=str(tiny_bert))
    # A base whose config maps the classifier to a .py file that leaves a marker when imported.
    evil = tmp_path / "evil-base"
    shutil.copytree(tiny_bert, evil)
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "evil.EvilBert"}
    (evil / "config.json").write_text(json.dumps(config))
    (evil / "evil.py").write_text(EVIL_CODE)
    api.create_repo("test-user/evil-base")
    api.upload_folder(repo_id="test-user/evil-base", folder_path=str(evil))

    data = write_csv(tmp_path / "reviews.csv", synthetic_reviews(60))
    run_dir = train(load_config(RECIPES_DIR / "classify.yaml", tiny_overrides(
        Path("test-user/tiny-bert"), data, tmp_path / "runs", **{"train.epochs": 1})), "classify")
    # What a malicious pusher changes: the run's own config asks for that base and for remote code.
    saved = yaml.safe_load(RunFolder(run_dir).config.read_text())
    saved["model"].update(name_or_path="test-user/evil-base", trust_remote_code=True, allow_pickle=True)
    RunFolder(run_dir).config.write_text(yaml.safe_dump(saved))
    push(run_dir, "test-user/evil-run")

    marker = tmp_path / "marker"
    predicted = cli("predict", "test-user/evil-run", "--text", "a good movie", EVIL_MARKER=str(marker))
    assert not marker.exists(), "the pulled run's config made predict run its base's code"
    assert "sets model.trust_remote_code: true" in predicted.stderr and "not trusted" in predicted.stderr
    assert "sets model.allow_pickle: true" in predicted.stderr
    assert predicted.returncode == 0 and "Traceback" not in predicted.stderr, predicted.stderr[-2000:]
    assert json.loads(predicted.stdout.splitlines()[0])["text"] == "a good movie"
    # A push carries no local paths, so the user says where the run's data lives.
    evaluated = cli("eval", "test-user/evil-run", f"data.train_file={data}", EVIL_MARKER=str(marker))
    assert evaluated.returncode == 0 and not marker.exists(), evaluated.stderr[-2000:]

    # The user's own command line is what may allow it (and then the code does run: the gate is real).
    allowed = cli("predict", "test-user/evil-run", "model.trust_remote_code=true", "--text", "a good movie",
                  EVIL_MARKER=str(marker))
    assert marker.exists(), allowed.stderr[-2000:]


def test_code_settings_come_only_from_the_users_overrides(tmp_path: Path) -> None:
    config = load_config(RECIPES_DIR / "classify.yaml", ["model.trust_remote_code=true", "model.allow_pickle=true"])
    run = RunFolder(tmp_path)
    assert not without_code_settings(config, [], run).model.trust_remote_code
    assert not without_code_settings(config, [], run).model.allow_pickle
    kept = without_code_settings(config, ["model.trust_remote_code=true"], run)
    assert kept.model.trust_remote_code and not kept.model.allow_pickle


# --- one owner at a time -------------------------------------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from finetune.run_folder import RunLock
lock = RunLock.take(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_training_into_a_held_run_folder_is_refused_until_the_holder_dies(
        tiny_bert: Path, tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "runs" / "tiny")
    run.path.mkdir(parents=True)
    run.config.write_text("run:\n  task: classification\n", encoding="utf-8")  # a run that never got far
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run.lock_file)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        data = write_csv(tmp_path / "reviews.csv", synthetic_reviews(60))
        args = ["train", "classify", *tiny_overrides(tiny_bert, data, tmp_path / "runs", **{"train.epochs": 1})]
        refused = cli(*args)
        assert refused.returncode == 2
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and f"is in use by pid {holder.pid} on" in errors[0], refused.stderr[-2000:]
        assert not run.metrics.exists() and run.config.read_text() == "run:\n  task: classification\n"
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: it never releases the lock itself
        holder.wait(timeout=30)
    started = time.monotonic()
    trained = cli(*args)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert run.is_finished() and time.monotonic() - started < 600


# --- what may be cleared or resumed ---------------------------------------------------------------------
def test_only_a_run_folder_is_cleared_and_a_users_folder_is_left_untouched(tmp_path: Path) -> None:
    mine = RunFolder(tmp_path / "mine")
    (mine.path / "photos").mkdir(parents=True)
    (mine.path / "notes.txt").write_text("mine")
    for overwrite, resume in ((True, None), (False, "auto"), (False, None)):
        with pytest.raises(RunFolderError, match="is not a finetune run folder"):
            mine.open_for_training(overwrite=overwrite, resume=resume)
    assert sorted(p.name for p in mine.path.iterdir()) == ["notes.txt", "photos"]
    # A run folder into which the user put a file of their own is not cleared either.
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.config.write_text("run:\n  task: classification\n")
    run.metrics.write_text("{}")
    (run.path / "my-analysis.ipynb").write_text("{}")
    with pytest.raises(RunFolderError, match=r"is not a finetune run folder \(my-analysis.ipynb\)"):
        run.open_for_training(overwrite=True, resume=None)
    assert (run.path / "my-analysis.ipynb").exists() and run.metrics.exists()


def test_overwrite_clears_a_finished_run_and_resume_needs_a_run(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    with pytest.raises(RunFolderError, match="there is no run at .* to resume"):
        run.open_for_training(overwrite=False, resume="auto")
    assert not run.path.exists()
    run.path.mkdir()
    run.config.write_text("run:\n  task: classification\n")
    run.metrics.write_text("{}")
    with pytest.raises(RunFolderError, match="holds a finished run"):
        run.open_for_training(overwrite=False, resume=None)
    lock = run.open_for_training(overwrite=True, resume=None)
    lock.release()
    assert [p.name for p in run.path.iterdir()] == [".lock"]


def test_a_run_that_failed_while_starting_does_not_block_its_name(tiny_bert: Path, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "reviews.csv", synthetic_reviews(60))
    args = ["train", "classify", *tiny_overrides(tiny_bert, data, tmp_path / "runs", **{"train.epochs": 1})]
    failed = cli(*args, "data.label_column=stars")  # fails after the run folder was made
    assert failed.returncode == 2 and "no column 'stars'" in failed.stderr
    assert RunFolder(tmp_path / "runs" / "tiny").config.is_file()
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
