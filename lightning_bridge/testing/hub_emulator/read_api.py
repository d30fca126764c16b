"""The emulator's read endpoints: who am I, repo info, tree and paths-info listings, refs, history, downloads.

Each ``_name`` method answers one Hub API route (see :meth:`.server.Handler._route` for the URLs).
They only read the :class:`~.storage.Store`, so they take no lock: a ref file is replaced
atomically, and commits and blobs never change once written.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from .handler import CHUNK_SIZE, HandlerBase
from .protocol import HubError, front_matter, header_safe, is_true, lfs_pointer, now_iso
from .storage import Repo


class ReadAPI(HandlerBase):
    """Endpoints that read repos: account and repo info, listings, refs, commit history, file downloads."""

    # account and repo info --------------------------------------------------------------------
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
                    "accessToken": {"displayName": "hub-emulator", "role": "write", "createdAt": now_iso()},
                },
            }
        )

    def _repo_info(self, repo: Repo, revision: str, query: dict) -> None:
        oid = self._revision(repo, revision)
        commit = self.store.commit(repo, oid)
        meta = self.store.repo_meta(repo)
        with_blobs = is_true(query.get("blobs"))
        siblings = []
        for path in sorted(commit["tree"]):
            entry = commit["tree"][path]
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    pointer = lfs_pointer(entry["blob"], entry["size"])
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
        return front_matter(text)

    # listings ---------------------------------------------------------------------------------
    def _tree_entries(self, commit: dict, prefix: str, recursive: bool) -> list[dict]:
        tree = commit["tree"]
        base = f"{prefix}/" if prefix else ""
        if prefix and prefix not in tree and not any(p.startswith(base) for p in tree):
            raise HubError(
                404,
                f"Entry not found: {prefix}",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit["id"]},
            )
        if prefix in tree:
            raise HubError(
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
                "pointerSize": len(lfs_pointer(entry["blob"], entry["size"])),
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

    def _add_last_commits(self, repo: Repo, head: str, entries: list[dict]) -> None:
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

    def _tree(self, repo: Repo, oid: str, prefix: str, query: dict) -> None:
        commit = self.store.commit(repo, oid)
        entries = self._tree_entries(commit, prefix, is_true(query.get("recursive")))
        if is_true(query.get("expand")):
            self._add_last_commits(repo, oid, entries)
        self._send_json(entries)

    def _paths_info(self, repo: Repo, revision: str) -> None:
        oid = self._revision(repo, revision or "main")
        ctype = self.headers.get("Content-Type", "")
        raw = self._body()
        if "json" in ctype:
            body = json.loads(raw or b"{}")
            paths, expand = body.get("paths") or [], bool(body.get("expand"))
        else:
            form = parse_qs(raw.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), is_true(form.get("expand"))
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

    # refs and history ------------------------------------------------------------------------
    def _refs(self, repo: Repo) -> None:
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

    def _commits(self, repo: Repo, revision: str) -> None:
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

    # downloads --------------------------------------------------------------------------------
    def _resolve(self, repo: Repo, segs: list[str]) -> None:
        _, oid, path_segs = self._split_rev(repo, segs)
        path = unquote("/".join(path_segs))
        entry = self.store.commit(repo, oid)["tree"].get(path)
        if entry is None:
            raise HubError(
                404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": oid}
            )
        size = entry["size"]
        name = path.rsplit("/", 1)[-1]
        ascii_name = header_safe(name).replace('"', "_").replace("?", "_")
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
                raise HubError(
                    416, f"Unsupported Range: {range_header}", headers={"Content-Range": f"bytes */{size}"}
                )
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:
                start, end = max(size - int(match.group(2)), 0), size - 1
            if start >= size or start > end:
                raise HubError(
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
                chunk = f.read(min(remaining, CHUNK_SIZE))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)
