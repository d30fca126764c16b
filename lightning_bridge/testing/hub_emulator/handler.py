"""HTTP plumbing of the emulator's request handler: request bodies, responses, the request log, repo lookups.

:class:`HandlerBase` is what every endpoint builds on. The endpoints live in :mod:`.read_api`
(listings, info, downloads) and :mod:`.write_api` (repos, refs, uploads, commits); the concrete
handler in :mod:`.server` combines them and routes each request to one. Every response closes its
connection (no keep-alive), so a request body is always read (or drained) before the answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote

from .protocol import REPO_ACTIONS, URL_PREFIX, HubError, header_safe
from .storage import Repo, Store

if TYPE_CHECKING:
    from .emulator import HubEmulator
    from .server import EmulatorServer

logger = logging.getLogger(__name__)

#: Bytes read or written at a time when streaming request and response bodies.
CHUNK_SIZE = 1 << 20


class RequestRecord(NamedTuple):
    """One served request: ``(method, path, status)``. ``path`` is the URL path as sent (still
    percent-encoded, without the query string); ``status`` is ``None`` for a dropped connection."""

    method: str
    path: str
    status: int | None


class HandlerBase(BaseHTTPRequestHandler):
    """Reads requests and writes responses for one connection; knows the emulator it serves."""

    protocol_version = "HTTP/1.1"
    server_version = "HubEmulator/1.0"
    timeout = 300
    server: EmulatorServer

    # Per-request state, reset by the dispatcher before each request.
    _body_started: bool
    _body_bytes: bytes | None
    _status: int | None
    _recorded: bool
    _raw_path: str

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    @property
    def emu(self) -> HubEmulator:
        return self.server.emulator

    @property
    def store(self) -> Store:
        return self.server.emulator._store

    # request body -----------------------------------------------------------------------------
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
                    chunk = self.rfile.read(min(remaining, CHUNK_SIZE))
                    if not chunk:
                        raise ConnectionError("connection closed in chunked body")
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, CHUNK_SIZE))
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
            raise HubError(400, f"Invalid JSON body: {e}") from e

    def _drain(self) -> None:
        if not self._body_started:
            for _ in self._iter_body():
                pass

    # responses and the request log ------------------------------------------------------------
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

    def _send_error(self, err: HubError) -> None:
        headers = {"X-Error-Message": header_safe(err.message), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_json({"error": err.message, **err.body}, err.status, headers)

    # caller -----------------------------------------------------------------------------------
    def _base_url(self) -> str:
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.emu.endpoint

    def _bearer(self) -> str | None:
        scheme, _, value = self.headers.get("Authorization", "").partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None

    def _user(self) -> str:
        return self.emu._user_for_token(self._bearer())

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self._base_url()}/{URL_PREFIX[repo_type]}{repo_id}"

    # repo and revision lookups ----------------------------------------------------------------
    def _get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.store.get_repo(repo_type, repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _parse_repo(self, repo_type: str, segs: list[str]) -> tuple[Repo, list[str]]:
        if len(segs) >= 2 and segs[1] not in REPO_ACTIONS:
            repo_id, action = f"{unquote(segs[0])}/{unquote(segs[1])}", segs[2:]
        else:
            repo_id, action = unquote(segs[0]), segs[1:]
        return self._get_repo(repo_type, repo_id), action

    def _revision(self, repo: Repo, revision: str, refs: dict | None = None) -> str:
        oid = self.store.resolve(repo, revision, refs)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return oid

    def _split_rev(self, repo: Repo, segs: list[str]) -> tuple[str, str, list[str]]:
        """Split `rev/path...` segments; the revision is usually one %-encoded segment, but accept
        a branch name with raw slashes too. Returns (revision, commit oid, remaining segments)."""
        if not segs or not segs[0]:
            raise HubError(404, "Missing revision", code="RevisionNotFound")
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
        raise HubError(404, f"Invalid rev id: {first}", code="RevisionNotFound")
