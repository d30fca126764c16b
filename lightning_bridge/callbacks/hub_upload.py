"""Uploads to the Hugging Face Hub for :class:`~lightning_bridge.callbacks.PushToHub`: HTTP and file I/O only.

:class:`HubUploader` pushes a folder's files to a branch in one commit (each shard pre-uploaded on its
own, weight files the new checkpoint no longer has deleted), retries transient failures with
exponential backoff or the server's ``Retry-After``, commits exactly once (a unique id in the commit
description, looked up after a failure that may have reached the server) and masks the token in every
message. :class:`BackgroundPush` runs one push at a time in a daemon thread. No torch or Lightning
here: nothing in this module may issue a collective.
"""

from __future__ import annotations

import email.utils
import functools
import importlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
PUSH_ID_KEY = "lightning-bridge-push-id"
_WEIGHT_FILE = re.compile(r"(\.safetensors|\.safetensors\.index\.json|\.bin|\.bin\.index\.json)$")
_SHARD = re.compile(r"\.(safetensors|bin)$")
_RETRY_STATUS = {408, 429}
_MAX_WAIT_S = 600.0
_LOCAL_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\"]+")


@dataclass
class PushResult:
    """One push: where it went and how it ended (``error`` is None on success)."""

    folder: str
    revision: str
    step: int | None = None
    commit_id: str | None = None
    commit_url: str | None = None
    error: str | None = None
    retries: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.commit_id is not None


class _PushError(Exception):
    """A push failed for good (the message is already redacted)."""


