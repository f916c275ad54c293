"""Exercise the Hub test double through the real huggingface_hub client only."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# Imported at collection time, before the fixture sets HF_ENDPOINT: the fixture must still win.
import huggingface_hub
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    create_repo,
    hf_hub_download,
    hf_hub_url,
    list_repo_files,
    snapshot_download,
    upload_folder,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_token
from huggingface_hub.utils._runtime import is_xet_available

from hub_server import FAKE_TOKEN, LFS_THRESHOLD, HubServer, hub_server  # noqa: F401

BIG = LFS_THRESHOLD + 1024 * 1024  # 11 MiB: over the Hub's 10 MiB LFS rule


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_folder(root: Path) -> dict[str, bytes]:
    """Small text files, a nested file, a tiny safetensors (LFS by pattern) and 11 MiB of text (LFS by size)."""
    files = {
        "README.md": b"---\nlicense: mit\ntags: [lora]\n---\n# test adapter\n",
        "config.json": json.dumps({"r": 8, "alpha": 16}).encode(),
        "sub/dir/notes.txt": b"nested file\n",
        "adapter_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
        # Text, no NUL bytes and no LFS pattern: only its size makes the Hub choose LFS.
        "big.txt": (b"0123456789abcdef" * (BIG // 16 + 1))[:BIG],
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_fixture_patches_client_imported_earlier(hub_server: HubServer, tmp_path: Path) -> None:
    assert constants.ENDPOINT == hub_server.url
    assert hf_hub_url("a/b", "x.txt").startswith(hub_server.url + "/a/b/resolve/main/")
    assert huggingface_hub.hf_api.api.endpoint == hub_server.url  # behind the module-level functions
    assert HfApi().endpoint == hub_server.url
    assert not is_xet_available()
    assert Path(constants.HF_HUB_CACHE).is_relative_to(tmp_path)
    assert get_token() == FAKE_TOKEN
    assert HfApi().whoami()["name"] == "test-user"
    # The module-level function (bound to an HfApi built at import time) reaches the double.
    url = create_repo("test-user/early-import")
    assert url == f"{hub_server.url}/test-user/early-import" and url.repo_id == "test-user/early-import"
    path = hf_hub_download("test-user/early-import", ".gitattributes")
    assert Path(path).is_relative_to(tmp_path) and "filter=lfs" in Path(path).read_text()
    assert all(p.startswith("/") for _, p in hub_server.requests)


def test_create_repo_exist_ok_and_private(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo("test-user/repo")
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("test-user/repo")
    assert exc.value.response.status_code == 409
    assert api.create_repo("test-user/repo", exist_ok=True).repo_id == "test-user/repo"
    # No namespace: the Hub puts it under the token's user.
    assert api.create_repo("bare-name").repo_id == "test-user/bare-name"

    api.create_repo("test-user/secret", private=True)
    assert api.model_info("test-user/secret").private is True
    assert api.model_info("test-user/repo").private is False
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("test-user/secret", token=False)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("test-user/missing")


def test_upload_folder_snapshot_roundtrip(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    repo_id = api.create_repo("test-user/roundtrip").repo_id
    local = tmp_path / "local"
    files = _make_folder(local)

    info = api.upload_folder(repo_id=repo_id, folder_path=local, commit_message="add adapter")
    assert len(info.oid) == 40 and info.oid == api.model_info(repo_id).sha
    assert info.commit_url.startswith(hub_server.url)

    assert sorted(list_repo_files(repo_id)) == sorted([*files, ".gitattributes"])
    assert hub_server.lfs_files(repo_id) == {"big.txt", "adapter_model.safetensors"}
    assert hub_server.files(repo_id) == {**files, ".gitattributes": hub_server.files(repo_id)[".gitattributes"]}
    # The client took the legacy LFS path (no Xet): batch, then one PUT per LFS object.
    assert hub_server.count("POST", ".git/info/lfs/objects/batch") == 1
    assert hub_server.count("PUT", "/_lfs/") == 2
    assert hub_server.count("POST", "/api/validate-yaml") >= 1

    tree = {e.path: e for e in api.list_repo_tree(repo_id, recursive=True)}
    big_lfs = tree["big.txt"].lfs
    assert big_lfs is not None and big_lfs.sha256 == hashlib.sha256(files["big.txt"]).hexdigest()
    assert tree["config.json"].lfs is None
    assert "sub" in tree and "sub/dir" in tree  # folders are listed too
    top = {e.path for e in api.list_repo_tree(repo_id)}
    assert "sub" in top and "sub/dir/notes.txt" not in top
    assert {e.path for e in api.list_repo_tree(repo_id, path_in_repo="sub/dir")} == {"sub/dir/notes.txt"}

    snap = Path(snapshot_download(repo_id, cache_dir=tmp_path / "fresh-cache"))
    got = {p.relative_to(snap).as_posix(): p for p in snap.rglob("*") if p.is_file()}
    assert sorted(got) == sorted([*files, ".gitattributes"])
    for rel, data in files.items():
        assert _sha256(got[rel]) == hashlib.sha256(data).hexdigest(), rel
    # The client names cached LFS blobs after X-Linked-Etag: the sha256.
    blob = Path(hf_hub_download(repo_id, "big.txt", cache_dir=tmp_path / "fresh-cache")).resolve()
    assert blob.name == hashlib.sha256(files["big.txt"]).hexdigest()


def test_upload_same_folder_twice_is_a_noop(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    repo_id = api.create_repo("test-user/twice").repo_id
    local = tmp_path / "local"
    files = _make_folder(local)
    first = api.upload_folder(repo_id=repo_id, folder_path=local)
    puts, commits = hub_server.count("PUT", "/_lfs/"), hub_server.count("POST", "/commit/")
    second = api.upload_folder(repo_id=repo_id, folder_path=local)

    assert second.oid == first.oid  # preupload oids matched: the client skipped the empty commit
    assert hub_server.count("POST", "/commit/") == commits and hub_server.count("PUT", "/_lfs/") == puts
    listed = api.list_repo_files(repo_id)
    assert len(listed) == len(set(listed)) == len(files) + 1

    # One changed file: one new commit, LFS content already stored is not uploaded again.
    (local / "config.json").write_text('{"r": 16}')
    third = api.upload_folder(repo_id=repo_id, folder_path=local)
    assert third.oid != first.oid and hub_server.count("PUT", "/_lfs/") == puts
    assert hub_server.files(repo_id)["config.json"] == b'{"r": 16}'
    assert hub_server.commits(repo_id)[:2] == [third.oid, first.oid]


def test_branches(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    repo_id = api.create_repo("test-user/branchy").repo_id
    api.upload_file(path_or_fileobj=b"v1", path_in_repo="weights.txt", repo_id=repo_id)

    with pytest.raises(RevisionNotFoundError):  # as on the Hub, the branch must exist first
        api.upload_file(path_or_fileobj=b"v2", path_in_repo="weights.txt", repo_id=repo_id, revision="dev/exp")
    api.create_branch(repo_id, branch="dev/exp")
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_branch(repo_id, branch="dev/exp")
    assert exc.value.response.status_code == 409
    api.create_branch(repo_id, branch="dev/exp", exist_ok=True)

    folder = tmp_path / "dev"
    folder.mkdir()
    (folder / "weights.txt").write_bytes(b"v2")
    (folder / "extra.json").write_text("{}")
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision="dev/exp")

    assert hub_server.files(repo_id)["weights.txt"] == b"v1"
    assert hub_server.files(repo_id, "dev/exp")["weights.txt"] == b"v2"
    assert "extra.json" in api.list_repo_files(repo_id, revision="dev/exp")
    assert "extra.json" not in api.list_repo_files(repo_id)
    assert api.model_info(repo_id, revision="dev/exp").sha == info.oid
    snap = Path(snapshot_download(repo_id, revision="dev/exp", cache_dir=tmp_path / "c"))
    assert (snap / "weights.txt").read_bytes() == b"v2" and snap.name == info.oid
    by_sha = hf_hub_download(repo_id, "weights.txt", revision=info.oid, cache_dir=tmp_path / "c")
    assert Path(by_sha).read_bytes() == b"v2"
    assert {b.name for b in api.list_repo_refs(repo_id).branches} == {"main", "dev/exp"}

    api.create_tag(repo_id, tag="v1.0", revision="dev/exp")
    assert hub_server.files(repo_id, "v1.0")["weights.txt"] == b"v2"

    pr = api.upload_file(path_or_fileobj=b"v3", path_in_repo="weights.txt", repo_id=repo_id, create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and hub_server.files(repo_id)["weights.txt"] == b"v1"
    assert hub_server.files(repo_id, "refs/pr/1")["weights.txt"] == b"v3"


def test_deletes_and_missing_entries(hub_server: HubServer) -> None:
    api = HfApi()
    repo_id = api.create_repo("test-user/deletes").repo_id
    api.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd("a.txt", b"a"),
            CommitOperationAdd("logs/1.txt", b"1"),
            CommitOperationAdd("logs/2.txt", b"2"),
        ],
        commit_message="add",
    )
    api.create_commit(
        repo_id,
        operations=[CommitOperationDelete("a.txt"), CommitOperationDelete("logs/")],
        commit_message="delete",
    )
    assert api.list_repo_files(repo_id) == [".gitattributes"]
    with pytest.raises(RemoteEntryNotFoundError):
        api.delete_file("nope.txt", repo_id)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo_id, "a.txt")


def test_invalid_readme_metadata_is_rejected(hub_server: HubServer) -> None:
    api = HfApi()
    repo_id = api.create_repo("test-user/card").repo_id
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_file(path_or_fileobj=b"---\ntags: [unclosed\n---\n", path_in_repo="README.md", repo_id=repo_id)
    assert hub_server.count("POST", "/commit/") == 0


def test_tree_pagination_and_multipart_lfs(hub_server: HubServer) -> None:
    hub_server.tree_page_size = 2
    hub_server.lfs_multipart_chunk_size = 1000
    api = HfApi()
    repo_id = api.create_repo("test-user/paged").repo_id
    blob = bytes(range(256)) * 10  # 2560 bytes, binary: LFS, 3 parts of 1000 bytes
    ops = [CommitOperationAdd(f"f{i}.txt", str(i).encode()) for i in range(5)]
    api.create_commit(repo_id, operations=[*ops, CommitOperationAdd("w.bin", blob)], commit_message="many")

    assert sorted(api.list_repo_files(repo_id)) == sorted([".gitattributes", "w.bin", *(f"f{i}.txt" for i in range(5))])
    assert hub_server.count("GET", "/tree/main") == 4  # 7 entries, 2 per page
    assert hub_server.count("PUT", "/_lfs/") == 3 and hub_server.files(repo_id)["w.bin"] == blob
    assert len(api.list_repo_commits(repo_id)) == 2


def test_client_retries_5xx_on_preupload_and_lfs(hub_server: HubServer) -> None:
    api = HfApi()
    repo_id = api.create_repo("test-user/flaky").repo_id
    hub_server.fail_next(500, 2, path_contains="/preupload/")  # http_backoff: sleeps 1 s then 2 s
    api.upload_file(path_or_fileobj=b"x" * 10, path_in_repo="x.txt", repo_id=repo_id)
    assert hub_server.count("POST", "/preupload/") == 3
    assert hub_server.files(repo_id)["x.txt"] == b"x" * 10

    hub_server.fail_next(503, 1, path_contains="/_lfs/")  # the LFS PUT goes through http_backoff too
    api.upload_file(path_or_fileobj=b"\0binary", path_in_repo="y.bin", repo_id=repo_id)
    assert hub_server.count("PUT", "/_lfs/") == 2 and "y.bin" in hub_server.lfs_files(repo_id)


def test_client_retries_5xx_on_download_head(hub_server: HubServer) -> None:
    api = HfApi()
    repo_id = api.create_repo("test-user/flaky-dl").repo_id
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="h.txt", repo_id=repo_id)
    hub_server.fail_next(500, 2, path_contains="/resolve/")
    # First HEAD: no retry; no cached copy, so a second HEAD round with backoff (1 s) succeeds.
    assert Path(hf_hub_download(repo_id, "h.txt")).read_bytes() == b"hello"
    assert hub_server.count("HEAD", "/resolve/") == 3


def test_client_does_not_retry_commit_or_repo_info(hub_server: HubServer) -> None:
    api = HfApi()
    repo_id = api.create_repo("test-user/no-retry").repo_id
    hub_server.fail_next(500, 1, path_contains="/commit/")
    with pytest.raises(HfHubHTTPError) as exc:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert exc.value.response.status_code == 500
    assert hub_server.count("POST", "/commit/") == 1
    hub_server.fail_next(502, 1, path_contains=f"/api/models/{repo_id}")
    with pytest.raises(HfHubHTTPError):
        api.model_info(repo_id)
    hub_server.fail_next(500, 1, path_contains="/api/repos/create")
    with pytest.raises(HfHubHTTPError):
        api.create_repo("test-user/other")
    # Nothing was half-written by the failed commit; the next try works.
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert hub_server.files(repo_id)["x.txt"] == b"x"


def test_require_token(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    repo_id = api.create_repo("test-user/guarded").repo_id
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    hub_server.require_token("hf_the_right_one")  # HF_TOKEN holds the fixture's fake token

    with pytest.raises(HfHubHTTPError, match="401") as exc:
        api.create_repo("test-user/another")
    assert exc.value.response.status_code == 401 and "Authorization" in str(exc.value)
    with pytest.raises(HfHubHTTPError, match="401"):
        api.upload_file(path_or_fileobj=b"y", path_in_repo="y.txt", repo_id=repo_id)
    with pytest.raises(HfHubHTTPError, match="401"):
        snapshot_download(repo_id, cache_dir=tmp_path / "c")
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        api.whoami()

    good = HfApi(token="hf_the_right_one")
    good.upload_file(path_or_fileobj=b"\0lfs", path_in_repo="y.bin", repo_id=repo_id)  # LFS PUT carries no token
    assert Path(snapshot_download(repo_id, cache_dir=tmp_path / "c", token="hf_the_right_one"), "y.bin").exists()
    hub_server.require_token(None)
    assert "y.bin" in api.list_repo_files(repo_id)


def test_peft_style_pull(hub_server: HubServer, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": "tiny", "r": 4, "target_modules": ["q"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapter_model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    create_repo("test-user/lora", private=True)
    upload_folder(repo_id="test-user/lora", folder_path=adapter)

    # What peft/transformers do with a Hub id: the default cache, HF_ENDPOINT from the environment.
    snap = Path(huggingface_hub.snapshot_download("test-user/lora"))
    assert snap.is_relative_to(Path(constants.HF_HUB_CACHE))
    assert json.loads((snap / "adapter_config.json").read_text()) == config
    assert (snap / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    cfg = hf_hub_download("test-user/lora", "adapter_config.json")
    assert Path(cfg).parent == snap
