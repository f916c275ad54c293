"""Pull a pushed run from a real self-hostable Hub mirror: olah (PyPI ``olah``, MIT), serving local git repos.

A tiny run is pushed with ``finetune push`` to the Hub test double; the repo it made there is written out
as a git repository in the layout olah serves read-only (``<mirrors-path>/models/ORG/NAME``, a working tree
with ``.git``); olah runs offline on 127.0.0.1 and the run is pulled from it by id with ``load_run`` and
``finetune predict ORG/NAME``: same predictions as the local run.

The run's base model is a local folder (given as ``model.name_or_path=PATH``, since the pushed config names
only the folder), not a second repo on olah: olah 0.5.4 answers a request for a file that a local mirror
repo lacks with HTTP 401 ``RepoNotFound`` instead of 404 ``EntryNotFound`` (``server_file_routes.py``: the
local lookup returns nothing, then the offline commit resolution answers ``error_repo_not_found``), and
transformers' ``from_pretrained(ORG/NAME)`` asks for ``adapter_config.json`` first, which a base model repo
does not have, so it stops with "not a valid model identifier". Pulling our run asks only for files the
repo has.

olah is installed into its own virtual environment, ``.venv-olah`` (``make olah``, part of ``make
install``): its dependency fastapi-utils pins ``psutil<6``, which would downgrade the pipeline's psutil.
``FINETUNE_OLAH`` may name another ``olah-cli``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub.utils._http import close_session

from finetune.cli import main
from finetune.hub import push
from finetune.trained_run import load_run, locate_run
from conftest import synthetic_reviews, tiny_overrides, write_csv
from finetune.recipes import RECIPES_DIR, load_config
from hub_server import FAKE_TOKEN, HubServer, patch_hf_client
from test_hub import REPO, held_out_inputs

ROOT = Path(__file__).resolve().parent.parent
OLAH = Path(os.environ.get("FINETUNE_OLAH") or ROOT / ".venv-olah" / "bin" / "olah-cli")
STARTUP_SECONDS = 60.0

REQUIRED = os.environ.get("FINETUNE_REQUIRE_OLAH") == "1"
"""Set by .ci/run, after `make install` installed olah: a missing olah is then a failure, not a skip."""

pytestmark = [
    pytest.mark.skipif(not OLAH.is_file() and not REQUIRED, reason=f"olah is not installed at {OLAH}: run `make olah`"),
    pytest.mark.skipif(shutil.which("git") is None, reason="olah serves git repositories: git is not installed"),
]


def write_git_repo(folder: Path, files: dict[str, bytes]) -> str:
    """A git working tree holding ``files`` in one commit on ``main``; returns the commit sha."""
    folder.mkdir(parents=True)
    for path, content in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(content)
    git = ["git", "-C", str(folder), "-c", "user.name=finetune-test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True, timeout=30)
    subprocess.run([*git, "add", "-A"], check=True, timeout=30)
    subprocess.run([*git, "commit", "-q", "-m", "pushed by finetune"], check=True, timeout=30)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, timeout=30, capture_output=True,
                          text=True).stdout.strip()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, log: Path) -> None:
    """Poll ``url`` until olah answers 200, at most STARTUP_SECONDS; fail with its log otherwise."""
    import httpx2

    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"olah exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx2.get(url, timeout=2).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"olah did not answer {url} within {STARTUP_SECONDS:g} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def pushed(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a tiny run trained from the local folder ``tiny_bert``, a folder of git repos for olah holding the repo
    that `finetune push` made of it)."""
    from finetune.train import train

    tmp = tmp_path_factory.mktemp("olah")
    csv_path = write_csv(tmp / "reviews.csv", synthetic_reviews(120))
    run_dir = train(load_config(RECIPES_DIR / "classify.yaml", tiny_overrides(tiny_bert, csv_path, tmp / "runs",
                                                                                **{"train.epochs": 1})), "classify")
    mirrors = tmp / "mirrors"
    with HubServer() as hub, pytest.MonkeyPatch.context() as mp:
        patch_hf_client(mp, hub.url, tmp / "hf_push", hub.client_token)
        push(run_dir, REPO)
        write_git_repo(mirrors / "models" / REPO, hub.files(REPO))
        close_session()
    return run_dir, mirrors


