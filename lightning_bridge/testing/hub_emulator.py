"""A local Hugging Face Hub emulator, for testing publishing code offline.

:class:`HubEmulator` is a small HTTP server (standard library only: ``http.server``) that speaks the
Hub's HTTP protocol the way the ``huggingface_hub`` client (1.33 to 2.x) uses it, and keeps the
repositories it receives on disk. Code that publishes checkpoints (``HfApi.create_repo``,
``create_commit``, ``upload_folder``, ``upload_file``, ``preupload_lfs_files``, ``create_branch``, ...)
and code that reads them back (``hf_hub_download``, ``snapshot_download``, ``list_repo_files``,
``model_info``, ``file_exists``, ``list_repo_refs``, ...) can then be tested end to end on
127.0.0.1, without network access and without an account::

    import huggingface_hub.constants
    huggingface_hub.constants.HF_HUB_DISABLE_XET = True   # see "Client settings" below

    from huggingface_hub import HfApi, snapshot_download
    from lightning_bridge.testing import HubEmulator

    with HubEmulator(token="secret") as emu:
        api = HfApi(endpoint=emu.endpoint, token="secret")
        api.create_repo("me/tiny-model")
        api.upload_folder(repo_id="me/tiny-model", folder_path="checkpoint/")
        path = snapshot_download("me/tiny-model", endpoint=emu.endpoint, token="secret", cache_dir=tmp)

From a shell (``python -m lightning_bridge.testing.hub_emulator serve --root DIR --port N``, see
:func:`main`), it serves until Ctrl-C; point any client at it with
``HF_ENDPOINT=http://127.0.0.1:<port> HF_HUB_DISABLE_XET=1`` (and ``HF_TOKEN=<token>`` if started
with ``--token``).

Client settings
---------------
* **Xet must be disabled on the client.** ``huggingface_hub`` uploads through the Xet storage
  protocol whenever the ``hf_xet`` package is installed, and (since 1.20) it does not fall back to
  plain Git LFS. The emulator only implements the LFS "basic" transfer, so set
  ``HF_HUB_DISABLE_XET=1`` in the environment *before* ``huggingface_hub`` is imported, or set
  ``huggingface_hub.constants.HF_HUB_DISABLE_XET = True`` at run time (the flag is read on every
  upload). The emulator never advertises Xet (no ``X-Xet-*`` headers, only the ``basic`` LFS
  transfer), so downloads always use plain HTTP.
* Pass ``endpoint=emu.endpoint`` to ``HfApi``/``hf_hub_download``/``snapshot_download`` (or set
  ``HF_ENDPOINT`` before import), and make sure ``HF_HUB_OFFLINE`` is not set.
* If the emulator was started with a ``token``, every request must carry
  ``Authorization: Bearer <token>`` (pass ``token=...`` to the client); otherwise any token, or
  none, is accepted. LFS upload URLs handed out by the batch endpoint are signed (like the
  pre-signed storage URLs of the real Hub), because the client sends those PUTs without its token.

What is emulated
----------------
* Repos of type model, dataset and space under ``<namespace>/<name>`` ids. As on the Hub,
  ``create_repo`` makes an initial commit holding the Hub's default ``.gitattributes``, so a new
  repo lists one file. A repo id without a namespace is created under the caller's user name
  (``whoami``: ``username`` if given, else ``user-<8 hex of sha256(token)>``, else ``anonymous``).
* Upload modes (``preupload``): LFS for the usual binary extensions (``.safetensors``, ``.bin``,
  ``.pt``, ``.png``, ... the Hub's default ``.gitattributes`` patterns), for files of 10 MB or more,
  and for samples containing NUL bytes; "regular" (inline, base64 in the commit) otherwise.
* Git LFS batch API (``basic`` transfer, single PUT, optional verify step), content checked
  against its sha256.
* Atomic commits: every operation of a commit applies, or none does. A commit that references an
  LFS object that was never uploaded is refused (400) and changes nothing. ``parentCommit`` is
  honoured (412 when the branch moved). Commits may target a branch or an open ``refs/pr/N``;
  ``create_pr=True`` opens a pull-request ref ``refs/pr/N`` (no discussions, no merging).
* Branches (create with ``startingPoint``, delete), tags, refs listing, commit history, tree
  listing (recursive, ``expand`` with ``lastCommit``), paths-info, model/dataset/space info with
  ``siblings`` (``cardData``/``tags`` from the README front matter when PyYAML is importable),
  ``resolve`` downloads with ``ETag``/``X-Linked-Etag``/``X-Linked-Size``/``X-Repo-Commit`` and
  ``Range`` support, repo deletion, visibility settings, ``whoami-v2``, ``validate-yaml``.
* Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) and
  ``X-Error-Message`` headers so the client raises its usual exception types.
* Fault injection (:meth:`HubEmulator.inject_fault`) and a request log
  (:attr:`HubEmulator.requests`) for testing retry and error paths.

What is not emulated
--------------------
Xet storage; LFS multipart uploads (the batch answer never asks for them); access control beyond
the single shared token (the ``private`` flag is stored and reported, but every caller sees every
repo, and any namespace may be written to); organizations, gated repos, rate limits (other than
injected 429s); discussions, PR merging, Spaces runtimes, Inference, webhooks, collections, search
and listing endpoints (``list_models`` ...); ``.gitignore`` handling in preupload
(``shouldIgnore`` is always false); server-side copies of LFS files across repos
(``lfs-files/duplicate``); repo renames; squashing; garbage collection (blobs are content-addressed
under ``<root>/blobs`` and shared by all repos, so an LFS object uploaded to one repo can be
referenced from another); pagination (every listing fits in one page); HTTP keep-alive (each
response closes its connection).

On-disk layout (under ``root``): ``blobs/<sha256>`` holds file contents; each repo lives in
``repos/<type>s/<namespace>/<name>/`` with ``repo.json`` (metadata), ``refs.json`` (branches, tags,
pull-request refs -> commit id) and ``commits/<commit id>.json`` (parents, message, date and the
full file tree ``path -> {"blob": sha256, "size", "lfs", "oid"}``). Commit ids are the sha1 of the
commit's JSON. Every write goes to a temporary file first and is moved into place with
``os.replace``; ref updates are serialized by a lock, so concurrent requests are safe.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

if TYPE_CHECKING:
    from typing_extensions import Self

try:  # optional: only used to fill `cardData` from the README front matter
    import yaml as _yaml
except ImportError:  # pragma: no cover - PyYAML ships with huggingface_hub
    _yaml = None

logger = logging.getLogger(__name__)

__all__ = ["HubEmulator", "RequestRecord", "main"]

# --------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------

#: Files of this size or larger are uploaded through LFS.
LFS_SIZE_THRESHOLD = 10_000_000
#: Regular (non-LFS) files larger than this are refused in a commit, as on the Hub.
MAX_REGULAR_FILE_SIZE = 10 * 1024 * 1024

# The Hub's default `.gitattributes` for a new repo.
# fmt: off
_LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
    "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar",
    "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)
# fmt: on
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in _LFS_PATTERNS)
# Extra patterns that go through LFS in the emulator (binary formats the Hub refuses as regular files).
_EXTRA_LFS_PATTERNS = ("*.png", "*.jpg", "*.jpeg", "*.gif", "*.webp", "*.gguf", "*.pdf")

_TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Words that follow a repo id in `/api/{type}s/{repo_id}/...` URLs.
# fmt: off
_REPO_ACTIONS = {
    "resolve", "tree", "revision", "refs", "commits", "commit", "preupload", "paths-info", "branch", "tag",
    "settings", "discussions", "blob", "raw", "lfs-files", "super-squash",
}
# fmt: on
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_PR_REF_RE = re.compile(r"^refs/pr/(\d+)$")
_CHUNK = 1 << 20
_FAULT_KINDS = ("status", "delay", "drop")


class RequestRecord(NamedTuple):
    """One served request: ``(method, path, status)``. ``path`` is the URL path as sent (still
    percent-encoded, without the query string); ``status`` is ``None`` for a dropped connection."""

    method: str
    path: str
    status: int | None


class _HTTPError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict | None = None,
        body: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body or {}


@dataclass
class _Fault:
    kind: str
    pattern: re.Pattern
    method: str | None
    remaining: int | None
    delay: float
    status: int


@dataclass(frozen=True)
class _Repo:
    type: str  # "model" | "dataset" | "space"
    id: str  # "namespace/name"
    dir: Path


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _now_iso() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


def _is_true(values: list[str] | None) -> bool:
    return bool(values) and values[-1].strip().lower() in ("1", "true", "yes", "on")


def _check_repo_path(path: Any) -> str:
    if not isinstance(path, str) or not path:
        raise _HTTPError(400, f"Invalid path in repo: {path!r}")
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..", ".git") for p in parts) or "\x00" in path:
        raise _HTTPError(400, f"Invalid path in repo: {path!r}")
    return path


def _header_safe(text: str) -> str:
    text = " ".join(str(text).split())
    return text.encode("latin-1", "replace").decode("latin-1")[:1000]


def _wants_lfs(path: str, size: int, sample: bytes) -> bool:
    if size >= LFS_SIZE_THRESHOLD or b"\x00" in sample:
        return True
    name = path.rsplit("/", 1)[-1]
    for pattern in _LFS_PATTERNS + _EXTRA_LFS_PATTERNS:
        target = path if "/" in pattern else name
        if fnmatchcase(target, pattern) or fnmatchcase(target.lower(), pattern):
            return True
    return False


def _front_matter(text: str) -> dict | None:
    if _yaml is None or not text.startswith("---"):
        return None
    match = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.DOTALL)
    if match is None:
        return None
    try:
        data = _yaml.safe_load(match.group(1))
    except _yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------


class _Store:
    """Content-addressed blobs plus per-repo refs and commits, on disk."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.RLock()
        for sub in ("blobs", "tmp", "repos"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._commit_cache: dict[tuple[str, str], dict] = {}

    # blobs ------------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def blob_size(self, sha256: str) -> int | None:
        if not _SHA256_RE.match(sha256):
            return None
        try:
            return self.blob_path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if self.blob_size(sha) is None:
            _atomic_write(self.blob_path(sha), data)
        return sha

    def put_stream(self, chunks: Iterator[bytes], expected_sha256: str) -> int:
        """Stream `chunks` into the blob store; raises `_HTTPError(400)` if the sha256 differs."""
        tmp = self.root / "tmp" / f"upload-{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            actual = digest.hexdigest()
            if actual != expected_sha256:
                raise _HTTPError(400, f"Uploaded content has sha256 {actual}, expected {expected_sha256}")
            if self.blob_size(actual) is None:
                os.replace(tmp, self.blob_path(actual))
        finally:
            if tmp.exists():
                tmp.unlink()
        return size

    # repos ------------------------------------------------------------------------------------
    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        namespace, name = repo_id.split("/")
        return self.root / "repos" / f"{repo_type}s" / namespace / name

    def get_repo(self, repo_type: str, repo_id: str) -> _Repo | None:
        if repo_id.count("/") != 1 or not all(_NAME_RE.match(p) for p in repo_id.split("/")):
            return None
        rdir = self.repo_dir(repo_type, repo_id)
        if not (rdir / "refs.json").is_file():
            return None
        return _Repo(repo_type, repo_id, rdir)

    def repo_meta(self, repo: _Repo) -> dict:
        return json.loads((repo.dir / "repo.json").read_text())

    def write_repo_meta(self, repo: _Repo, meta: dict) -> None:
        _atomic_write(repo.dir / "repo.json", _dump(meta))

    def refs(self, repo: _Repo) -> dict:
        refs = json.loads((repo.dir / "refs.json").read_text())
        refs.setdefault("branches", {})
        refs.setdefault("tags", {})
        refs.setdefault("pulls", {})
        return refs

    def write_refs(self, repo: _Repo, refs: dict) -> None:
        _atomic_write(repo.dir / "refs.json", _dump(refs))

    def commit(self, repo: _Repo, oid: str) -> dict | None:
        if not _COMMIT_RE.match(oid):
            return None
        key = (str(repo.dir), oid)
        cached = self._commit_cache.get(key)
        if cached is not None:
            return cached
        try:
            data = json.loads((repo.dir / "commits" / f"{oid}.json").read_text())
        except FileNotFoundError:
            return None
        self._commit_cache[key] = data
        return data

    def write_commit(
        self, repo: _Repo, parents: list[str], title: str, message: str, author: str, tree: dict
    ) -> str:
        body = {
            "parents": parents,
            "title": title,
            "message": message,
            "author": author,
            "date": _now_iso(),
            "tree": tree,
        }
        oid = hashlib.sha1(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        body["id"] = oid
        _atomic_write(repo.dir / "commits" / f"{oid}.json", _dump(body))
        return oid

    def resolve(self, repo: _Repo, revision: str, refs: dict | None = None) -> str | None:
        refs = refs if refs is not None else self.refs(repo)
        if revision in refs["branches"]:
            return refs["branches"][revision]
        if revision in refs["tags"]:
            return refs["tags"][revision]
        if revision.startswith("refs/heads/") and revision[11:] in refs["branches"]:
            return refs["branches"][revision[11:]]
        if revision.startswith("refs/tags/") and revision[10:] in refs["tags"]:
            return refs["tags"][revision[10:]]
        match = _PR_REF_RE.match(revision)
        if match and match.group(1) in refs["pulls"]:
            return refs["pulls"][match.group(1)]
        if _COMMIT_RE.match(revision) and self.commit(repo, revision) is not None:
            return revision
        return None

    def create_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> _Repo:
        rdir = self.repo_dir(repo_type, repo_id)
        repo = _Repo(repo_type, repo_id, rdir)
        rdir.mkdir(parents=True, exist_ok=True)
        meta = {
            "id": repo_id,
            "type": repo_type,
            "private": private,
            "createdAt": _now_iso(),
            "_id": uuid.uuid4().hex[:24],
        }
        self.write_repo_meta(repo, meta)
        content = DEFAULT_GITATTRIBUTES.encode()
        sha = self.put_bytes(content)
        tree = {
            ".gitattributes": {"blob": sha, "size": len(content), "lfs": False, "oid": _git_blob_oid(content)}
        }
        oid = self.write_commit(repo, [], "initial commit", "", author, tree)
        self.write_refs(repo, {"branches": {"main": oid}, "tags": {}, "pulls": {}})  # written last
        return repo

    def delete_repo(self, repo: _Repo) -> None:
        trash = self.root / "tmp" / f"deleted-{uuid.uuid4().hex}"
        os.replace(repo.dir, trash)
        shutil.rmtree(trash, ignore_errors=True)
        self._commit_cache = {k: v for k, v in self._commit_cache.items() if k[0] != str(repo.dir)}


# --------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    emulator: HubEmulator

    def handle_error(self, request, client_address):  # no tracebacks on stderr
        logger.debug("Error while serving %s: %r", client_address, sys.exc_info()[1])


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "HubEmulator/1.0"
    timeout = 300
    server: _Server

    # plumbing ---------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    @property
    def emu(self) -> HubEmulator:
        return self.server.emulator

    @property
    def store(self) -> _Store:
        return self.server.emulator._store

    def _iter_body(self) -> Iterator[bytes]:
        """Yield the request body (Content-Length or chunked), once."""
        if self._body_started:
            return
        self._body_started = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("connection closed in chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, _CHUNK))
                    if not chunk:
                        raise ConnectionError("connection closed in chunked body")
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, _CHUNK))
                if not chunk:
                    raise ConnectionError("connection closed in body")
                remaining -= len(chunk)
                yield chunk

    def _body(self) -> bytes:
        if self._body_bytes is None:
            self._body_bytes = b"".join(self._iter_body())
        return self._body_bytes

    def _json_body(self) -> Any:
        raw = self._body()
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError as e:
            raise _HTTPError(400, f"Invalid JSON body: {e}") from e

    def _drain(self) -> None:
        if not self._body_started:
            for _ in self._iter_body():
                pass

    def _record(self, status: int | None) -> None:
        # Logged before the response is written, so a client that got its answer sees its request logged.
        if not self._recorded:
            self._recorded = True
            self.emu.requests.append(RequestRecord(self.command, self._raw_path, status))

    def _start(self, status: int, headers: dict[str, str], length: int, content_type: str) -> None:
        self._drain()
        self._status = status
        self._record(status)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict | None = None,
        content_type: str = "application/json; charset=utf-8",
    ) -> None:
        self._start(status, headers or {}, len(body), content_type)
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(
        self,
        obj: Any,
        status: int = 200,
        headers: dict | None = None,
        content_type: str = "application/json; charset=utf-8",
    ) -> None:
        self._send(status, json.dumps(obj).encode(), headers, content_type)

    def _send_error(self, err: _HTTPError) -> None:
        headers = {"X-Error-Message": _header_safe(err.message), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_json({"error": err.message, **err.body}, err.status, headers)

    def _base_url(self) -> str:
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.emu.endpoint

    def _bearer(self) -> str | None:
        scheme, _, value = self.headers.get("Authorization", "").partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None

    def _user(self) -> str:
        return self.emu._user_for_token(self._bearer())

    # dispatch ---------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        self._body_started = False
        self._body_bytes: bytes | None = None
        self._status: int | None = None
        self._recorded = False
        split = urlsplit(self.path)
        raw_path = self._raw_path = split.path or "/"
        query = parse_qs(split.query, keep_blank_values=True)
        method = self.command
        try:
            fault = self.emu._take_fault(method, raw_path)
            if fault is not None and fault.kind == "drop":
                self._drain()
                self.close_connection = True
                self._record(None)
                logger.debug("Injected fault: dropping %s %s", method, raw_path)
                return
            if fault is not None and fault.kind == "status":
                headers = {"Retry-After": "0"} if fault.status == 429 else {}
                raise _HTTPError(fault.status, f"Injected fault: HTTP {fault.status}", headers=headers)
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.delay)
            self._check_auth(raw_path, query)
            self._route(method, raw_path, query)
        except _HTTPError as err:
            self._send_error(err)
        except (TimeoutError, ConnectionError) as err:
            logger.debug("Connection error on %s %s: %s", method, raw_path, err)
            self.close_connection = True
        except Exception as err:  # pragma: no cover - a bug in the emulator
            logger.exception("Hub emulator failed on %s %s", method, raw_path)
            if self._status is None:
                try:
                    self._send_error(_HTTPError(500, f"Internal emulator error: {err!r}"))
                except OSError:
                    self.close_connection = True
        finally:
            self._record(self._status)

    def _check_auth(self, raw_path: str, query: dict) -> None:
        expected = self.emu.token
        if expected is None:
            return
        if raw_path.startswith("/_lfs/"):
            parts = raw_path.split("/")
            if len(parts) > 2 and self.emu._lfs_sig_ok(parts[2], (query.get("sig") or [""])[-1]):
                return
        token = self._bearer()
        if token is None:
            raise _HTTPError(401, "Authorization header with a Bearer token is required")
        if not hmac.compare_digest(token.encode(), expected.encode()):
            raise _HTTPError(401, "Invalid credentials in Authorization header")

    def _route(self, method: str, raw_path: str, query: dict) -> None:
        segs = raw_path.split("/")[1:]
        if segs and segs[0] == "_lfs" and len(segs) >= 2:
            oid = unquote(segs[1])
            if len(segs) == 2 and method == "PUT":
                return self._lfs_put(oid, query)
            if len(segs) == 3 and segs[2] == "verify" and method == "POST":
                return self._lfs_verify(oid)
            raise _HTTPError(405 if len(segs) <= 3 else 404, f"Unsupported LFS request {method} {raw_path}")
        if segs and segs[0] == "api":
            rest = segs[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo()
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo()
            if rest == ["validate-yaml"] and method == "POST":
                return self._validate_yaml()
            if len(rest) >= 2 and rest[0] in _TYPE_FROM_PLURAL:
                repo_type = _TYPE_FROM_PLURAL[rest[0]]
                repo, action = self._parse_repo(repo_type, rest[1:])
                return self._api_repo(method, repo, action, query)
            raise _HTTPError(404, f"Unknown API route {method} {raw_path}")
        # `/[datasets/|spaces/]{ns}/{name}/resolve/...` and `/[...]{ns}/{name}.git/info/lfs/objects/batch`
        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type = _TYPE_FROM_PLURAL[segs[0]]
            segs = segs[1:]
        for i in (1, 0):
            if (
                len(segs) > i + 1
                and segs[i].endswith(".git")
                and segs[i + 1 :] == ["info", "lfs", "objects", "batch"]
            ):
                repo_id = "/".join(unquote(s) for s in segs[: i + 1])[: -len(".git")]
                if method != "POST":
                    raise _HTTPError(405, "Method not allowed")
                return self._lfs_batch(self._get_repo(repo_type, repo_id))
        if len(segs) >= 3 and "resolve" in segs[1:3]:
            i = segs.index("resolve", 1)
            repo = self._get_repo(repo_type, "/".join(unquote(s) for s in segs[:i]))
            if method not in ("GET", "HEAD"):
                raise _HTTPError(405, "Method not allowed")
            return self._resolve(repo, segs[i + 1 :])
        raise _HTTPError(404, f"Not found: {method} {raw_path}")

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.store.get_repo(repo_type, repo_id)
        if repo is None:
            raise _HTTPError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _parse_repo(self, repo_type: str, segs: list[str]) -> tuple[_Repo, list[str]]:
        if len(segs) >= 2 and segs[1] not in _REPO_ACTIONS:
            repo_id, action = f"{unquote(segs[0])}/{unquote(segs[1])}", segs[2:]
        else:
            repo_id, action = unquote(segs[0]), segs[1:]
        return self._get_repo(repo_type, repo_id), action

    def _revision(self, repo: _Repo, revision: str, refs: dict | None = None) -> str:
        oid = self.store.resolve(repo, revision, refs)
        if oid is None:
            raise _HTTPError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return oid

    def _split_rev(self, repo: _Repo, segs: list[str]) -> tuple[str, str, list[str]]:
        """Split `rev/path...` segments; the revision is usually one %-encoded segment, but accept
        a branch name with raw slashes too. Returns (revision, commit oid, remaining segments)."""
        if not segs or not segs[0]:
            raise _HTTPError(404, "Missing revision", code="RevisionNotFound")
        refs = self.store.refs(repo)
        first = unquote(segs[0])
        oid = self.store.resolve(repo, first, refs)
        if oid is not None:
            return first, oid, segs[1:]
        for n in range(len(segs), 1, -1):
            candidate = unquote("/".join(segs[:n]))
            oid = self.store.resolve(repo, candidate, refs)
            if oid is not None:
                return candidate, oid, segs[n:]
        raise _HTTPError(404, f"Invalid rev id: {first}", code="RevisionNotFound")

    # account / repos --------------------------------------------------------------------------
    def _whoami(self) -> None:
        name = self._user()
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(name.encode()).hexdigest()[:24],
                "name": name,
                "fullname": name,
                "email": None,
                "emailVerified": False,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "hub-emulator", "role": "write", "createdAt": _now_iso()},
                },
            }
        )

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self._base_url()}/{_URL_PREFIX[repo_type]}{repo_id}"

    def _create_repo(self) -> None:
        body = self._json_body()
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HTTPError(400, f"Unsupported repo type: {repo_type!r}")
        name, namespace = body.get("name"), body.get("organization") or self._user()
        if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(".git"):
            raise _HTTPError(400, f"Invalid repo name: {name!r}")
        if not _NAME_RE.match(namespace):
            raise _HTTPError(400, f"Invalid namespace: {namespace!r}")
        repo_id = f"{namespace}/{name}"
        private = body.get("private")
        if body.get("visibility") is not None:
            private = body["visibility"] != "public"
        url = self._repo_url(repo_type, repo_id)
        with self.store.lock:
            if self.store.get_repo(repo_type, repo_id) is not None:
                raise _HTTPError(409, f"You already created this {repo_type} repo", body={"url": url})
            repo = self.store.create_repo(repo_type, repo_id, bool(private), self._user())
        meta = self.store.repo_meta(repo)
        logger.info("Created %s repo %s", repo_type, repo_id)
        self._send_json({"url": url, "name": repo_id, "id": meta["_id"]})

    def _delete_repo(self) -> None:
        body = self._json_body()
        repo_type = body.get("type") or "model"
        namespace = body.get("organization") or self._user()
        if repo_type not in _URL_PREFIX:
            raise _HTTPError(400, f"Unsupported repo type: {repo_type!r}")
        with self.store.lock:
            repo = self._get_repo(repo_type, f"{namespace}/{body.get('name')}")
            self.store.delete_repo(repo)
        self._send_json({})

    def _validate_yaml(self) -> None:
        content = self._json_body().get("content") or ""
        if _yaml is not None and content.startswith("---"):
            match = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", content, re.DOTALL)
            if match is not None:
                try:
                    _yaml.safe_load(match.group(1))
                except _yaml.YAMLError as e:
                    self._send_json(
                        {"errors": [{"message": f"Invalid YAML: {e}"}], "warnings": []},
                        400,
                        {"X-Error-Message": "Invalid YAML in README.md front matter"},
                    )
                    return
        self._send_json({"errors": [], "warnings": []})

    # /api/{type}s/{repo}/... ------------------------------------------------------------------
    def _api_repo(self, method: str, repo: _Repo, action: list[str], query: dict) -> None:
        verb = action[0] if action else ""
        rest = "/".join(action[1:])
        if verb == "" and method == "GET":
            return self._repo_info(repo, "main", query)
        if verb == "revision" and method == "GET":
            return self._repo_info(repo, unquote(rest), query)
        if verb == "tree" and method == "GET":
            _, oid, path_segs = self._split_rev(repo, action[1:])
            return self._tree(repo, oid, unquote("/".join(path_segs)).strip("/"), query)
        if verb == "paths-info" and method == "POST":
            return self._paths_info(repo, unquote(rest))
        if verb == "refs" and method == "GET":
            return self._refs(repo)
        if verb == "commits" and method == "GET":
            return self._commits(repo, unquote(rest) or "main")
        if verb == "preupload" and method == "POST":
            return self._preupload(repo, unquote(rest) or "main")
        if verb == "commit" and method == "POST":
            return self._commit(repo, unquote(rest) or "main", _is_true(query.get("create_pr")))
        if verb == "branch" and method in ("POST", "DELETE"):
            return self._branch(repo, unquote(rest), method)
        if verb == "tag" and method in ("POST", "DELETE"):
            return self._tag(repo, unquote(rest), method)
        if verb == "settings" and method == "PUT":
            return self._settings(repo)
        raise _HTTPError(404, f"Unsupported: {method} {'/'.join(action)}")

    def _repo_info(self, repo: _Repo, revision: str, query: dict) -> None:
        oid = self._revision(repo, revision)
        commit = self.store.commit(repo, oid)
        meta = self.store.repo_meta(repo)
        with_blobs = _is_true(query.get("blobs"))
        siblings = []
        for path in sorted(commit["tree"]):
            entry = commit["tree"][path]
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    pointer = _lfs_pointer(entry["blob"], entry["size"])
                    sibling["lfs"] = {
                        "size": entry["size"],
                        "sha256": entry["blob"],
                        "pointerSize": len(pointer),
                    }
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": meta["_id"],
            "id": repo.id,
            "author": repo.id.split("/")[0],
            "sha": oid,
            "lastModified": commit["date"],
            "createdAt": meta["createdAt"],
            "private": bool(meta["private"]),
            "disabled": False,
            "gated": False,
            "likes": 0,
            "downloads": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e["size"] for e in commit["tree"].values()),
        }
        card = self._card_data(commit)
        if card is not None:
            info["cardData"] = card
            tags = card.get("tags")
            info["tags"] = [str(t) for t in tags] if isinstance(tags, list) else []
            for key in ("library_name", "pipeline_tag"):
                if isinstance(card.get(key), str):
                    info[key] = card[key]
        if repo.type == "model":
            info["modelId"] = repo.id
            info["spaces"] = []
        elif repo.type == "space":
            info["sdk"] = meta.get("sdk")
            info["runtime"] = {"stage": "STOPPED", "hardware": {"current": None, "requested": None}}
        self._send_json(info)

    def _card_data(self, commit: dict) -> dict | None:
        entry = commit["tree"].get("README.md")
        if entry is None or entry["size"] > 1_000_000:
            return None
        try:
            text = self.store.blob_path(entry["blob"]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        return _front_matter(text)

    def _tree_entries(self, repo: _Repo, commit: dict, prefix: str, recursive: bool) -> list[dict]:
        tree = commit["tree"]
        base = f"{prefix}/" if prefix else ""
        if prefix and prefix not in tree and not any(p.startswith(base) for p in tree):
            raise _HTTPError(
                404,
                f"Entry not found: {prefix}",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit["id"]},
            )
        if prefix in tree:
            raise _HTTPError(
                404,
                f"{prefix} is a file, not a folder",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit["id"]},
            )
        files, dirs = [], {}
        for path in sorted(tree):
            if not path.startswith(base):
                continue
            rel = path[len(base) :]
            parts = rel.split("/")
            depth = len(parts) if recursive else 1
            for d in range(1, min(depth, len(parts) - 1) + 1):
                dirs.setdefault(base + "/".join(parts[:d]), None)
            if recursive or len(parts) == 1:
                files.append(self._file_entry(path, tree[path]))
        entries = [self._dir_entry(d, tree) for d in dirs] + files
        return sorted(entries, key=lambda e: e["path"])

    def _file_entry(self, path: str, entry: dict) -> dict:
        out = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry["lfs"]:
            out["lfs"] = {
                "oid": entry["blob"],
                "size": entry["size"],
                "pointerSize": len(_lfs_pointer(entry["blob"], entry["size"])),
            }
        return out

    def _dir_entry(self, path: str, tree: dict) -> dict:
        listing = "\n".join(f"{p} {e['oid']}" for p, e in sorted(tree.items()) if p.startswith(path + "/"))
        return {
            "type": "directory",
            "oid": hashlib.sha1(listing.encode()).hexdigest(),
            "size": 0,
            "path": path,
        }

    def _add_last_commits(self, repo: _Repo, head: str, entries: list[dict]) -> None:
        def signature(tree: dict, entry: dict) -> Any:
            if entry["type"] == "file":
                return tree.get(entry["path"], {}).get("oid")
            return tuple((p, e["oid"]) for p, e in sorted(tree.items()) if p.startswith(entry["path"] + "/"))

        pending = list(entries)
        commit = self.store.commit(repo, head)
        while pending and commit is not None:
            parent = self.store.commit(repo, commit["parents"][0]) if commit["parents"] else None
            parent_tree = parent["tree"] if parent is not None else {}
            still = []
            for entry in pending:
                if parent is None or signature(commit["tree"], entry) != signature(parent_tree, entry):
                    entry["lastCommit"] = {
                        "id": commit["id"],
                        "title": commit["title"],
                        "date": commit["date"],
                    }
                else:
                    still.append(entry)
            pending, commit = still, parent

    def _tree(self, repo: _Repo, oid: str, prefix: str, query: dict) -> None:
        commit = self.store.commit(repo, oid)
        entries = self._tree_entries(repo, commit, prefix, _is_true(query.get("recursive")))
        if _is_true(query.get("expand")):
            self._add_last_commits(repo, oid, entries)
        self._send_json(entries)

    def _paths_info(self, repo: _Repo, revision: str) -> None:
        oid = self._revision(repo, revision or "main")
        ctype = self.headers.get("Content-Type", "")
        raw = self._body()
        if "json" in ctype:
            body = json.loads(raw or b"{}")
            paths, expand = body.get("paths") or [], bool(body.get("expand"))
        else:
            form = parse_qs(raw.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), _is_true(form.get("expand"))
        if isinstance(paths, str):
            paths = [paths]
        commit = self.store.commit(repo, oid)
        tree = commit["tree"]
        out = []
        for path in paths:
            path = str(path).strip("/")
            if path in tree:
                out.append(self._file_entry(path, tree[path]))
            elif path and any(p.startswith(path + "/") for p in tree):
                out.append(self._dir_entry(path, tree))
        if expand:
            self._add_last_commits(repo, oid, out)
        self._send_json(out)

    def _refs(self, repo: _Repo) -> None:
        refs = self.store.refs(repo)

        def fmt(name: str, ref: str, target: str) -> dict:
            return {"name": name, "ref": ref, "targetCommit": target}

        self._send_json(
            {
                "branches": [fmt(n, f"refs/heads/{n}", t) for n, t in sorted(refs["branches"].items())],
                "converts": [],
                "tags": [fmt(n, f"refs/tags/{n}", t) for n, t in sorted(refs["tags"].items())],
                "pullRequests": [
                    fmt(f"refs/pr/{n}", f"refs/pr/{n}", t)
                    for n, t in sorted(refs["pulls"].items(), key=lambda kv: int(kv[0]))
                ],
            }
        )

    def _commits(self, repo: _Repo, revision: str) -> None:
        oid = self._revision(repo, revision)
        out = []
        while oid:
            commit = self.store.commit(repo, oid)
            out.append(
                {
                    "id": commit["id"],
                    "title": commit["title"],
                    "message": commit["message"],
                    "authors": [{"user": commit["author"], "avatar": None}],
                    "date": commit["date"],
                }
            )
            oid = commit["parents"][0] if commit["parents"] else None
        self._send_json(out)

    def _settings(self, repo: _Repo) -> None:
        body = self._json_body()
        with self.store.lock:
            meta = self.store.repo_meta(repo)
            if "private" in body and body["private"] is not None:
                meta["private"] = bool(body["private"])
            if body.get("visibility") is not None:
                meta["private"] = body["visibility"] != "public"
            self.store.write_repo_meta(repo, meta)
        self._send_json({})

    # refs -----------------------------------------------------------------------------------
    def _branch(self, repo: _Repo, name: str, method: str) -> None:
        if not name or ".." in name or name.startswith(("/", "refs/")) or name.endswith("/") or " " in name:
            raise _HTTPError(400, f"Invalid branch name: {name!r}")
        body = self._json_body() if method == "POST" else {}
        with self.store.lock:
            refs = self.store.refs(repo)
            if method == "DELETE":
                if name not in refs["branches"]:
                    raise _HTTPError(404, f"Branch not found: {name}", code="RevisionNotFound")
                if name == "main":
                    raise _HTTPError(403, "Cannot delete the default branch")
                del refs["branches"][name]
            else:
                if name in refs["branches"]:
                    raise _HTTPError(409, f"Reference already exists: refs/heads/{name}")
                start = body.get("startingPoint") or "main"
                refs["branches"][name] = self._revision(repo, start, refs)
            self.store.write_refs(repo, refs)
        self._send_json({})

    def _tag(self, repo: _Repo, rest: str, method: str) -> None:
        with self.store.lock:
            refs = self.store.refs(repo)
            if method == "DELETE":
                if rest not in refs["tags"]:
                    raise _HTTPError(404, f"Tag not found: {rest}", code="RevisionNotFound")
                del refs["tags"][rest]
            else:
                tag = self._json_body().get("tag")
                if not isinstance(tag, str) or not tag or ".." in tag or " " in tag:
                    raise _HTTPError(400, f"Invalid tag name: {tag!r}")
                if tag in refs["tags"]:
                    raise _HTTPError(409, f"Tag already exists: {tag}")
                refs["tags"][tag] = self._revision(repo, rest or "main", refs)
            self.store.write_refs(repo, refs)
        self._send_json({})

    # uploads ----------------------------------------------------------------------------------
    def _preupload(self, repo: _Repo, revision: str) -> None:
        body = self._json_body()
        oid = self._revision(repo, revision)
        tree = self.store.commit(repo, oid)["tree"]
        files = body.get("files")
        if not isinstance(files, list):
            raise _HTTPError(400, "Expected a `files` list")
        out = []
        for item in files:
            path = _check_repo_path(item.get("path"))
            size = int(item.get("size") or 0)
            try:
                sample = base64.b64decode(item.get("sample") or "")
            except ValueError:
                sample = b""
            mode = "lfs" if size > 0 and _wants_lfs(path, size, sample) else "regular"
            existing = tree.get(path)
            remote_oid = None
            if existing is not None:
                remote_oid = existing["blob"] if existing["lfs"] else existing["oid"]
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": remote_oid})
        self._send_json({"files": out, "commitOid": oid})

    def _lfs_batch(self, repo: _Repo) -> None:
        body = self._json_body()
        if body.get("operation", "upload") != "upload":
            raise _HTTPError(400, "Only the `upload` LFS operation is supported")
        objects = []
        base = self._base_url()
        for obj in body.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append(
                    {
                        "oid": str(oid),
                        "size": size if isinstance(size, int) else 0,
                        "error": {"code": 422, "message": "Invalid oid or size"},
                    }
                )
                continue
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if self.store.blob_size(oid) != size:
                sig = self.emu._lfs_sig(oid)
                answer["actions"] = {
                    "upload": {"href": f"{base}/_lfs/{oid}?size={size}&sig={sig}", "expires_in": 86400},
                    "verify": {"href": f"{base}/_lfs/{oid}/verify?sig={sig}", "expires_in": 86400},
                }
            objects.append(answer)
        self._send_json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_put(self, oid: str, query: dict) -> None:
        if not _SHA256_RE.match(oid):
            raise _HTTPError(400, f"Invalid LFS oid: {oid!r}")
        size = self.store.put_stream(self._iter_body(), oid)
        expected = (query.get("size") or [None])[-1]
        if expected is not None and expected.isdigit() and int(expected) != size:
            logger.warning("LFS object %s: announced size %s, received %d bytes", oid, expected, size)
        self._send(200, b"", {"ETag": f'"{oid}"'}, content_type="text/plain")

    def _lfs_verify(self, oid: str) -> None:
        body = self._json_body()
        size = self.store.blob_size(oid)
        if size is None:
            raise _HTTPError(404, f"LFS object {oid} was not uploaded")
        if body.get("size") is not None and body["size"] != size:
            raise _HTTPError(422, f"LFS object {oid} has size {size}, expected {body['size']}")
        self._send_json({"oid": oid, "size": size})

    def _commit(self, repo: _Repo, revision: str, create_pr: bool) -> None:
        lines = [ln for ln in self._body().splitlines() if ln.strip()]
        try:
            items = [json.loads(ln) for ln in lines]
        except ValueError as e:
            raise _HTTPError(400, f"Invalid NDJSON commit payload: {e}") from e
        if not items or items[0].get("key") != "header":
            raise _HTTPError(400, "The first line of the commit payload must be the header")
        header = items[0].get("value") or {}
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise _HTTPError(400, "Commit summary is required")
        parent_commit = header.get("parentCommit")
        author = self._user()

        with self.store.lock:  # validate and apply under the lock: commits are serialized
            refs = self.store.refs(repo)
            head = self._revision(repo, revision, refs)
            pr_match = _PR_REF_RE.match(revision)
            if create_pr:
                if revision not in refs["branches"] and not revision.startswith("refs/heads/"):
                    raise _HTTPError(400, f"Pull requests must target a branch, not {revision!r}")
            elif not (revision in refs["branches"] or revision.startswith("refs/heads/") or pr_match):
                raise _HTTPError(400, f"Cannot commit to {revision!r}: not a branch")
            if parent_commit is not None and parent_commit != head:
                raise _HTTPError(
                    412,
                    f"A commit has happened since. Please refresh and try again "
                    f"(parentCommit {parent_commit}, head of {revision} is {head}).",
                )
            tree = dict(self.store.commit(repo, head)["tree"])
            new_blobs: list[bytes] = []
            for item in items[1:]:
                key, value = item.get("key"), item.get("value") or {}
                if key == "file":
                    path = _check_repo_path(value.get("path"))
                    content = value.get("content") or ""
                    if value.get("encoding", "base64") == "base64":
                        try:
                            data = base64.b64decode(content, validate=True)
                        except ValueError as e:
                            raise _HTTPError(400, f"Invalid base64 content for {path}") from e
                    else:
                        data = content.encode()
                    if len(data) > MAX_REGULAR_FILE_SIZE:
                        raise _HTTPError(
                            400,
                            f"Your push was rejected because it contains files larger than "
                            f"10 MiB: {path}. Please use LFS.",
                        )
                    new_blobs.append(data)
                    tree[path] = {
                        "blob": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                        "lfs": False,
                        "oid": _git_blob_oid(data),
                    }
                elif key == "lfsFile":
                    path = _check_repo_path(value.get("path"))
                    oid = value.get("oid")
                    if (
                        value.get("algo", "sha256") != "sha256"
                        or not isinstance(oid, str)
                        or not _SHA256_RE.match(oid)
                    ):
                        raise _HTTPError(400, f"Invalid LFS pointer for {path}")
                    stored = self.store.blob_size(oid)
                    if stored is None:
                        raise _HTTPError(
                            400,
                            f"Your push was rejected because an LFS pointer pointed to a file "
                            f"that does not exist: {path} (oid {oid}).",
                        )
                    if value.get("size") is not None and value["size"] != stored:
                        raise _HTTPError(
                            400, f"LFS object {oid} has size {stored}, commit says {value['size']}"
                        )
                    tree[path] = {
                        "blob": oid,
                        "size": stored,
                        "lfs": True,
                        "oid": _git_blob_oid(_lfs_pointer(oid, stored)),
                    }
                elif key == "deletedFile":
                    path = _check_repo_path(value.get("path"))
                    if path not in tree:
                        raise _HTTPError(
                            404, f"A file with this name doesn't exist: {path}", code="EntryNotFound"
                        )
                    del tree[path]
                elif key == "deletedFolder":
                    folder = _check_repo_path(str(value.get("path") or "").rstrip("/"))
                    doomed = [p for p in tree if p.startswith(folder + "/")]
                    if not doomed:
                        raise _HTTPError(
                            404, f"A folder with this name doesn't exist: {folder}", code="EntryNotFound"
                        )
                    for p in doomed:
                        del tree[p]
                else:
                    raise _HTTPError(400, f"Unknown commit operation key: {key!r}")
            folders = set()
            for p in tree:
                parts = p.split("/")
                folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
            clash = sorted(p for p in tree if p in folders)
            if clash:
                raise _HTTPError(400, f"A path is both a file and a folder: {clash[0]}")
            # Everything validated: from here on nothing can fail on the request's account.
            for data in new_blobs:
                self.store.put_bytes(data)
            new_oid = self.store.write_commit(
                repo, [head], summary, header.get("description") or "", author, tree
            )
            pr_url = None
            if create_pr:
                number = str(max((int(n) for n in refs["pulls"]), default=0) + 1)
                refs["pulls"][number] = new_oid
                pr_url = f"{self._repo_url(repo.type, repo.id)}/discussions/{number}"
            elif pr_match:
                refs["pulls"][pr_match.group(1)] = new_oid
            else:
                refs["branches"][revision.removeprefix("refs/heads/")] = new_oid
            self.store.write_refs(repo, refs)  # the atomic switch
        logger.info("Commit %s on %s@%s: %s", new_oid[:10], repo.id, revision, summary)
        self._send_json(
            {
                "commitUrl": f"{self._repo_url(repo.type, repo.id)}/commit/{new_oid}",
                "commitOid": new_oid,
                "success": True,
                "pullRequestUrl": pr_url,
            }
        )

    # downloads --------------------------------------------------------------------------------
    def _resolve(self, repo: _Repo, segs: list[str]) -> None:
        _, oid, path_segs = self._split_rev(repo, segs)
        path = unquote("/".join(path_segs))
        entry = self.store.commit(repo, oid)["tree"].get(path)
        if entry is None:
            raise _HTTPError(
                404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": oid}
            )
        size = entry["size"]
        name = path.rsplit("/", 1)[-1]
        ascii_name = _header_safe(name).replace('"', "_").replace("?", "_")
        headers = {
            "X-Repo-Commit": oid,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{ascii_name}\";",
        }
        if entry["lfs"]:
            headers.update(
                {
                    "ETag": f'"{entry["blob"]}"',
                    "X-Linked-Etag": f'"{entry["blob"]}"',
                    "X-Linked-Size": str(size),
                }
            )
        else:
            headers["ETag"] = f'"{entry["oid"]}"'
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header:
            match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", range_header)
            if match is None or (not match.group(1) and not match.group(2)):
                raise _HTTPError(
                    416, f"Unsupported Range: {range_header}", headers={"Content-Range": f"bytes */{size}"}
                )
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:
                start, end = max(size - int(match.group(2)), 0), size - 1
            if start >= size or start > end:
                raise _HTTPError(
                    416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"}
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        self._start(status, headers, length, "application/octet-stream")
        if self.command == "HEAD" or length == 0:
            return
        with open(self.store.blob_path(entry["blob"]), "rb") as f:
            f.seek(start)
            remaining = length
            while remaining > 0:
                chunk = f.read(min(remaining, _CHUNK))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


class HubEmulator:
    """A local server that speaks the Hub's HTTP protocol as huggingface_hub uses it, keeping repos on disk.

    Args:
        root: folder holding the repos and blobs; created if missing and kept after the emulator
            stops (so a later emulator on the same root serves the same repos). By default, a
            temporary folder that is removed when the ``with`` block exits.
        host: interface to listen on (default ``127.0.0.1``).
        port: TCP port; ``0`` (default) picks a free one, see :attr:`endpoint`.
        token: if given, every request must carry ``Authorization: Bearer <token>`` (401 otherwise).
        username: the user name ``whoami`` reports and repos without a namespace are created under;
            by default derived from the request's token.

    Attributes:
        requests: the log of served requests, as :class:`RequestRecord` ``(method, path, status)``
            tuples in arrival order (never any header, so never the token). Clear it with
            ``emu.requests.clear()``.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        username: str | None = None,
    ):
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        if root is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="hub-emulator-")
            root = self._tmpdir.name
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port
        self.token = token
        self.username = username
        self.requests: list[RequestRecord] = []
        self._store = _Store(self.root)
        self._faults: list[_Fault] = []
        self._faults_lock = threading.Lock()
        self._lfs_secret = secrets.token_bytes(32)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # lifecycle ------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """Base URL for clients, e.g. ``http://127.0.0.1:54321`` (the real port once started)."""
        if self._server is None and not self.port:
            raise RuntimeError("HubEmulator is not started: call start() (or use it as a context manager)")
        host = self.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Self:
        """Start serving in a background (daemon) thread; returns ``self``."""
        if self._server is not None:
            return self
        server_cls = _Server6 if ":" in self.host else _Server
        server = server_cls((self.host, self.port), _Handler)
        server.emulator = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"hub-emulator-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.info("Hub emulator serving %s at %s", self.root, self.endpoint)
        return self

    def stop(self) -> None:
        """Stop serving (idempotent). Repos stay on disk under :attr:`root`."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=10)
        logger.info("Hub emulator on port %s stopped", self.port)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def serve_forever(self) -> None:
        """Serve in the foreground until KeyboardInterrupt (Ctrl-C), then stop."""
        self.start()
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            logger.info("Interrupted")
        finally:
            self.stop()

    # fault injection ------------------------------------------------------------------------------
    def inject_fault(
        self,
        kind: str,
        *,
        path_regex: str = ".*",
        method: str | None = None,
        times: int | None = 1,
        delay: float = 0.0,
        status: int = 500,
    ) -> None:
        """Make the next ``times`` requests whose path matches ``path_regex`` misbehave.

        Args:
            kind: ``"status"`` answers with HTTP ``status`` (e.g. 500, 502, 503, or 429 which also
                sends ``Retry-After: 0``) without handling the request; ``"delay"`` sleeps ``delay``
                seconds and then handles the request normally; ``"drop"`` reads the request and
                closes the connection without answering (the client sees a protocol error).
            path_regex: ``re.search``-ed against the URL path as sent (percent-encoded, no query),
                e.g. ``r"/preupload/"``, ``r"^/_lfs/"`` (LFS PUTs), ``r"/resolve/"``, ``r"/commit/"``.
            method: only requests with this HTTP method (``"GET"``, ``"HEAD"``, ``"POST"``, ``"PUT"``...).
            times: how many matching requests to affect; ``None`` for all until :meth:`clear_faults`.

        Faults are checked in the order they were injected, before authentication; the first that
        matches applies. Affected requests appear in :attr:`requests` (status ``None`` when dropped).
        """
        if kind not in _FAULT_KINDS:
            raise ValueError(f"kind must be one of {_FAULT_KINDS}, got {kind!r}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 (or None for unlimited)")
        if kind == "status" and not 400 <= int(status) <= 599:
            raise ValueError(f"status must be an HTTP error code (4xx/5xx), got {status}")
        if delay < 0:
            raise ValueError("delay must be >= 0")
        fault = _Fault(
            kind, re.compile(path_regex), method.upper() if method else None, times, float(delay), int(status)
        )
        with self._faults_lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        """Forget all pending faults."""
        with self._faults_lock:
            self._faults.clear()

    @property
    def pending_faults(self) -> int:
        """Number of injected faults not used up yet."""
        with self._faults_lock:
            return len(self._faults)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._faults_lock:
            for fault in self._faults:
                if (fault.method is None or fault.method == method) and fault.pattern.search(path):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    # inspection helpers ---------------------------------------------------------------------------
    def repo_path(self, repo_id: str, repo_type: str = "model") -> Path:
        """Folder holding ``repo_id``'s refs and commits (whether or not it exists)."""
        return self._store.repo_dir(repo_type, repo_id)

    # internals ------------------------------------------------------------------------------------
    def _user_for_token(self, token: str | None) -> str:
        if self.username:
            return self.username
        if token:
            return "user-" + hashlib.sha256(token.encode()).hexdigest()[:8]
        return "anonymous"

    def _lfs_sig(self, oid: str) -> str:
        return hmac.new(self._lfs_secret, oid.encode(), hashlib.sha256).hexdigest()[:32]

    def _lfs_sig_ok(self, oid: str, sig: str) -> bool:
        return bool(sig) and hmac.compare_digest(self._lfs_sig(unquote(oid)), sig)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or "hub", description="Local Hugging Face Hub emulator.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve a local Hub emulator until Ctrl-C",
        description="Serve a local Hub emulator (for testing publishing code) until Ctrl-C.",
    )
    serve.add_argument(
        "--root",
        default=None,
        help="folder for repos and blobs (default: a temporary folder, removed on exit)",
    )
    serve.add_argument("--port", type=int, default=0, help="TCP port (default 0: pick a free port)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--token", default=None, help="require `Authorization: Bearer TOKEN` on every request")
    serve.add_argument("--username", default=None, help="user name reported by whoami")
    serve.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``hub serve --root DIR --port N [--host H] [--token T]``: serve until Ctrl-C; returns 0."""
    args = _build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(levelname)s %(message)s")
    emu = HubEmulator(args.root, host=args.host, port=args.port, token=args.token, username=args.username)
    try:
        emu.start()
        env = f"HF_ENDPOINT={emu.endpoint} HF_HUB_DISABLE_XET=1"
        if args.token:
            env += " HF_TOKEN=<token>"
        print(f"Hub emulator serving {emu.root} at {emu.endpoint}", flush=True)
        print(f"Client settings: {env}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        emu.serve_forever()
    finally:
        emu.__exit__(None, None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
