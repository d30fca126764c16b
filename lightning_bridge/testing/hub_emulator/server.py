"""The emulator's HTTP server and request handler: fault injection, token check, then routing to an endpoint.

:class:`Handler` serves one request at a time per connection: :meth:`Handler._dispatch` applies an
injected fault if one matches, checks the token, and :meth:`Handler._route` maps the URL to one
endpoint of :class:`~.read_api.ReadAPI` or :class:`~.write_api.WriteAPI`. Every
:class:`~.protocol.HubError` becomes an HTTP error response; every request lands in the emulator's
request log.
"""

from __future__ import annotations

import hmac
import logging
import socket
import sys
import time
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

from .protocol import TYPE_FROM_PLURAL, HubError, is_true
from .read_api import ReadAPI
from .storage import Repo
from .write_api import WriteAPI

if TYPE_CHECKING:
    from .emulator import HubEmulator

logger = logging.getLogger(__name__)


class EmulatorServer(ThreadingHTTPServer):
    """A threading HTTP server (IPv4) whose handlers serve :attr:`emulator`'s repos."""

    daemon_threads = True
    allow_reuse_address = True
    emulator: HubEmulator

    def handle_error(self, request, client_address):  # no tracebacks on stderr
        logger.debug("Error while serving %s: %r", client_address, sys.exc_info()[1])


class EmulatorServer6(EmulatorServer):
    """:class:`EmulatorServer` on an IPv6 address."""

    address_family = socket.AF_INET6


class Handler(ReadAPI, WriteAPI):
    """Handles every request method the same way: see :meth:`_dispatch`."""

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _dispatch(self) -> None:
        self._body_started = False
        self._body_bytes = None
        self._status = None
        self._recorded = False
        split = urlsplit(self.path)
        raw_path = self._raw_path = split.path or "/"
        query = parse_qs(split.query, keep_blank_values=True)
        method = self.command
        try:
            fault = self.emu._faults.take(method, raw_path)
            if fault is not None and fault.kind == "drop":
                self._drain()
                self.close_connection = True
                self._record(None)
                logger.debug("Injected fault: dropping %s %s", method, raw_path)
                return
            if fault is not None and fault.kind == "status":
                headers = {"Retry-After": "0"} if fault.status == 429 else {}
                raise HubError(fault.status, f"Injected fault: HTTP {fault.status}", headers=headers)
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.delay)
            self._check_auth(raw_path, query)
            self._route(method, raw_path, query)
        except HubError as err:
            self._send_error(err)
        except (TimeoutError, ConnectionError) as err:
            logger.debug("Connection error on %s %s: %s", method, raw_path, err)
            self.close_connection = True
        except Exception as err:  # pragma: no cover - a bug in the emulator
            logger.exception("Hub emulator failed on %s %s", method, raw_path)
            if self._status is None:
                try:
                    self._send_error(HubError(500, f"Internal emulator error: {err!r}"))
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
            raise HubError(401, "Authorization header with a Bearer token is required")
        if not hmac.compare_digest(token.encode(), expected.encode()):
            raise HubError(401, "Invalid credentials in Authorization header")

    def _route(self, method: str, raw_path: str, query: dict) -> None:
        segs = raw_path.split("/")[1:]
        if segs and segs[0] == "_lfs" and len(segs) >= 2:
            oid = unquote(segs[1])
            if len(segs) == 2 and method == "PUT":
                return self._lfs_put(oid, query)
            if len(segs) == 3 and segs[2] == "verify" and method == "POST":
                return self._lfs_verify(oid)
            raise HubError(405 if len(segs) <= 3 else 404, f"Unsupported LFS request {method} {raw_path}")
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
            if len(rest) >= 2 and rest[0] in TYPE_FROM_PLURAL:
                repo_type = TYPE_FROM_PLURAL[rest[0]]
                repo, action = self._parse_repo(repo_type, rest[1:])
                return self._api_repo(method, repo, action, query)
            raise HubError(404, f"Unknown API route {method} {raw_path}")
        # `/[datasets/|spaces/]{ns}/{name}/resolve/...` and `/[...]{ns}/{name}.git/info/lfs/objects/batch`
        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type = TYPE_FROM_PLURAL[segs[0]]
            segs = segs[1:]
        for i in (1, 0):
            if (
                len(segs) > i + 1
                and segs[i].endswith(".git")
                and segs[i + 1 :] == ["info", "lfs", "objects", "batch"]
            ):
                repo_id = "/".join(unquote(s) for s in segs[: i + 1])[: -len(".git")]
                if method != "POST":
                    raise HubError(405, "Method not allowed")
                return self._lfs_batch(self._get_repo(repo_type, repo_id))
        if len(segs) >= 3 and "resolve" in segs[1:3]:
            i = segs.index("resolve", 1)
            repo = self._get_repo(repo_type, "/".join(unquote(s) for s in segs[:i]))
            if method not in ("GET", "HEAD"):
                raise HubError(405, "Method not allowed")
            return self._resolve(repo, segs[i + 1 :])
        raise HubError(404, f"Not found: {method} {raw_path}")

    # /api/{type}s/{repo}/... ------------------------------------------------------------------
    def _api_repo(self, method: str, repo: Repo, action: list[str], query: dict) -> None:
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
            return self._commit(repo, unquote(rest) or "main", is_true(query.get("create_pr")))
        if verb == "branch" and method in ("POST", "DELETE"):
            return self._branch(repo, unquote(rest), method)
        if verb == "tag" and method in ("POST", "DELETE"):
            return self._tag(repo, unquote(rest), method)
        if verb == "settings" and method == "PUT":
            return self._settings(repo)
        raise HubError(404, f"Unsupported: {method} {'/'.join(action)}")
