"""The emulator's write endpoints: repos, settings, branches and tags, preupload, LFS transfers, commits.

Each ``_name`` method answers one Hub API route (see :meth:`.server.Handler._route` for the URLs).
Whatever changes refs or repo metadata holds :attr:`.storage.Store.lock` from validation to the
final ref write, so concurrent writes are serialized and a refused request changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from typing import Any

from .handler import HandlerBase
from .protocol import (
    MAX_REGULAR_FILE_SIZE,
    NAME_RE,
    PR_REF_RE,
    SHA256_RE,
    URL_PREFIX,
    HubError,
    check_repo_path,
    front_matter_error,
    git_blob_oid,
    lfs_pointer,
    wants_lfs,
)
from .storage import Repo

logger = logging.getLogger(__name__)


class WriteAPI(HandlerBase):
    """Endpoints that change repos: create/delete, settings, branches and tags, uploads and commits."""

    # repos ------------------------------------------------------------------------------------
    def _create_repo(self) -> None:
        body = self._json_body()
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Unsupported repo type: {repo_type!r}")
        name, namespace = body.get("name"), body.get("organization") or self._user()
        if not isinstance(name, str) or not NAME_RE.match(name) or name.endswith(".git"):
            raise HubError(400, f"Invalid repo name: {name!r}")
        if not NAME_RE.match(namespace):
            raise HubError(400, f"Invalid namespace: {namespace!r}")
        repo_id = f"{namespace}/{name}"
        private = body.get("private")
        if body.get("visibility") is not None:
            private = body["visibility"] != "public"
        url = self._repo_url(repo_type, repo_id)
        with self.store.lock:
            if self.store.get_repo(repo_type, repo_id) is not None:
                raise HubError(409, f"You already created this {repo_type} repo", body={"url": url})
            repo = self.store.create_repo(repo_type, repo_id, bool(private), self._user())
        meta = self.store.repo_meta(repo)
        logger.info("Created %s repo %s", repo_type, repo_id)
        self._send_json({"url": url, "name": repo_id, "id": meta["_id"]})

    def _delete_repo(self) -> None:
        body = self._json_body()
        repo_type = body.get("type") or "model"
        namespace = body.get("organization") or self._user()
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Unsupported repo type: {repo_type!r}")
        with self.store.lock:
            repo = self._get_repo(repo_type, f"{namespace}/{body.get('name')}")
            self.store.delete_repo(repo)
        self._send_json({})

    def _validate_yaml(self) -> None:
        error = front_matter_error(self._json_body().get("content") or "")
        if error is not None:
            self._send_json(
                {"errors": [{"message": error}], "warnings": []},
                400,
                {"X-Error-Message": "Invalid YAML in README.md front matter"},
            )
            return
        self._send_json({"errors": [], "warnings": []})

    def _settings(self, repo: Repo) -> None:
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
    def _branch(self, repo: Repo, name: str, method: str) -> None:
        if not name or ".." in name or name.startswith(("/", "refs/")) or name.endswith("/") or " " in name:
            raise HubError(400, f"Invalid branch name: {name!r}")
        body = self._json_body() if method == "POST" else {}
        with self.store.lock:
            refs = self.store.refs(repo)
            if method == "DELETE":
                if name not in refs["branches"]:
                    raise HubError(404, f"Branch not found: {name}", code="RevisionNotFound")
                if name == "main":
                    raise HubError(403, "Cannot delete the default branch")
                del refs["branches"][name]
            else:
                if name in refs["branches"]:
                    raise HubError(409, f"Reference already exists: refs/heads/{name}")
                start = body.get("startingPoint") or "main"
                refs["branches"][name] = self._revision(repo, start, refs)
            self.store.write_refs(repo, refs)
        self._send_json({})

    def _tag(self, repo: Repo, rest: str, method: str) -> None:
        with self.store.lock:
            refs = self.store.refs(repo)
            if method == "DELETE":
                if rest not in refs["tags"]:
                    raise HubError(404, f"Tag not found: {rest}", code="RevisionNotFound")
                del refs["tags"][rest]
            else:
                tag = self._json_body().get("tag")
                if not isinstance(tag, str) or not tag or ".." in tag or " " in tag:
                    raise HubError(400, f"Invalid tag name: {tag!r}")
                if tag in refs["tags"]:
                    raise HubError(409, f"Tag already exists: {tag}")
                refs["tags"][tag] = self._revision(repo, rest or "main", refs)
            self.store.write_refs(repo, refs)
        self._send_json({})

    # uploads ----------------------------------------------------------------------------------
    def _preupload(self, repo: Repo, revision: str) -> None:
        body = self._json_body()
        oid = self._revision(repo, revision)
        tree = self.store.commit(repo, oid)["tree"]
        files = body.get("files")
        if not isinstance(files, list):
            raise HubError(400, "Expected a `files` list")
        out = []
        for item in files:
            path = check_repo_path(item.get("path"))
            size = int(item.get("size") or 0)
            try:
                sample = base64.b64decode(item.get("sample") or "")
            except ValueError:
                sample = b""
            mode = "lfs" if size > 0 and wants_lfs(path, size, sample) else "regular"
            existing = tree.get(path)
            remote_oid = None
            if existing is not None:
                remote_oid = existing["blob"] if existing["lfs"] else existing["oid"]
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": remote_oid})
        self._send_json({"files": out, "commitOid": oid})

    def _lfs_batch(self, repo: Repo) -> None:
        body = self._json_body()
        if body.get("operation", "upload") != "upload":
            raise HubError(400, "Only the `upload` LFS operation is supported")
        objects = []
        base = self._base_url()
        for obj in body.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
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
        if not SHA256_RE.match(oid):
            raise HubError(400, f"Invalid LFS oid: {oid!r}")
        size = self.store.put_stream(self._iter_body(), oid)
        expected = (query.get("size") or [None])[-1]
        if expected is not None and expected.isdigit() and int(expected) != size:
            logger.warning("LFS object %s: announced size %s, received %d bytes", oid, expected, size)
        self._send(200, b"", {"ETag": f'"{oid}"'}, content_type="text/plain")

    def _lfs_verify(self, oid: str) -> None:
        body = self._json_body()
        size = self.store.blob_size(oid)
        if size is None:
            raise HubError(404, f"LFS object {oid} was not uploaded")
        if body.get("size") is not None and body["size"] != size:
            raise HubError(422, f"LFS object {oid} has size {size}, expected {body['size']}")
        self._send_json({"oid": oid, "size": size})

    def _commit(self, repo: Repo, revision: str, create_pr: bool) -> None:
        lines = [ln for ln in self._body().splitlines() if ln.strip()]
        try:
            items = [json.loads(ln) for ln in lines]
        except ValueError as e:
            raise HubError(400, f"Invalid NDJSON commit payload: {e}") from e
        if not items or items[0].get("key") != "header":
            raise HubError(400, "The first line of the commit payload must be the header")
        header = items[0].get("value") or {}
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise HubError(400, "Commit summary is required")
        parent_commit = header.get("parentCommit")
        author = self._user()

        with self.store.lock:  # validate and apply under the lock: commits are serialized
            refs = self.store.refs(repo)
            head = self._revision(repo, revision, refs)
            pr_match = PR_REF_RE.match(revision)
            if create_pr:
                if revision not in refs["branches"] and not revision.startswith("refs/heads/"):
                    raise HubError(400, f"Pull requests must target a branch, not {revision!r}")
            elif not (revision in refs["branches"] or revision.startswith("refs/heads/") or pr_match):
                raise HubError(400, f"Cannot commit to {revision!r}: not a branch")
            if parent_commit is not None and parent_commit != head:
                raise HubError(
                    412,
                    f"A commit has happened since. Please refresh and try again "
                    f"(parentCommit {parent_commit}, head of {revision} is {head}).",
                )
            tree = dict(self.store.commit(repo, head)["tree"])
            new_blobs = self._apply_operations(tree, items[1:])
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

    def _apply_operations(self, tree: dict, operations: list[dict]) -> list[bytes]:
        """Apply a commit's file operations to ``tree`` (in place) and return the new regular files'
        contents; raise on the first invalid operation, or if a path ends up both file and folder."""
        new_blobs: list[bytes] = []
        for item in operations:
            key, value = item.get("key"), item.get("value") or {}
            if key == "file":
                path = check_repo_path(value.get("path"))
                content = value.get("content") or ""
                if value.get("encoding", "base64") == "base64":
                    try:
                        data = base64.b64decode(content, validate=True)
                    except ValueError as e:
                        raise HubError(400, f"Invalid base64 content for {path}") from e
                else:
                    data = content.encode()
                if len(data) > MAX_REGULAR_FILE_SIZE:
                    raise HubError(
                        400,
                        f"Your push was rejected because it contains files larger than "
                        f"10 MiB: {path}. Please use LFS.",
                    )
                new_blobs.append(data)
                tree[path] = {
                    "blob": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "lfs": False,
                    "oid": git_blob_oid(data),
                }
            elif key == "lfsFile":
                path = check_repo_path(value.get("path"))
                oid = value.get("oid")
                if (
                    value.get("algo", "sha256") != "sha256"
                    or not isinstance(oid, str)
                    or not SHA256_RE.match(oid)
                ):
                    raise HubError(400, f"Invalid LFS pointer for {path}")
                stored = self.store.blob_size(oid)
                if stored is None:
                    raise HubError(
                        400,
                        f"Your push was rejected because an LFS pointer pointed to a file "
                        f"that does not exist: {path} (oid {oid}).",
                    )
                if value.get("size") is not None and value["size"] != stored:
                    raise HubError(400, f"LFS object {oid} has size {stored}, commit says {value['size']}")
                tree[path] = {
                    "blob": oid,
                    "size": stored,
                    "lfs": True,
                    "oid": git_blob_oid(lfs_pointer(oid, stored)),
                }
            elif key == "deletedFile":
                path = check_repo_path(value.get("path"))
                if path not in tree:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                del tree[path]
            elif key == "deletedFolder":
                folder = check_repo_path(str(value.get("path") or "").rstrip("/"))
                doomed = [p for p in tree if p.startswith(folder + "/")]
                if not doomed:
                    raise HubError(
                        404, f"A folder with this name doesn't exist: {folder}", code="EntryNotFound"
                    )
                for p in doomed:
                    del tree[p]
            else:
                raise HubError(400, f"Unknown commit operation key: {key!r}")
        folders = set()
        for p in tree:
            parts = p.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        clash = sorted(p for p in tree if p in folders)
        if clash:
            raise HubError(400, f"A path is both a file and a folder: {clash[0]}")
        return new_blobs
