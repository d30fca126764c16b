"""PushToHub: publish the trained model to the Hugging Face Hub at the end of fit, without ever killing it.

    trainer = Trainer(strategy=MegatronBridgeStrategy("meta-llama/Llama-3.2-1B", tensor_model_parallel_size=2),
                      callbacks=[HFCheckpoint("hf-checkpoints", every_n_train_steps=500),
                                 PushToHub("me/llama-3.2-1b-tuned")])

What is published
-----------------
At the end of ``fit`` (``on_fit_end``, after every callback's ``on_train_end``, so an
:class:`~lightning_bridge.callbacks.HFCheckpoint` has finished writing), global rank 0 publishes the
final HF checkpoint to ``revision`` (``main``) in ONE commit: safetensors shards, index, config,
generation config, tokenizer files, a ``README.md`` model card and the training-loss plot
(``training_loss.png`` with matplotlib, else ``training_loss.svg``; see
:mod:`~lightning_bridge.callbacks.model_card`). The card and the plot are also written into the local
checkpoint folder first, so the folder is exactly what the Hub holds, and a failed push can be redone
with a plain ``hf upload`` of it.

* **Which checkpoint**: the one an HFCheckpoint wrote: any callback with a ``dirpath`` that holds a
  ``latest`` file, or with a ``dirpath`` and a ``save_now`` method (its first save may still be to
  come), found by duck typing; ``dirpath/latest`` names the newest complete ``step-<N>`` folder.
  Without one, the callback exports the model itself through
  ``strategy.bridge.save_hf_pretrained(strategy.model_chunks, folder)``, a collective that every rank
  runs. It does so in ``on_train_end``, not ``on_fit_end``: between the two, Lightning's
  ``Strategy.teardown`` moves the LightningModule, and so the Megatron chunks, to the CPU (seen on
  2 H200s: an export still works there, but gathers and converts from host memory). When an
  HFCheckpoint is there but never wrote a checkpoint, the export runs in ``on_fit_end`` instead. The
  export goes to ``export_dir`` or, by default, a temporary folder that is removed after a successful
  push and kept after a failed one.
* **Upload**: the repo is created when missing (``private=True`` by default, ``exist_ok=True``), each
  shard goes up on its own (``HfApi.preupload_lfs_files``, one per shard), then a single
  ``HfApi.create_commit`` adds everything. Weight files of an earlier push that the new checkpoint no
  longer has (``*.safetensors``, ``*.safetensors.index.json``, ``*.bin``) are deleted in the same
  commit; other files in the repo are left alone.
* **Every checkpoint** (``push_every_checkpoint=True``): rank 0 reads ``dirpath/latest`` after each
  training batch (one small file read); a new checkpoint is pushed from a background thread to its
  own branch ``step-<N>``, created from ``revision``. Branches rather than commits on ``main``: main
  only ever holds the final model, and every intermediate checkpoint stays addressable as
  ``from_pretrained(repo_id, revision="step-<N>")``. The thread opens the checkpoint's files at once
  (so HFCheckpoint's ``keep_last_k`` pruning cannot pull them away mid-upload), does only HTTP and file
  I/O, never a torch collective, and never blocks training. One push at a time: a checkpoint that
  appears while a push is running is skipped (logged, listed in :attr:`PushToHub.skipped`). The final
  push waits for a running push first and always happens.

Failures never kill training
----------------------------
Every Hub call (create_repo, list_repo_refs, create_branch, preupload, create_commit, ...) is retried up
to ``max_retries`` times with exponential backoff (``retry_backoff_s * 2**attempt``, or the server's
``Retry-After``) on connection errors (httpx/httpx2 transport errors such as ``RemoteProtocolError``,
``OSError``), 5xx, 408 and 429; other 4xx (401, 403, 404, ...) fail at once. When the final push
fails, the local checkpoint stays, and the failure is reported at the end of fit (``logger.error``,
``rank_zero_warn`` and :attr:`PushToHub.failure`) with the exact command that redoes the push; with
``raise_on_failure=True`` ``on_fit_end`` raises a ``RuntimeError`` on rank 0 instead (after every
collective, so no rank waits on it; under Lightning's own process launcher an exception on rank 0
ends the other ranks, as for any failure of fit). A failed push to a ``step-<N>`` branch is logged
and listed in :attr:`PushToHub.results`; it does not stop the final push.

Exactly once: each push puts a unique id into its commit description and commits with
``parent_commit`` = the branch head it read first. When a commit POST fails in a way that may have
reached the server (a dropped connection, a 5xx, a 412 because the branch moved), the branch history
since that head is searched for the id before trying again: a commit that was applied but whose answer
was lost is found and not made twice.

The token (``token``, ``HF_TOKEN`` or the stored login) is never written anywhere: it is masked
(``***``) in every message this callback logs, stores or raises, and the card and retry command never
carry it.
"""

