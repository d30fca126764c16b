"""The emulator's repositories on disk: content-addressed blobs, and per-repo metadata, refs and commits.

Layout under ``root``: ``blobs/<sha256>`` holds file contents; each repo lives in
``repos/<type>s/<namespace>/<name>/`` with ``repo.json`` (metadata), ``refs.json`` (branches, tags,
pull-request refs -> commit id) and ``commits/<commit id>.json`` (parents, message, date and the
full file tree ``path -> {"blob": sha256, "size", "lfs", "oid"}``). Commit ids are the sha1 of the
commit's JSON. Every write goes to a temporary file first and is moved into place with
``os.replace``; callers serialize ref updates with :attr:`Store.lock`, so concurrent requests are safe.
Blobs are shared by all repos and never garbage-collected.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .protocol import (
    COMMIT_RE,
    DEFAULT_GITATTRIBUTES,
    NAME_RE,
    PR_REF_RE,
    SHA256_RE,
    HubError,
    git_blob_oid,
    now_iso,
)


@dataclass(frozen=True)
class Repo:
    """An existing repo: its type (``"model"``, ``"dataset"`` or ``"space"``), ``namespace/name`` id and folder."""

    type: str
    id: str
    dir: Path


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


class Store:
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
        if not SHA256_RE.match(sha256):
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
        """Stream `chunks` into the blob store; raises `HubError(400)` if the sha256 differs."""
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
                raise HubError(400, f"Uploaded content has sha256 {actual}, expected {expected_sha256}")
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

    def get_repo(self, repo_type: str, repo_id: str) -> Repo | None:
        if repo_id.count("/") != 1 or not all(NAME_RE.match(p) for p in repo_id.split("/")):
            return None
        rdir = self.repo_dir(repo_type, repo_id)
        if not (rdir / "refs.json").is_file():
            return None
        return Repo(repo_type, repo_id, rdir)

    def repo_meta(self, repo: Repo) -> dict:
        return json.loads((repo.dir / "repo.json").read_text())

    def write_repo_meta(self, repo: Repo, meta: dict) -> None:
        _atomic_write(repo.dir / "repo.json", _dump(meta))

    def refs(self, repo: Repo) -> dict:
        refs = json.loads((repo.dir / "refs.json").read_text())
        refs.setdefault("branches", {})
        refs.setdefault("tags", {})
        refs.setdefault("pulls", {})
        return refs

    def write_refs(self, repo: Repo, refs: dict) -> None:
        _atomic_write(repo.dir / "refs.json", _dump(refs))

    def commit(self, repo: Repo, oid: str) -> dict | None:
        if not COMMIT_RE.match(oid):
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
        self, repo: Repo, parents: list[str], title: str, message: str, author: str, tree: dict
    ) -> str:
        body = {
            "parents": parents,
            "title": title,
            "message": message,
            "author": author,
            "date": now_iso(),
            "tree": tree,
        }
        oid = hashlib.sha1(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        body["id"] = oid
        _atomic_write(repo.dir / "commits" / f"{oid}.json", _dump(body))
        return oid

    def resolve(self, repo: Repo, revision: str, refs: dict | None = None) -> str | None:
        refs = refs if refs is not None else self.refs(repo)
        if revision in refs["branches"]:
            return refs["branches"][revision]
        if revision in refs["tags"]:
            return refs["tags"][revision]
        if revision.startswith("refs/heads/") and revision[11:] in refs["branches"]:
            return refs["branches"][revision[11:]]
        if revision.startswith("refs/tags/") and revision[10:] in refs["tags"]:
            return refs["tags"][revision[10:]]
        match = PR_REF_RE.match(revision)
        if match and match.group(1) in refs["pulls"]:
            return refs["pulls"][match.group(1)]
        if COMMIT_RE.match(revision) and self.commit(repo, revision) is not None:
            return revision
        return None

    def create_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> Repo:
        rdir = self.repo_dir(repo_type, repo_id)
        repo = Repo(repo_type, repo_id, rdir)
        rdir.mkdir(parents=True, exist_ok=True)
        meta = {
            "id": repo_id,
            "type": repo_type,
            "private": private,
            "createdAt": now_iso(),
            "_id": uuid.uuid4().hex[:24],
        }
        self.write_repo_meta(repo, meta)
        content = DEFAULT_GITATTRIBUTES.encode()
        sha = self.put_bytes(content)
        tree = {
            ".gitattributes": {"blob": sha, "size": len(content), "lfs": False, "oid": git_blob_oid(content)}
        }
        oid = self.write_commit(repo, [], "initial commit", "", author, tree)
        self.write_refs(repo, {"branches": {"main": oid}, "tags": {}, "pulls": {}})  # written last
        return repo

    def delete_repo(self, repo: Repo) -> None:
        trash = self.root / "tmp" / f"deleted-{uuid.uuid4().hex}"
        os.replace(repo.dir, trash)
        shutil.rmtree(trash, ignore_errors=True)
        self._commit_cache = {k: v for k, v in self._commit_cache.items() if k[0] != str(repo.dir)}
