""":class:`HubEmulator`, the public face of the Hub emulator: start and stop it, inject faults, read its log.

See the package docstring (:mod:`lightning_bridge.testing.hub_emulator`) for what it emulates and
the client settings it needs.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from .faults import FaultList
from .handler import RequestRecord
from .server import EmulatorServer, EmulatorServer6, Handler
from .storage import Store

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)


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
        self._store = Store(self.root)
        self._faults = FaultList()
        self._lfs_secret = secrets.token_bytes(32)
        self._server: EmulatorServer | None = None
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
        server_cls = EmulatorServer6 if ":" in self.host else EmulatorServer
        server = server_cls((self.host, self.port), Handler)
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
        self._faults.add(kind, path_regex=path_regex, method=method, times=times, delay=delay, status=status)

    def clear_faults(self) -> None:
        """Forget all pending faults."""
        self._faults.clear()

    @property
    def pending_faults(self) -> int:
        """Number of injected faults not used up yet."""
        return len(self._faults)

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