class HubUploader:
    """Pushes to one Hub repo with the callback's settings (token, endpoint, retries); see the module doc."""

    def __init__(self, repo_id: str, private: bool, token: str | None, endpoint: str | None, max_retries: int,
                 retry_backoff_s: float) -> None:
        self.repo_id, self.private = repo_id, private
        self._token, self.endpoint = token, endpoint
        self.max_retries, self.retry_backoff_s = max_retries, retry_backoff_s

    def api(self) -> Any:
        """A fresh ``HfApi`` for this endpoint and token."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint_url(), token=self._token)

    def endpoint_url(self) -> str | None:
        """The Hub URL: ``endpoint``, else ``HF_ENDPOINT``, else None (huggingface_hub's default)."""
        return self.endpoint or os.environ.get("HF_ENDPOINT") or None

    def _secrets(self) -> list[str]:
        found = [self._token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
        try:
            from huggingface_hub import get_token

            found.append(get_token())
        except Exception as exc:  # noqa: BLE001 - no stored token, or an old huggingface_hub
            logger.debug("PushToHub: no stored token to mask (%s)", type(exc).__name__)
        return sorted({s for s in found if isinstance(s, str) and len(s) >= 4}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        """``text`` with every token this process knows of, and any bearer header, masked as ``***``."""
        for secret in self._secrets():
            text = text.replace(secret, "***")
        return _BEARER.sub(r"\1***", text)

    def push(self, files: dict[str, Path | BinaryIO], revision: str, message: str, result: PushResult,
             start_from: str | None = None) -> None:
        """Push ``files`` (repo path -> file) to ``revision`` in one commit (the branch is created from
        ``start_from`` when missing); raises ``_PushError`` (redacted) when it fails for good."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        api = self.api()
        self._call(result, "create_repo", api.create_repo, self.repo_id, private=self.private, exist_ok=True,
                   repo_type="model")
        head = self._branch_head(api, revision, start_from, result)
        operations: list[Any] = []
        for name in sorted(files, key=lambda n: (not _SHARD.search(n), n)):  # shards first, one by one
            operation = CommitOperationAdd(path_in_repo=name, path_or_fileobj=files[name])
            if _SHARD.search(name):
                self._call(result, f"upload of {name}", api.preupload_lfs_files, self.repo_id,
                           additions=[operation], revision=revision, free_memory=False)
            operations.append(operation)
        existing = self._call(result, "list_repo_files", api.list_repo_files, self.repo_id, revision=head)
        operations += [CommitOperationDelete(path_in_repo=name) for name in existing
                       if _WEIGHT_FILE.search(name) and name not in files]
        push_id = uuid.uuid4().hex
        description = (f"Pushed by lightning-bridge's PushToHub.\n\n{PUSH_ID_KEY}: {push_id}")
        self._commit(api, operations, revision, head, message, description, push_id, result)

    def _commit(self, api: Any, operations: list[Any], revision: str, head: str, message: str,
                description: str, push_id: str, result: PushResult) -> None:
        """One commit, exactly once, retried after transient failures."""
        attempt = 0
        while True:
            try:
                info = api.create_commit(self.repo_id, operations, commit_message=message,
                                         commit_description=description, revision=revision,
                                         parent_commit=head)
                result.commit_id, result.commit_url = info.oid, str(info.commit_url)
                return
            except Exception as exc:  # noqa: BLE001 - classified below
                status, retryable, retry_after = _classify(exc)
                moved = status == 412  # the branch is not at `head` any more: maybe our own commit
                if not (retryable or moved) or attempt >= self.max_retries:
                    raise _PushError(f"create_commit failed: {self.redact(describe(exc))}") from None
                # The commit may have been applied with its answer lost: look before committing again.
                found = self._call(result, "list_repo_commits", self._find_commit, api, revision, head,
                                   push_id)
                if found is not None:
                    logger.warning("PushToHub: the commit to %s@%s failed (%s) but had been applied as %s; "
                                   "not committing again.", self.repo_id, revision,
                                   self.redact(describe(exc)), found[:10])
                    result.commit_id = found
                    return
                if moved:
                    head = self._branch_head(api, revision, None, result)
                wait = self._wait(attempt, retry_after)
                attempt += 1
                result.retries += 1
                logger.warning("PushToHub: create_commit on %s@%s failed (%s); retry %d/%d in %.2f s",
                               self.repo_id, revision, self.redact(describe(exc)), attempt, self.max_retries,
                               wait)
                time.sleep(wait)

    def _find_commit(self, api: Any, revision: str, parent: str, push_id: str) -> str | None:
        for commit in api.list_repo_commits(self.repo_id, revision=revision):
            if commit.commit_id == parent:
                return None
            if push_id in (commit.message or "") or push_id in (commit.title or ""):
                return commit.commit_id
        return None

    def _branch_head(self, api: Any, branch: str, start_from: str | None, result: PushResult) -> str:
        """The commit ``branch`` points at; the branch is created (from ``start_from``) when missing."""
        refs = self._call(result, "list_repo_refs", api.list_repo_refs, self.repo_id)
        heads = {ref.name: ref.target_commit for ref in refs.branches}
        if branch not in heads:
            start = start_from if start_from in heads else None
            self._call(result, f"create_branch {branch}", api.create_branch, self.repo_id, branch=branch,
                       revision=start, exist_ok=True)
            refs = self._call(result, "list_repo_refs", api.list_repo_refs, self.repo_id)
            heads = {ref.name: ref.target_commit for ref in refs.branches}
        return heads[branch]

    def _call(self, result: PushResult, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, retried on connection errors, 5xx, 408 and 429."""
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - classified below
                _, retryable, retry_after = _classify(exc)
                text = self.redact(describe(exc))
                if not retryable or attempt >= self.max_retries:
                    tried = f" after {attempt + 1} attempts" if attempt else ""
                    raise _PushError(f"{what} failed{tried}: {text}") from None
                wait = self._wait(attempt, retry_after)
                attempt += 1
                result.retries += 1
                logger.warning("PushToHub: %s failed (%s); retry %d/%d in %.2f s", what, text, attempt,
                               self.max_retries, wait)
                time.sleep(wait)

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), _MAX_WAIT_S)
        return min(self.retry_backoff_s * 2 ** attempt, _MAX_WAIT_S)

class BackgroundPush:
    """At most one push at a time, in a daemon thread that never blocks training."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def name(self) -> str | None:
        return self._thread.name if self._thread is not None else None

    def start(self, name: str, target: Callable[..., None], *args: Any) -> None:
        self._thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._thread.start()

    def join(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            logger.info("PushToHub: waiting for the push of %s to finish before the final push.",
                        thread.name.removeprefix("PushToHub-"))
            thread.join()


def open_files(folder: Path, handles: list[BinaryIO]) -> dict[str, BinaryIO]:
    """Every file of the checkpoint (hidden files skipped), opened; handles go into ``handles``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"the checkpoint folder {folder} does not exist")
    files: dict[str, BinaryIO] = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            handle = open(path, "rb")  # noqa: SIM115 - closed by the caller
            handles.append(handle)
            files[relative.as_posix()] = handle
    return files


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if text and not isinstance(exc, _PushError):
        return f"{type(exc).__name__}: {text}"
    return text or type(exc).__name__


@functools.lru_cache(maxsize=1)
def _transport_errors() -> tuple[type[BaseException], ...]:
    """httpx2's and httpx's transport errors (huggingface_hub 2.x uses httpx2, 1.x httpx)."""
    found: list[type[BaseException]] = []
    for module in ("httpx2", "httpx", "httpcore2", "httpcore"):
        try:
            imported = importlib.import_module(module)
        except Exception:  # noqa: BLE001 - not installed (or broken): not the client in use
            logger.debug("PushToHub: %s is not importable", module)
            continue
        for name in ("TransportError", "RemoteProtocolError", "NetworkError", "TimeoutException"):
            cls = getattr(imported, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
    return tuple(found)


def _classify(exc: BaseException) -> tuple[int | None, bool, float | None]:
    """``(HTTP status, retryable, Retry-After seconds)`` of a failure (its cause chain included)."""
    transport = _transport_errors()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        status = getattr(response, "status_code", None) if response is not None else None
        if isinstance(status, int):
            retryable = status >= 500 or status in _RETRY_STATUS
            return status, retryable, _retry_after(response) if retryable else None
        if isinstance(current, transport):
            return None, True, None
        if isinstance(current, OSError) and not isinstance(current, _LOCAL_OS_ERRORS):
            return None, True, None
        current = current.__cause__ or current.__context__
    return None, False, None


def _retry_after(response: Any) -> float | None:
    value = (getattr(response, "headers", None) or {}).get("Retry-After")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
