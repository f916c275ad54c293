"""In-memory TEST DOUBLE of the Hugging Face Hub HTTP API, for pytest. Not a Hub.

It speaks just enough of the Hub's HTTP API for the *real* ``huggingface_hub`` 2.4 client
(``HfApi``, ``create_repo``, ``upload_folder``, ``hf_hub_download``, ``snapshot_download``,
and so ``peft``/``transformers`` pulls) to push and pull repos against ``127.0.0.1``
with ``HF_ENDPOINT`` pointing here. Everything lives in memory and dies with the server.

Implemented (``{type}`` is ``models``, ``datasets`` or ``spaces``; ``{repo}`` is ``ns/name``):

- ``POST /api/repos/create`` (409 when the repo exists, so ``exist_ok`` works; ``private`` /
  ``visibility`` stored), ``DELETE /api/repos/delete``, ``GET /api/whoami-v2``.
- ``POST /api/validate-yaml`` (README front matter parsed with PyYAML when installed).
- ``GET /api/{type}/{repo}`` and ``GET /api/{type}/{repo}/revision/{rev}`` (``model_info`` /
  ``repo_info``; ``blobs=true`` adds sizes and LFS info to ``siblings``).
- ``POST /api/{type}/{repo}/preupload/{rev}``: decides ``regular`` vs ``lfs`` and returns the
  remote oid of unchanged files, so re-uploading the same folder is a client-side no-op.
  LFS rule (the server decides, the client has no threshold): size > ``lfs_threshold``
  (10 MiB by default), or the path matches an LFS pattern of the repo's ``.gitattributes``
  (``*.safetensors``, ``*.bin``, ... like the Hub's default), or the first 512 bytes hold a NUL.
- ``POST /{repo}.git/info/lfs/objects/batch`` (``basic`` transfer, or ``multipart`` when
  ``lfs_multipart_chunk_size`` is set) and its upload targets ``PUT /_lfs/{oid}``,
  ``PUT /_lfs/{oid}/part/{n}``, ``POST /_lfs/{oid}`` (multipart completion). Like presigned S3
  URLs these take no token; uploaded bytes are checked against their sha256.
- ``POST /api/{type}/{repo}/commit/{rev}``: NDJSON ``header``, ``file`` (base64), ``lfsFile``,
  ``deletedFile``, ``deletedFolder``; ``parentCommit`` (412 when stale); ``create_pr=1``
  (opens ``refs/pr/N``). Every commit gets a fresh random 40-hex sha.
- ``GET /api/{type}/{repo}/tree/{rev}[/{path}]`` (``recursive``, cursor pagination through a
  ``Link: <...>; rel="next"`` header, page size ``tree_page_size``),
  ``POST /api/{type}/{repo}/paths-info/{rev}``, ``GET /api/{type}/{repo}/commits/{rev}``,
  ``GET /api/{type}/{repo}/refs``, ``POST``/``DELETE /api/{type}/{repo}/branch/{name}``
  (``create_branch`` is required before pushing to a new branch, as on the Hub),
  ``POST``/``DELETE /api/{type}/{repo}/tag/{name}``.
- ``HEAD``/``GET /[datasets/|spaces/]{repo}/resolve/{rev}/{path}`` with ``ETag`` (git blob
  sha1, or the sha256 for LFS files), ``X-Repo-Commit``, ``X-Linked-Etag``/``X-Linked-Size``
  for LFS files, ``Content-Length`` and ``Range``. Files are served directly (no CDN redirect).
  ``{rev}`` may be a branch, a tag or a commit sha (``snapshot_download`` asks by sha).
- A new repo starts, like on the Hub, with one commit holding the Hub-style ``.gitattributes``
  (``HubServer(initial_gitattributes=False)`` to drop it).
- Errors carry the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``) so the client raises its specific exceptions.

NOT implemented: no token scopes/permissions (one optional accepted token, see
``require_token``; private repos only refuse requests with no token at all), no git
(no ``.git`` smart HTTP, no clone/push), no Xet (never advertised; the fixture sets
``HF_HUB_DISABLE_XET=1`` because the client uploads through Xet whenever ``hf_xet`` is
importable, whatever the server says), no CDN redirects, no discussions/PR API beyond
``create_pr`` commits, no gated repos, no Spaces runtime, no rate limits, no search/listing of
repos, no ``.gitignore`` beyond plain fnmatch patterns.

What the real client (huggingface_hub 2.4.0) retries by itself, read from its source: only
calls made through ``utils/_http.py:http_backoff`` retry, on ``httpx2.TimeoutException``,
``NetworkError``, ``RemoteProtocolError`` and statuses 408, 429, 500, 502, 503, 504, up to 5
retries (6 tries) sleeping 1, 2, 4, 8, 8 s (or ``Retry-After``). Those calls are: preupload
(``_commit_api._fetch_upload_modes``), the LFS batch (``lfs.post_lfs_batch_info``), LFS
``PUT``/multipart completion/verify (``lfs.py``), every page of ``list_repo_tree`` /
``list_repo_files`` / ``list_repo_commits`` (``utils/_pagination.py``), and the file
``HEAD`` of ``hf_hub_download``: its first ``HEAD`` does not retry, but on a retryable error
with no cached copy ``file_download._hf_hub_download_to_cache_dir`` asks again with
``retry_on_errors=True`` (so 1 + 6 tries). NOT retried (plain ``get_session()`` calls):
``create_repo`` (loops only on a 409 "conflicting operation"), ``validate-yaml``, the
``/commit`` POST of ``create_commit``/``upload_folder``/``upload_file``
(``_commit_api._send_commit(retry_on_error=False)``; only ``upload_large_folder`` retries it),
``model_info``/``repo_info`` (so ``snapshot_download`` with the Hub down falls back to the
cache and raises ``LocalEntryNotFoundError``), ``create_branch``, ``whoami``, and the file
``GET`` of a download (``http_get`` retries only 408/429 statuses; it resumes after
connection errors).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest

__all__ = ["FAKE_TOKEN", "HubServer", "LFS_THRESHOLD", "hub_server", "patch_hf_client"]

FAKE_TOKEN = "hf_fake_token_for_the_hub_test_double"
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub's "files over 10 MB go to LFS" rule, in bytes
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_SUBPATHS = {"revision", "preupload", "commit", "tree", "refs", "branch", "tag", "commits", "paths-info"}

# The Hub's default .gitattributes for a new model repo (LFS patterns); also drives preupload.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
        "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
        "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
        "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
        "*.zst", "*tfevents*",
    )
)  # fmt: skip


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _git_blob_oid(data: bytes) -> str:
    # Same as git and as huggingface_hub.utils.sha.git_hash: the client compares it to preupload's oid.
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class _Blob:
    """One file version. LFS blobs expose the sha256 where git would show the pointer."""

    data: bytes
    lfs: bool
    sha256: str
    git_oid: str  # oid of the git blob: the content, or the LFS pointer text

    @classmethod
    def make(cls, data: bytes, lfs: bool) -> _Blob:
        sha = hashlib.sha256(data).hexdigest()
        if lfs:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
            return cls(data, True, sha, _git_blob_oid(pointer))
        return cls(data, False, sha, _git_blob_oid(data))

    @property
    def pointer_size(self) -> int:
        return len(f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n")

    @property
    def etag(self) -> str:
        # The Hub's ETag (X-Linked-Etag for LFS): what the client names the cached blob after.
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class _Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, _Blob]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid ("refs/pr/N" too)
    tags: dict[str, str] = field(default_factory=dict)
    pr_count: int = 0

    def resolve(self, revision: str) -> _Commit | None:
        """Branch, then tag, then full or abbreviated (>= 7 hex) commit sha."""
        oid = self.branches.get(revision) or self.tags.get(revision)
        if oid is None and len(revision) >= 7:
            matches = [c for c in self.commits if c.startswith(revision.lower())]
            oid = matches[0] if len(matches) == 1 else None
        return self.commits.get(oid) if oid else None


class _HttpError(Exception):
    """Raised by route handlers; becomes a Hub-style JSON error response."""

    def __init__(self, status: int, message: str, *, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class _Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Reply:
        return cls(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


@dataclass
class _Request:
    method: str
    raw_path: str  # still percent-encoded: revisions come quoted with safe="" ("refs%2Fpr%2F1")
    query: dict[str, list[str]]
    headers: Any
    body: bytes

    @property
    def token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as exc:
            raise _HttpError(400, f"Invalid JSON body: {exc}") from exc

    def flag(self, name: str) -> bool:
        return (self.query.get(name) or [""])[0].lower() in ("1", "true")


class HubServer:
    """The test double: an HTTP server on 127.0.0.1 plus in-memory repos.

    Use as ``with HubServer() as hub: ...`` or via the ``hub_server`` fixture (which also
    points the huggingface_hub client at it). Knobs are plain attributes, change them any time.
    """

    def __init__(
        self,
        *,
        username: str = "test-user",
        lfs_threshold: int = LFS_THRESHOLD,
        tree_page_size: int = 1000,
        lfs_multipart_chunk_size: int | None = None,
        initial_gitattributes: bool = True,
    ) -> None:
        self.username = username
        self.lfs_threshold = lfs_threshold
        self.tree_page_size = tree_page_size  # the Hub's page size is 1000; lower it to test pagination
        self.lfs_multipart_chunk_size = lfs_multipart_chunk_size  # None: single PUT ("basic" transfer)
        self.initial_gitattributes = initial_gitattributes
        self.client_token = FAKE_TOKEN  # what the fixture puts in HF_TOKEN
        self.requests: list[tuple[str, str]] = []  # (method, percent-decoded path without query)
        self.url = ""
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lfs_store: dict[str, bytes] = {}  # sha256 -> content, shared by all repos
        self._lfs_parts: dict[str, dict[int, bytes]] = {}
        self._failures: list[list[Any]] = []  # [status, remaining, path_contains]
        self._required_token: str | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----- lifecycle -------------------------------------------------------------------------
    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-test-double", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- test controls ---------------------------------------------------------------------
    def fail_next(self, status: int, count: int = 1, path_contains: str | None = None) -> None:
        """Answer ``status`` to the next ``count`` requests whose decoded path contains ``path_contains``."""
        if count > 0:
            with self._lock:
                self._failures.append([status, count, path_contains])

    def require_token(self, token: str | None) -> None:
        """Accept only ``Authorization: Bearer <token>`` from now on (None: accept any or none)."""
        with self._lock:
            self._required_token = token

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Path -> content at ``revision`` (branch, tag or sha). KeyError if unknown."""
        return {path: blob.data for path, blob in self._commit(repo_id, revision, repo_type).files.items()}

    def lfs_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> set[str]:
        """Paths stored as LFS objects at ``revision``."""
        return {path for path, blob in self._commit(repo_id, revision, repo_type).files.items() if blob.lfs}

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """Commit shas reachable from ``revision``, newest first."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            commit: _Commit | None = self._commit(repo_id, revision, repo_type)
            out = []
            while commit is not None:
                out.append(commit.oid)
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return out

    def branches(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        with self._lock:
            return dict(self._repos[(repo_type, repo_id)].branches)

    def count(self, method: str, path_contains: str = "") -> int:
        """How many ``method`` requests whose path contains ``path_contains`` were seen."""
        return sum(1 for m, p in list(self.requests) if m == method and path_contains in p)

    def _commit(self, repo_id: str, revision: str, repo_type: str) -> _Commit:
        with self._lock:
            commit = self._repos[(repo_type, repo_id)].resolve(revision)
            if commit is None:
                raise KeyError(f"{repo_type} {repo_id}: unknown revision {revision!r}")
            return commit

    # ----- request entry point (called from handler threads) ---------------------------------
    def handle(self, req: _Request) -> _Reply:
        path = unquote(req.raw_path)
        self.requests.append((req.method, path))
        with self._lock:
            for failure in self._failures:
                status, _, needle = failure
                if needle is None or needle in path:
                    failure[1] -= 1
                    if failure[1] <= 0:
                        self._failures.remove(failure)
                    return _Reply.json({"error": f"Injected failure (HTTP {status}) by the Hub test double"}, status)
            required = self._required_token
        # Upload targets stand for presigned storage URLs: the client sends them no token.
        if required is not None and not req.raw_path.startswith("/_lfs/") and req.token != required:
            message = "Invalid credentials in Authorization header"
            return _Reply.json({"error": message}, 401, {"X-Error-Message": message})
        try:
            return self._route(req)
        except _HttpError as err:
            headers = dict(err.headers)
            headers["X-Error-Message"] = err.message
            if err.code:
                headers["X-Error-Code"] = err.code
            return _Reply.json({"error": err.message}, err.status, headers)

    def _route(self, req: _Request) -> _Reply:
        segs = [unquote(s) for s in req.raw_path.strip("/").split("/")] if req.raw_path.strip("/") else []
        m = req.method
        if segs[:1] == ["_lfs"] and len(segs) >= 2:
            return self._lfs_target(req, segs[1:])
        if segs[:1] == ["api"]:
            rest = segs[1:]
            if rest == ["repos", "create"] and m == "POST":
                return self._create_repo(req)
            if rest == ["repos", "delete"] and m == "DELETE":
                return self._delete_repo(req)
            if rest == ["whoami-v2"] and m == "GET":
                return self._whoami(req)
            if rest == ["validate-yaml"] and m == "POST":
                return self._validate_yaml(req)
            if len(rest) >= 2 and rest[0] in _TYPES:
                return self._repo_api(req, _TYPES[rest[0]], rest[1:])
            raise _HttpError(404, f"Not implemented by the Hub test double: {m} /{'/'.join(segs)}")
        if m == "POST" and len(segs) >= 5 and segs[-4:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(req, segs[:-4])  # /{prefix}{repo}.git/info/lfs/objects/batch
        if "resolve" in segs and m in ("GET", "HEAD"):
            return self._resolve(req, segs)
        raise _HttpError(404, f"Not implemented by the Hub test double: {m} /{'/'.join(segs)}")

    # ----- helpers ---------------------------------------------------------------------------
    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _get_repo(self, req: _Request, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HttpError(404, "Repository not found", code="RepoNotFound")
        if repo.private and req.token is None:  # the Hub hides private repos from anonymous users
            raise _HttpError(401, "Repository not found", code="RepoNotFound")
        return repo

    @staticmethod
    def _get_commit(repo: _Repo, revision: str) -> _Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HttpError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit

    @staticmethod
    def _new_commit(repo: _Repo, parent: _Commit | None, files: dict[str, _Blob], title: str, message: str) -> _Commit:
        oid = os.urandom(20).hex()
        commit = _Commit(oid, parent.oid if parent else None, title, message, _now(), files)
        repo.commits[oid] = commit
        return commit

    def _is_lfs(self, files: dict[str, _Blob], path: str, size: int, sample: bytes) -> bool:
        if size > self.lfs_threshold or b"\0" in sample:
            return True
        attrs = files.get(".gitattributes")
        text = attrs.data.decode("utf-8", "replace") if attrs else ""
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 2 and "filter=lfs" in parts[1:]:
                pattern = parts[0]
                target = path if "/" in pattern else path.rsplit("/", 1)[-1]
                if fnmatch.fnmatch(target, pattern.replace("**/", "*")):
                    return True
        return False

    @staticmethod
    def _is_ignored(gitignore: str | None, path: str) -> bool:
        for line in (gitignore or "").splitlines():
            pattern = line.strip()
            if pattern and not pattern.startswith("#"):
                if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path.rsplit("/", 1)[-1], pattern):
                    return True
        return False

    # ----- /api/repos, whoami, validate-yaml -------------------------------------------------
    def _create_repo(self, req: _Request) -> _Reply:
        body = req.json()
        name = body.get("name")
        if not name:
            raise _HttpError(400, "Missing repo name")
        repo_id = f"{body.get('organization') or self.username}/{name}"
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HttpError(400, f"Invalid repo type: {repo_type}")
        private = body.get("visibility") == "private" or bool(body.get("private"))
        with self._lock:
            existing = self._repos.get((repo_type, repo_id))
            if existing is not None:
                return _Reply.json(
                    {"error": f"You already created this {repo_type} repo", "url": self._repo_url(existing)}, 409
                )
            repo = _Repo(repo_type, repo_id, private, _now())
            files = {".gitattributes": _Blob.make(DEFAULT_GITATTRIBUTES.encode(), False)}
            commit = self._new_commit(repo, None, files if self.initial_gitattributes else {}, "initial commit", "")
            repo.branches["main"] = commit.oid
            self._repos[(repo_type, repo_id)] = repo
        return _Reply.json({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, req: _Request) -> _Reply:
        body = req.json()
        repo_id = f"{body.get('organization') or self.username}/{body.get('name')}"
        with self._lock:
            self._get_repo(req, body.get("type") or "model", repo_id)
            del self._repos[(body.get("type") or "model", repo_id)]
        return _Reply.json({})

    def _whoami(self, req: _Request) -> _Reply:
        if req.token is None:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        auth = {"type": "access_token", "accessToken": {"displayName": "hub-test-double", "role": "write"}}
        user = {"type": "user", "id": "0" * 24, "name": self.username, "fullname": "Test User", "orgs": []}
        return _Reply.json({**user, "auth": auth})

    @staticmethod
    def _validate_yaml(req: _Request) -> _Reply:
        content = str(req.json().get("content", ""))
        errors: list[dict[str, str]] = []
        if content.startswith("---"):
            end = content.find("\n---", 3)
            if end == -1:
                errors.append({"message": "YAML front matter is not closed by '---'"})
            else:
                try:
                    import yaml  # PyYAML ships with transformers; without it, only the fences are checked
                except ImportError:
                    yaml = None
                if yaml is not None:
                    try:
                        meta = yaml.safe_load(content[3:end])
                        if meta is not None and not isinstance(meta, dict):
                            errors.append({"message": "YAML metadata must be a mapping"})
                    except yaml.YAMLError as exc:
                        errors.append({"message": f"Invalid YAML: {exc}"})
        return _Reply.json({"errors": errors, "warnings": []}, 400 if errors else 200)

    # ----- /api/{type}s/{repo}/... -----------------------------------------------------------
    def _repo_api(self, req: _Request, repo_type: str, segs: list[str]) -> _Reply:
        # repo ids are "ns/name"; a lone "name" is accepted when followed by a known sub-path
        n = 1 if len(segs) == 1 or segs[1] in _REPO_SUBPATHS else 2
        repo_id, sub = "/".join(segs[:n]), segs[n:]
        m = req.method
        with self._lock:
            repo = self._get_repo(req, repo_type, repo_id)
            if not sub and m == "GET":
                return self._info(req, repo, "main")
            action, args = sub[0], sub[1:]
            if action == "revision" and args and m == "GET":
                return self._info(req, repo, "/".join(args))
            if action == "preupload" and args and m == "POST":
                return self._preupload(req, repo, "/".join(args))
            if action == "commit" and args and m == "POST":
                return self._commit_endpoint(req, repo, "/".join(args))
            if action == "tree" and args and m == "GET":
                return self._tree(req, repo, args[0], "/".join(args[1:]))
            if action == "paths-info" and args and m == "POST":
                return self._paths_info(req, repo, "/".join(args))
            if action == "commits" and args and m == "GET":
                return self._list_commits(req, repo, "/".join(args))
            if action == "refs" and m == "GET":
                return self._refs(req, repo)
            if action in ("branch", "tag") and args and m in ("POST", "DELETE"):
                return self._ref_write(req, repo, action, "/".join(args))
        raise _HttpError(404, f"Not implemented by the Hub test double: {m} {req.raw_path}")

    def _info(self, req: _Request, repo: _Repo, revision: str) -> _Reply:
        commit = self._get_commit(repo, revision)
        blobs = req.flag("blobs")
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(blob.data), blobId=blob.git_oid)
                if blob.lfs:
                    sibling["lfs"] = {"size": len(blob.data), "sha256": blob.sha256, "pointerSize": blob.pointer_size}
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(b.data) for b in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return _Reply.json(info)

    def _preupload(self, req: _Request, repo: _Repo, revision: str) -> _Reply:
        commit = self._get_commit(repo, revision)
        body = req.json()
        gitignore = body.get("gitIgnore")
        if gitignore is None and ".gitignore" in commit.files:
            gitignore = commit.files[".gitignore"].data.decode("utf-8", "replace")
        out = []
        for item in body.get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample") or "")
            lfs = self._is_lfs(commit.files, path, size, sample)
            entry: dict[str, Any] = {
                "path": path,
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": self._is_ignored(gitignore, path),
            }
            remote = commit.files.get(path)
            if remote is not None:
                # The client skips a file when this equals its local oid (sha256 for LFS, git sha1 otherwise).
                entry["oid"] = remote.sha256 if remote.lfs else remote.git_oid
            out.append(entry)
        return _Reply.json({"files": out, "commitOid": commit.oid})

    def _commit_endpoint(self, req: _Request, repo: _Repo, revision: str) -> _Reply:
        if revision not in repo.branches:
            raise _HttpError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        lines = [json.loads(line) for line in req.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "The first line of the NDJSON payload must be the commit header")
        header = lines[0]["value"]
        title = header.get("summary") or ""
        if not title:
            raise _HttpError(400, "Commit summary is required")
        head = repo.commits[repo.branches[revision]]
        parent_commit = header.get("parentCommit")
        if parent_commit and not head.oid.startswith(parent_commit):
            raise _HttpError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = str(value.get("path", "")).strip("/") if key == "deletedFolder" else str(value.get("path", ""))
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise _HttpError(400, f"Invalid path in commit: {path!r}")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HttpError(400, f"Unsupported encoding {value.get('encoding')!r}")
                files[path] = _Blob.make(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                data = self._lfs_store.get(str(value.get("oid")))
                if data is None:
                    message = "Your push was rejected because an LFS pointer pointed to a file that does not exist"
                    raise _HttpError(400, f"{message} ({path})")
                if "size" in value and int(value["size"]) != len(data):
                    raise _HttpError(400, f"LFS size mismatch for {path}")
                files[path] = _Blob.make(data, True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise _HttpError(404, "A file with this name doesn't exist", code="EntryNotFound")
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise _HttpError(404, "A folder with this name doesn't exist", code="EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise _HttpError(400, f"Unknown commit operation key {key!r}")
        pr_url = None
        target = revision
        if req.flag("create_pr"):
            repo.pr_count += 1
            target = f"refs/pr/{repo.pr_count}"
            pr_url = f"{self._repo_url(repo)}/discussions/{repo.pr_count}"
        commit = self._new_commit(repo, head, files, title, header.get("description") or "")
        repo.branches[target] = commit.oid
        return _Reply.json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
                "commitMessage": title,
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    def _entries(self, commit: _Commit, prefix: str, recursive: bool) -> list[dict[str, Any]]:
        """Tree entries under ``prefix`` in the Hub's JSON shape (folders as type "directory")."""
        base = prefix.strip("/")
        if base and base not in commit.files and not any(p.startswith(base + "/") for p in commit.files):
            raise _HttpError(404, f"Entry not found: {base}", code="EntryNotFound")
        lead = base + "/" if base else ""
        dirs: set[str] = set()
        files: list[str] = []
        for path in commit.files:
            if not path.startswith(lead):
                continue
            parts = path[len(lead) :].split("/")
            for depth in range(1, len(parts)):
                if depth == 1 or recursive:
                    dirs.add(lead + "/".join(parts[:depth]))
            if len(parts) == 1 or recursive:
                files.append(path)
        out: list[dict[str, Any]] = [
            {"type": "directory", "oid": hashlib.sha1(f"{commit.oid}:{d}".encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(dirs)
        ]
        for path in sorted(files):
            out.append(self._file_entry(path, commit.files[path]))
        return out

    @staticmethod
    def _file_entry(path: str, blob: _Blob) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": blob.git_oid, "size": len(blob.data), "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": blob.pointer_size}
        return entry

    def _page(self, req: _Request, items: list[Any], page_size: int) -> _Reply:
        """Cursor pagination the way the client follows it: a ``Link: <...>; rel="next"`` header."""
        cursor = (req.query.get("cursor") or [""])[0]
        start = int(base64.urlsafe_b64decode(cursor).decode()) if cursor else 0
        end = start + max(1, page_size)
        headers = {}
        if end < len(items):
            query = {k: v[0] for k, v in req.query.items() if k != "cursor"}
            query["cursor"] = base64.urlsafe_b64encode(str(end).encode()).decode()
            headers["Link"] = f'<{self.url}{req.raw_path}?{urlencode(query)}>; rel="next"'
        return _Reply.json(items[start:end], headers=headers)

    def _tree(self, req: _Request, repo: _Repo, revision: str, path: str) -> _Reply:
        commit = self._get_commit(repo, revision)
        return self._page(req, self._entries(commit, path, req.flag("recursive")), self.tree_page_size)

    def _paths_info(self, req: _Request, repo: _Repo, revision: str) -> _Reply:
        commit = self._get_commit(repo, revision)
        ctype = req.headers.get("Content-Type") or ""
        if "json" in ctype:
            paths = list(req.json().get("paths", []))
        else:
            paths = parse_qs(req.body.decode()).get("paths", [])
        out = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                out.append(self._file_entry(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files):
                oid = hashlib.sha1(f"{commit.oid}:{path}".encode()).hexdigest()
                out.append({"type": "directory", "oid": oid, "size": 0, "path": path})
        return _Reply.json(out)

    def _list_commits(self, req: _Request, repo: _Repo, revision: str) -> _Reply:
        commit: _Commit | None = self._get_commit(repo, revision)
        items = []
        while commit is not None:
            items.append(
                {
                    "id": commit.oid,
                    "authors": [{"user": self.username}],
                    "date": commit.date,
                    "title": commit.title,
                    "message": commit.message,
                }
            )
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return self._page(req, items, self.tree_page_size)

    def _refs(self, req: _Request, repo: _Repo) -> _Reply:
        def ref(name: str, full: str, oid: str) -> dict[str, str]:
            return {"name": name, "ref": full, "targetCommit": oid}

        branches = [ref(b, f"refs/heads/{b}", o) for b, o in repo.branches.items() if not b.startswith("refs/pr/")]
        prs = [ref(b, b, o) for b, o in repo.branches.items() if b.startswith("refs/pr/")]
        out: dict[str, Any] = {
            "branches": branches,
            "converts": [],
            "tags": [ref(t, f"refs/tags/{t}", o) for t, o in repo.tags.items()],
        }
        if req.flag("include_prs"):
            out["pullRequests"] = prs
        return _Reply.json(out)

    def _ref_write(self, req: _Request, repo: _Repo, kind: str, name: str) -> _Reply:
        refs = repo.branches if kind == "branch" else repo.tags
        if req.method == "DELETE":
            if name not in refs:
                raise _HttpError(404, f"Invalid rev id: {name}", code="RevisionNotFound")
            if kind == "branch" and name == "main":
                raise _HttpError(403, "Cannot delete the default branch")
            del refs[name]
            return _Reply.json({})
        if kind == "branch":
            start = req.json().get("startingPoint") or "main"
            ref_name = name
        else:  # create_tag: POST /tag/{revision} {"tag": name}
            start, ref_name = name, str(req.json().get("tag") or "")
            if not ref_name:
                raise _HttpError(400, "Missing tag name")
        if ref_name in refs:
            raise _HttpError(409, f"Reference already exists: {ref_name}")
        refs[ref_name] = self._get_commit(repo, start).oid
        return _Reply.json({})

    # ----- LFS -------------------------------------------------------------------------------
    def _lfs_batch(self, req: _Request, repo_segs: list[str]) -> _Reply:
        repo_type = "model"
        if repo_segs and repo_segs[0] in ("datasets", "spaces"):
            repo_type, repo_segs = _TYPES[repo_segs[0]], repo_segs[1:]
        if repo_segs and repo_segs[-1].endswith(".git"):
            repo_segs = [*repo_segs[:-1], repo_segs[-1][:-4]]
        body = req.json()
        if body.get("operation") != "upload":
            raise _HttpError(400, "Only the 'upload' LFS operation is implemented by the Hub test double")
        chunk = self.lfs_multipart_chunk_size
        objects = []
        with self._lock:
            self._get_repo(req, repo_type, "/".join(repo_segs))
            for obj in body.get("objects", []):
                oid, size = str(obj["oid"]), int(obj["size"])
                item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                stored = self._lfs_store.get(oid)
                if stored is None or len(stored) != size:  # already stored: no "actions", client skips it
                    href = f"{self.url}/_lfs/{oid}"
                    if chunk and size > chunk:
                        parts = (size + chunk - 1) // chunk
                        header = {str(i): f"{href}/part/{i}" for i in range(1, parts + 1)}
                        header["chunk_size"] = str(chunk)
                        item["actions"] = {"upload": {"href": href, "header": header}}
                    else:
                        item["actions"] = {"upload": {"href": href}}
                objects.append(item)
        transfer = "multipart" if chunk else "basic"
        return _Reply(200, json.dumps({"transfer": transfer, "objects": objects}).encode(),
                      {"Content-Type": "application/vnd.git-lfs+json"})  # fmt: skip

    def _lfs_target(self, req: _Request, segs: list[str]) -> _Reply:
        oid = segs[0]
        if req.method == "PUT" and len(segs) == 1:
            self._store_lfs(oid, req.body)
            return _Reply(200)
        if req.method == "PUT" and len(segs) == 3 and segs[1] == "part":
            with self._lock:
                self._lfs_parts.setdefault(oid, {})[int(segs[2])] = req.body
            return _Reply(200, headers={"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'})
        if req.method == "POST" and len(segs) == 1:  # multipart completion
            numbers = [int(p["partNumber"]) for p in req.json().get("parts", [])]
            with self._lock:
                parts = self._lfs_parts.pop(oid, {})
            if not numbers or any(n not in parts for n in numbers):
                raise _HttpError(400, "Missing uploaded parts")
            self._store_lfs(oid, b"".join(parts[n] for n in sorted(numbers)))
            return _Reply.json({})
        raise _HttpError(404, f"Not implemented by the Hub test double: {req.method} {req.raw_path}")

    def _store_lfs(self, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            raise _HttpError(400, f"Uploaded content does not match sha256 {oid}")
        with self._lock:
            self._lfs_store[oid] = data

    # ----- downloads -------------------------------------------------------------------------
    def _resolve(self, req: _Request, segs: list[str]) -> _Reply:
        idx = segs.index("resolve")
        repo_segs, rest = segs[:idx], segs[idx + 1 :]
        repo_type = "model"
        if repo_segs and repo_segs[0] in ("datasets", "spaces"):
            repo_type, repo_segs = _TYPES[repo_segs[0]], repo_segs[1:]
        if not repo_segs or len(rest) < 2:
            raise _HttpError(404, "Invalid resolve URL")
        with self._lock:
            repo = self._get_repo(req, repo_type, "/".join(repo_segs))
            commit = self._get_commit(repo, rest[0])
            path = "/".join(rest[1:])
            blob = commit.files.get(path)
        if blob is None:
            raise _HttpError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{blob.etag}"',
            "X-Repo-Commit": commit.oid,
        }
        if blob.lfs:  # the Hub's markers of an LFS file; the client prefers them over ETag/Content-Length
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(len(blob.data))
        data, status = blob.data, 200
        range_header = req.headers.get("Range")
        if range_header and req.method == "GET":
            data, status, extra = self._slice(blob.data, range_header)
            headers.update(extra)
        return _Reply(status, data, headers)

    @staticmethod
    def _slice(data: bytes, range_header: str) -> tuple[bytes, int, dict[str, str]]:
        spec = range_header.strip().lower().removeprefix("bytes=")
        start_s, _, end_s = spec.partition("-")
        size = len(data)
        if start_s:
            start, end = int(start_s), int(end_s) if end_s else size - 1
        else:
            start, end = max(0, size - int(end_s or 0)), size - 1
        end = min(end, size - 1)
        if start >= size or start > end:
            raise _HttpError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
        return data[start : end + 1], 206, {"Content-Range": f"bytes {start}-{end}/{size}"}


class _Handler(BaseHTTPRequestHandler):
    """Thin stdlib adapter: read the request, hand it to the HubServer, write the reply."""

    server_hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive like the Hub; every reply sets Content-Length
    timeout = 60  # idle keep-alive connections do not pin a thread forever

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        body = self._read_body()  # always drain the body so keep-alive stays in sync
        split = urlsplit(self.path)
        req = _Request(self.command, split.path, parse_qs(split.query, keep_blank_values=True), self.headers, body)
        try:
            reply = self.server_hub.handle(req)
        except Exception as exc:  # a bug in the double must show up as a 500, not a hung client
            reply = _Reply.json({"error": f"Hub test double crashed: {exc!r}"}, 500)
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD" and reply.body:
            self.wfile.write(reply.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # requests are in HubServer.requests; keep pytest output clean


def patch_hf_client(monkeypatch: pytest.MonkeyPatch, url: str, hf_home: Path, token: str = FAKE_TOKEN) -> None:
    """Point huggingface_hub at ``url`` with a private cache, even if it was imported long ago.

    huggingface_hub copies the environment into module constants at import time, and some
    modules copy those again (``hf_api.api``, ``utils._http._HUB_ORIGINS``...), so setting the
    environment alone only helps a process that has not imported it yet.
    """
    hub_cache, assets = hf_home / "hub", hf_home / "assets"
    env = {
        "HF_ENDPOINT": url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(assets),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_TOKEN": token,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in (
        "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN", "HUGGINGFACE_CO_STAGING", "HUGGINGFACE_HUB_CACHE",
    ):  # fmt: skip
        monkeypatch.delenv(key, raising=False)

    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    for name, value in {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",  # hf_hub_url
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(assets),
        "HUGGINGFACE_ASSETS_CACHE": str(assets),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,  # is_offline_mode() reads it at every request
        "HF_HUB_DISABLE_XET": True,  # is_xet_available() reads it: no Xet upload or download
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
    }.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    # Module-level copies made at import time.
    monkeypatch.setattr(hf_api.api, "endpoint", url)  # behind huggingface_hub.create_repo, upload_folder, ...
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(url)}, raising=False)
    for module_name, attr, value in (
        ("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", str(hub_cache)),
        ("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", str(assets)),
    ):
        monkeypatch.setattr(f"{module_name}.{attr}", value, raising=False)
    # transformers keeps one HfApi built on first use (its endpoint fixed then): rebuild it for this server.
    hub_module = sys.modules.get("transformers.utils.hub")
    if hub_module is not None and hasattr(hub_module, "_hf_api"):
        monkeypatch.setattr(hub_module, "_hf_api", None)
    # Connections pooled for an earlier test's server must not be reused.
    _http.close_session()


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A fresh HubServer for one test, with the huggingface_hub client pointed at it."""
    server = HubServer().start()
    try:
        patch_hf_client(monkeypatch, server.url, tmp_path / "hf_home", server.client_token)
        yield server
    finally:
        from huggingface_hub.utils._http import close_session

        close_session()  # drop keep-alive connections before the port goes away
        server.stop()