from __future__ import annotations

import email.utils
import functools
import importlib
import io
import json
import logging
import math
import os
import re
import shlex
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_bridge.callbacks.model_card import (
    LossPlot,
    TrainingSummary,
    base_model_for,
    render_loss_plot,
    render_model_card,
)

logger = logging.getLogger(__name__)

__all__ = ["PushResult", "PushToHub"]

T = TypeVar("T")
LATEST = "latest"
CARD_NAME = "README.md"
PUSH_ID_KEY = "lightning-bridge-push-id"
_STEP = re.compile(r"^step-(\d+)$")
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


class PushToHub(pl.Callback):
    """Publish the final HF checkpoint (and, optionally, every saved one) to the Hub. See the module doc.

    Args:
        repo_id: the Hub repo, ``namespace/name``.
        private: create the repo private (when it does not exist yet).
        token: a Hub token; None: ``HF_TOKEN`` or the stored login (huggingface_hub's default).
        endpoint: the Hub's URL; None: ``HF_ENDPOINT`` or huggingface_hub's default.
        revision: the branch that receives the final checkpoint (created from the default branch if missing).
        push_every_checkpoint: also push each checkpoint an HFCheckpoint saves, to a branch ``step-<N>``.
        commit_message: the final commit's title (default: ``"Upload step-<N> (lightning-bridge)"``).
        raise_on_failure: make ``fit`` fail (RuntimeError from ``on_fit_end``) when the final push fails.
        max_retries: retries of each Hub call after a transient failure.
        retry_backoff_s: first backoff; doubled at each retry (a ``Retry-After`` header wins).
        export_dir: where to export the final checkpoint when no HFCheckpoint wrote one (default: a
            temporary folder, removed after a successful push, kept after a failed one).

    Attributes:
        results: a :class:`PushResult` per push, in order.
        skipped: the checkpoint folders not pushed because a push was still running.
        failure: the report of a failed final push (with the command to redo it), else None.
        losses: ``(step, train_loss)`` recorded on rank 0 during fit (drawn in the card's plot).
    """

    loss_key = "train_loss"

    def __init__(self, repo_id: str, private: bool = True, token: str | None = None, endpoint: str | None = None,
                 revision: str = "main", push_every_checkpoint: bool = False, commit_message: str | None = None,
                 raise_on_failure: bool = False, max_retries: int = 5, retry_backoff_s: float = 2.0,
                 export_dir: str | os.PathLike | None = None) -> None:
        if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"repo_id={repo_id!r}: expected 'namespace/name' (e.g. 'my-org/my-model').")
        if max_retries < 0 or retry_backoff_s < 0:
            raise ValueError("max_retries and retry_backoff_s must be >= 0.")
        self.repo_id = repo_id
        self.private = private
        self._token = token
        self.endpoint = endpoint
        self.revision = revision
        self.push_every_checkpoint = push_every_checkpoint
        self.commit_message = commit_message
        self.raise_on_failure = raise_on_failure
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.results: list[PushResult] = []
        self.skipped: list[str] = []
        self.failure: str | None = None
        self.losses: list[tuple[int, float]] = []
        self._started_at: datetime | None = None
        self._seen: str | None = None  # the last checkpoint folder polled from `latest`
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._exported: Path | None = None  # our own export of the final weights
        self._exported_tmp = False
        self._export_error: str | None = None

    def __repr__(self) -> str:  # never the token
        return (f"{type(self).__name__}(repo_id={self.repo_id!r}, revision={self.revision!r}, "
                f"push_every_checkpoint={self.push_every_checkpoint})")

    # --- Lightning hooks ----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.losses, self.failure, self._exported, self._export_error = [], None, None, None
        before = self._latest_folder(trainer)
        self._seen = str(before) if before is not None else None  # a checkpoint from before this fit is not new
        strategy = trainer.strategy
        if not _checkpoint_dirs(trainer, self) and not (hasattr(strategy, "bridge")
                                                         and hasattr(strategy, "model_chunks")):
            raise TypeError(
                f"PushToHub publishes what an HFCheckpoint callback saved or, without one, exports the model "
                f"through the strategy's bridge, but {type(strategy).__name__} has no bridge. Use "
                "strategy=MegatronBridgeStrategy(...) or add an HFCheckpoint callback.")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started_at = datetime.now(timezone.utc)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        value = trainer.callback_metrics.get(self.loss_key)
        if value is None and outputs is not None:
            value = outputs.get("loss") if isinstance(outputs, dict) else outputs
        loss = _float_or_none(value)
        if loss is not None:
            self.losses.append((int(trainer.global_step), loss))
        if self.push_every_checkpoint:
            self._poll(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Without an HFCheckpoint, export now, while the model is still on its device (see the module doc).
        if _broadcast(trainer, not _checkpoint_dirs(trainer, self)):
            self._export(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = self._exported
        if folder is None and self._export_error is None:
            latest = self._latest_folder(trainer) if trainer.is_global_zero else None
            if _broadcast(trainer, latest is None):  # the HFCheckpoint wrote nothing: export (every rank)
                self._export(trainer)
                folder = self._exported
            else:
                folder = latest
        if not trainer.is_global_zero:
            return  # no collective follows: only rank 0 talks to the Hub
        self._wait_for_background()
        if folder is None:
            result = PushResult(str(self._export_dir_hint()), self.revision, error=self._export_error)
            result.finished = time.monotonic()
            self.results.append(result)
        else:
            result = self.publish(folder, self.revision, summary=self._summary(trainer, pl_module, folder))
            if result.ok and self._exported_tmp and folder == self._exported:
                shutil.rmtree(folder.parent, ignore_errors=True)
        self._report(result, exported=folder is not None)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._thread is not None and self._thread.is_alive():
            logger.warning("PushToHub: fit failed while a checkpoint push was running; it goes on in the "
                           "background (daemon thread) and is abandoned when the process exits.")

    # --- direct use ---------------------------------------------------------------------------------
    def publish(self, folder: str | os.PathLike, revision: str | None = None, *, step: int | None = None,
                summary: TrainingSummary | None = None, commit_message: str | None = None,
                write_card: bool = True) -> PushResult:
        """Push the HF checkpoint in ``folder`` to ``revision`` (default: this callback's) in one commit.

        Adds the model card and the loss plot (also written into ``folder`` when ``write_card``).
        Never raises for a Hub failure: the returned :class:`PushResult` has ``error`` set (redacted),
        and it is appended to :attr:`results`.
        """
        folder = Path(folder)
        revision = revision or self.revision
        step = step if step is not None else _step_of(folder)
        result = PushResult(str(folder), revision, step)
        with self._lock:
            self.results.append(result)
        handles: list[BinaryIO] = []
        try:
            extra = self._card_files(summary or TrainingSummary(steps=step), revision)
            if write_card:  # the folder then holds exactly what the Hub will (a plain re-upload redoes it)
                try:
                    for name, data in extra.items():
                        _atomic_write(folder / name, data)
                except OSError as exc:
                    logger.warning("PushToHub: could not write the model card into %s (%s); it is uploaded "
                                   "all the same.", folder, exc)
            files = _open_files(folder, handles)
            files.update({name: io.BytesIO(data) for name, data in extra.items()})
            message = commit_message or self.commit_message or f"Upload {folder.name} (lightning-bridge)"
            self._push(files, revision, message, result)
        except Exception as exc:  # noqa: BLE001 - a failed push must never kill training
            result.error = self._redact(_describe(exc))
        finally:
            for handle in handles:
                handle.close()
            result.finished = time.monotonic()
        if result.error is None:
            logger.info("PushToHub: pushed %s to %s@%s (commit %s, %.1f s, %d retries)", folder, self.repo_id,
                        revision, (result.commit_id or "?")[:10], result.finished - result.started, result.retries)
        else:
            logger.error("PushToHub: pushing %s to %s@%s failed: %s", folder, self.repo_id, revision, result.error)
        return result

    def retry_command(self, folder: str | os.PathLike, revision: str | None = None,
                      commit_message: str | None = None) -> str:
        """The shell command (and its Python equivalent) that pushes ``folder`` as this callback would."""
        revision = revision or self.revision
        message = commit_message or self.commit_message or f"Upload {Path(folder).name} (lightning-bridge)"
        endpoint = self._endpoint()
        env = f"HF_ENDPOINT={shlex.quote(endpoint)} " if endpoint else ""
        cli = [_cli_name(), "upload", self.repo_id, str(folder), ".", "--revision", revision,
               "--private" if self.private else "--no-private", "--commit-message", message]
        api_args = f"endpoint={_py(endpoint)}" if endpoint else ""
        python = (f"from huggingface_hub import HfApi; api = HfApi({api_args}); "
                  f"api.create_repo({_py(self.repo_id)}, private={self.private!r}, exist_ok=True); "
                  f"api.upload_folder(repo_id={_py(self.repo_id)}, folder_path={_py(str(folder))}, "
                  f"revision={_py(revision)}, commit_message={_py(message)})")
        return (f"{env}{shlex.join(cli)}\n  (with HF_TOKEN set or after `{_cli_name()} auth login`), or in Python:\n"
                f"  python -c {shlex.quote(python)}")

    # --- the push -----------------------------------------------------------------------------------
    def _push(self, files: dict[str, Path | BinaryIO], revision: str, message: str, result: PushResult,
              start_from: str | None = None) -> None:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        api = self._api()
        self._call(result, "create_repo", api.create_repo, self.repo_id, private=self.private, exist_ok=True,
                   repo_type="model")
        head = self._branch_head(api, revision, start_from, result)
        operations: list[Any] = []
        for name in sorted(files, key=lambda n: (not _SHARD.search(n), n)):  # shards first, one by one
            operation = CommitOperationAdd(path_in_repo=name, path_or_fileobj=files[name])
            if _SHARD.search(name):
                self._call(result, f"upload of {name}", api.preupload_lfs_files, self.repo_id, additions=[operation],
                           revision=revision, free_memory=False)
            operations.append(operation)
        existing = self._call(result, "list_repo_files", api.list_repo_files, self.repo_id, revision=head)
        operations += [CommitOperationDelete(path_in_repo=name) for name in existing
                       if _WEIGHT_FILE.search(name) and name not in files]
        push_id = uuid.uuid4().hex
        description = (f"Pushed by lightning-bridge's PushToHub.\n\n{PUSH_ID_KEY}: {push_id}")
        self._commit(api, operations, revision, head, message, description, push_id, result)

    def _commit(self, api: Any, operations: list[Any], revision: str, head: str, message: str, description: str,
                push_id: str, result: PushResult) -> None:
        """One commit, exactly once, retried after transient failures."""
        attempt = 0
        while True:
            try:
                info = api.create_commit(self.repo_id, operations, commit_message=message,
                                         commit_description=description, revision=revision, parent_commit=head)
                result.commit_id, result.commit_url = info.oid, str(info.commit_url)
                return
            except Exception as exc:  # noqa: BLE001 - classified below
                status, retryable, retry_after = _classify(exc)
                moved = status == 412  # the branch is not at `head` any more: maybe our own commit
                if not (retryable or moved) or attempt >= self.max_retries:
                    raise _PushError(f"create_commit failed: {self._redact(_describe(exc))}") from None
                # The commit may have been applied with its answer lost: look before committing again.
                found = self._call(result, "list_repo_commits", self._find_commit, api, revision, head, push_id)
                if found is not None:
                    logger.warning("PushToHub: the commit to %s@%s failed (%s) but had been applied as %s; "
                                   "not committing again.", self.repo_id, revision,
                                   self._redact(_describe(exc)), found[:10])
                    result.commit_id = found
                    return
                if moved:
                    head = self._branch_head(api, revision, None, result)
                wait = self._wait(attempt, retry_after)
                attempt += 1
                result.retries += 1
                logger.warning("PushToHub: create_commit on %s@%s failed (%s); retry %d/%d in %.2f s",
                               self.repo_id, revision, self._redact(_describe(exc)), attempt, self.max_retries, wait)
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
                text = self._redact(_describe(exc))
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

    # --- background pushes of each checkpoint -------------------------------------------------------
    def _poll(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = self._latest_folder(trainer)
        if folder is None or str(folder) == self._seen:
            return
        self._seen = str(folder)
        if self._thread is not None and self._thread.is_alive():
            self.skipped.append(str(folder))
            logger.info("PushToHub: not pushing %s: the previous push (%s) is still running.", folder,
                        self._thread.name)
            return
        handles: list[BinaryIO] = []
        try:
            files = _open_files(folder, handles)  # pins the files: pruning cannot pull them away now
        except OSError as exc:
            for handle in handles:
                handle.close()
            logger.warning("PushToHub: could not read the checkpoint %s (%s); not pushing it.", folder, exc)
            return
        summary = self._summary(trainer, pl_module, folder)
        losses = list(self.losses)
        self._thread = threading.Thread(target=self._push_branch, args=(folder, files, handles, summary, losses),
                                        name=f"PushToHub-{folder.name}", daemon=True)
        self._thread.start()

    def _push_branch(self, folder: Path, files: dict[str, Any], handles: list[BinaryIO], summary: TrainingSummary,
                     losses: list[tuple[int, float]]) -> None:
        """Background thread: push ``folder`` to branch ``step-<N>``. HTTP and file I/O only."""
        branch = folder.name
        result = PushResult(str(folder), branch, _step_of(folder))
        with self._lock:
            self.results.append(result)
        try:
            extra = self._card_files(summary, branch, losses)
            files.update({name: io.BytesIO(data) for name, data in extra.items()})
            self._push(files, branch, f"Upload {folder.name} (lightning-bridge)", result, start_from=self.revision)
            logger.info("PushToHub: pushed %s to %s@%s (%.1f s)", folder, self.repo_id, branch,
                        time.monotonic() - result.started)
        except Exception as exc:  # noqa: BLE001 - never into training
            result.error = self._redact(_describe(exc))
            logger.error("PushToHub: pushing %s to %s@%s failed: %s (the final push is not affected)",
                         folder, self.repo_id, branch, result.error)
        finally:
            for handle in handles:
                handle.close()
            result.finished = time.monotonic()

    def _wait_for_background(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            logger.info("PushToHub: waiting for the push of %s to finish before the final push.",
                        thread.name.removeprefix("PushToHub-"))
            thread.join()

    # --- helpers ------------------------------------------------------------------------------------
    def _export(self, trainer: pl.Trainer) -> None:
        """Every rank: write the model as an HF checkpoint (a collective), for rank 0 to push.

        A failure (the same on every rank: the bridge shares it) is kept for the report, not raised.
        """
        strategy = trainer.strategy
        path = None
        if trainer.is_global_zero:
            root = self.export_dir
            if root is None:
                root = Path(tempfile.mkdtemp(prefix="push-to-hub-"))
            root.mkdir(parents=True, exist_ok=True)
            path = str(root / f"step-{trainer.global_step}")
        path = _broadcast(trainer, path)
        try:
            strategy.bridge.save_hf_pretrained(strategy.model_chunks, path, show_progress=False)
        except Exception as exc:  # noqa: BLE001 - reported at the end of fit, like a failed push
            self._export_error = self._redact(f"exporting the model to {path} failed: {_describe(exc)}")
            logger.error("PushToHub: %s", self._export_error)
            return
        self._exported, self._exported_tmp = Path(path), self.export_dir is None

    def _export_dir_hint(self) -> Path:
        return self.export_dir if self.export_dir is not None else Path(tempfile.gettempdir())

    def _latest_folder(self, trainer: pl.Trainer) -> Path | None:
        """The newest complete checkpoint an HFCheckpoint-like callback points ``latest`` at, if any."""
        for dirpath in _checkpoint_dirs(trainer, self):
            try:
                name = (dirpath / LATEST).read_text().strip()
            except OSError:
                continue
            if name and Path(name).name == name and (dirpath / name).is_dir():
                return dirpath / name
        return None

    def _summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None,
                 folder: Path | None) -> TrainingSummary:
        strategy = trainer.strategy
        metrics = trainer.callback_metrics
        source = getattr(strategy, "model_source", None) or getattr(pl_module, "hf_model", None)
        if source is None:
            source = getattr(strategy, "bridge", None)
        base_model, source_name = base_model_for(source)
        config = getattr(getattr(strategy, "bridge", None), "hf_config", None)
        architectures = getattr(config, "architectures", None) or []
        return TrainingSummary(
            steps=int(trainer.global_step), checkpoint_step=_step_of(folder) if folder else None,
            tokens_seen=_int_or_none(getattr(pl_module, "tokens_seen", None)),
            train_loss=_float_or_none(metrics.get(self.loss_key)), val_loss=_float_or_none(metrics.get("val_loss")),
            val_ppl=_float_or_none(metrics.get("val_ppl")), parallel=_parallel_layout(trainer),
            base_model=base_model, source_name=source_name, model_type=getattr(config, "model_type", None),
            architecture=architectures[0] if architectures else None, started_at=self._started_at,
            finished_at=datetime.now(timezone.utc))

    def _card_files(self, summary: TrainingSummary, revision: str,
                    losses: list[tuple[int, float]] | None = None) -> dict[str, bytes]:
        losses = self.losses if losses is None else losses
        plot: LossPlot | None = render_loss_plot([s for s, _ in losses], [v for _, v in losses])
        card = render_model_card(self.repo_id, summary, plot_filename=plot.filename if plot else None,
                                 revision=revision)
        files = {CARD_NAME: self._redact(card).encode()}
        if plot is not None:
            files[plot.filename] = plot.data
        return files

    def _report(self, result: PushResult, exported: bool = True) -> None:
        failed = [r for r in self.results[:-1] if r.error is not None]
        if failed:
            logger.warning("PushToHub: %d intermediate push(es) failed: %s", len(failed),
                           "; ".join(f"{Path(r.folder).name} -> {r.revision}: {r.error}" for r in failed))
        if result.ok:
            self.failure = None
            return
        where = f"{self.repo_id}@{result.revision}"
        if exported:
            self.failure = (f"PushToHub could not publish {result.folder} to {where}: {result.error}. The "
                            f"checkpoint is intact in {result.folder}. To publish it, run:\n  "
                            f"{self.retry_command(result.folder, result.revision)}")
        else:
            self.failure = (f"PushToHub could not publish to {where}: {result.error}. Nothing was pushed; save "
                            "the model with strategy.bridge.save_hf_pretrained(strategy.model_chunks, folder) and "
                            f"upload it with `{_cli_name()} upload {self.repo_id} <folder> .`")
        logger.error("%s", self.failure)
        rank_zero_warn(self.failure)
        if self.raise_on_failure:
            raise RuntimeError(self.failure)

    def _api(self) -> Any:
        from huggingface_hub import HfApi

        return HfApi(endpoint=self._endpoint(), token=self._token)

    def _endpoint(self) -> str | None:
        return self.endpoint or os.environ.get("HF_ENDPOINT") or None

    def _secrets(self) -> list[str]:
        found = [self._token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
        try:
            from huggingface_hub import get_token

            found.append(get_token())
        except Exception as exc:  # noqa: BLE001 - no stored token, or an old huggingface_hub
            logger.debug("PushToHub: no stored token to mask (%s)", type(exc).__name__)
        return sorted({s for s in found if isinstance(s, str) and len(s) >= 4}, key=len, reverse=True)

    def _redact(self, text: str) -> str:
        for secret in self._secrets():
            text = text.replace(secret, "***")
        return _BEARER.sub(r"\1***", text)


# --- module helpers ---------------------------------------------------------------------------------------
def _checkpoint_dirs(trainer: pl.Trainer, me: Any) -> list[Path]:
    """``dirpath`` of every callback that looks like an HFCheckpoint (duck typing): it has a ``dirpath``
    holding a ``latest`` file, or a ``dirpath`` and a ``save_now`` method (before its first save)."""
    dirs = []
    for callback in getattr(trainer, "callbacks", None) or []:
        dirpath = getattr(callback, "dirpath", None)
        if callback is me or dirpath is None:
            continue
        if _has_latest(dirpath) or callable(getattr(callback, "save_now", None)):
            dirs.append(Path(dirpath))
    return dirs


def _has_latest(dirpath: Any) -> bool:
    try:
        return (Path(dirpath) / LATEST).is_file()
    except (TypeError, OSError):
        return False


def _broadcast(trainer: pl.Trainer, obj: Any) -> Any:
    broadcast = getattr(trainer.strategy, "broadcast", None)
    return broadcast(obj, src=0) if broadcast is not None else obj


def _open_files(folder: Path, handles: list[BinaryIO]) -> dict[str, BinaryIO]:
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


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text and not isinstance(exc, _PushError) else text or type(exc).__name__


def _py(text: str) -> str:
    """A Python string literal in double quotes (JSON's are valid Python), for a shell-quoted one-liner."""
    return json.dumps(text)


def _cli_name() -> str:
    """The Hub CLI the installed huggingface_hub provides: ``hf`` (1.x, 2.x) or ``huggingface-cli`` (older)."""
    try:
        from importlib.metadata import distribution

        names = {e.name for e in distribution("huggingface_hub").entry_points if e.group == "console_scripts"}
    except Exception:  # noqa: BLE001 - not installed as a distribution: assume a current one
        return "hf"
    return "hf" if "hf" in names or "huggingface-cli" not in names else "huggingface-cli"


def _step_of(folder: Path | None) -> int | None:
    match = _STEP.match(folder.name) if folder is not None else None
    return int(match[1]) if match else None


def _parallel_layout(trainer: pl.Trainer) -> dict[str, int]:
    strategy = trainer.strategy
    sizes = dict(getattr(strategy, "parallel_sizes", None) or {})
    tp = int(sizes.get("tensor_model_parallel_size") or getattr(strategy, "tensor_model_parallel_size", 1) or 1)
    pp = int(sizes.get("pipeline_model_parallel_size") or getattr(strategy, "pipeline_model_parallel_size", 1) or 1)
    cp = int(sizes.get("context_parallel_size") or 1)
    world = int(getattr(trainer, "world_size", 1) or 1)
    layout = {"TP": tp, "PP": pp, "DP": max(world // (tp * pp * cp), 1)}
    for key, name in (("CP", "context_parallel_size"), ("EP", "expert_model_parallel_size"),
                      ("VPP", "virtual_pipeline_model_parallel_size")):
        if (sizes.get(name) or 1) > 1:
            layout[key] = int(sizes[name])
    return layout


def _float_or_none(value: Any) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return result if not math.isnan(result) else None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError, RuntimeError):
        return None