@pytest.fixture()
def olah(pushed: tuple[Path, Path], tmp_path: Path) -> Iterator[str]:
    """olah on 127.0.0.1 (a free port), offline, serving the git repos; stopped at the end of the test."""
    _, mirrors = pushed
    assert OLAH.is_file(), f"olah is not installed at {OLAH}: run `make olah` (part of `make install`)"
    port = free_port()
    config = tmp_path / "olah.toml"
    config.write_text(f"""[basic]
host = "127.0.0.1"
port = {port}
repos-path = "{tmp_path / 'olah-cache'}"
mirror-scheme = "http"
mirror-netloc = "127.0.0.1:{port}"
mirror-lfs-netloc = "127.0.0.1:{port}"
mirrors-path = ["{mirrors}"]

[accessibility]
offline = true
""")
    log = tmp_path / "olah.log"
    with log.open("w") as out:
        process = subprocess.Popen([str(OLAH), "-c", str(config)], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{url}/api/models/{REPO}/revision/main", process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_a_run_pulled_from_olah_predicts_like_the_local_run(pushed: tuple[Path, Path], olah: str, tmp_path: Path,
                                                            tiny_bert: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = pushed
    base = f"model.name_or_path={tiny_bert}"
    inputs = held_out_inputs(run_dir)
    local = load_run(run_dir)
    expected = local.task.predict(local.model, inputs)

    patch_hf_client(monkeypatch, olah, tmp_path / "hf_home")  # a fresh cache: everything comes from olah
    try:
        pulled = load_run(REPO, [base])
        assert pulled.task.predict(pulled.model, inputs) == expected
        assert locate_run(REPO).path.is_relative_to(Path(os.environ["HF_HUB_CACHE"]))
        capsys.readouterr()
        texts = [row["text"] for row in inputs[:3]]
        assert main(["predict", REPO, base, *[a for t in texts for a in ("--text", t)]]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert rows == expected[:3]
    finally:
        close_session()


def test_finetune_predict_in_a_fresh_process_pulls_from_olah(pushed: tuple[Path, Path], olah: str,
                                                              tmp_path: Path, tiny_bert: Path) -> None:
    """As a user runs it: only HF_ENDPOINT points at the mirror."""
    run_dir, _ = pushed
    local = load_run(run_dir)
    texts = ["a good movie", "so awful"]
    expected = local.task.predict(local.model, [{"text": t} for t in texts])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "FINETUNE_HUB"))}
    env |= {"HF_ENDPOINT": olah, "HF_TOKEN": FAKE_TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf"),
            "FINETUNE_HUB_TIMEOUT": "30", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "finetune", "predict", REPO, f"model.name_or_path={tiny_bert}",
                           *[a for t in texts for a in ("--text", t)]],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line) for line in proc.stdout.splitlines()] == expected
    assert "cached earlier" not in proc.stderr  # pulled from olah, not taken from a cache


def test_olah_still_answers_401_for_a_file_a_local_mirror_lacks(olah: str) -> None:
    """The olah behaviour that keeps the base model off the mirror in these tests (see the module docstring).
    When this fails, olah answers 404 EntryNotFound: the base can then be served by olah too."""
    import httpx2

    response = httpx2.head(f"{olah}/{REPO}/resolve/main/adapter_config.json", timeout=10)
    assert response.status_code == 200
    response = httpx2.head(f"{olah}/{REPO}/resolve/main/no-such-file.json", timeout=10)
    assert (response.status_code, response.headers.get("x-error-code")) == (401, "RepoNotFound")
