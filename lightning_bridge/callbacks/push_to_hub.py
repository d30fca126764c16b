"""PushToHub: publish the trained model to the Hugging Face Hub at the end of fit, without ever killing it.

    strategy = MegatronBridgeStrategy("meta-llama/Llama-3.2-1B", tensor_model_parallel_size=2)
    trainer = Trainer(strategy=strategy,
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

The upload itself (retries, exactly-once commits, redaction, the background thread) is in
:mod:`~lightning_bridge.callbacks.hub_upload`; the card's training summary in
:mod:`~lightning_bridge.callbacks.model_card`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shlex
import shutil
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_bridge.callbacks.checkpoint_folder import LATEST, atomic_write, has_latest, step_of
from lightning_bridge.callbacks.hub_upload import (
    BackgroundPush,
    HubUploader,
    PushResult,
    describe,
    open_files,
)
from lightning_bridge.callbacks.model_card import (
    TrainingSummary,
    adapter_kind,
    card_files,
    float_or_none,
    training_summary,
)
from lightning_bridge.lora import lora_config_of

logger = logging.getLogger(__name__)

__all__ = ["PushResult", "PushToHub"]


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
        merge_adapters: for a LoRA/DoRA model, that export is a PEFT adapter folder (False, the
            default; its card says ``library_name: peft``) or full weights with the adapters merged.

    Attributes:
        results: a :class:`PushResult` per push, in order.
        skipped: the checkpoint folders not pushed because a push was still running.
        failure: the report of a failed final push (with the command to redo it), else None.
        losses: ``(step, train_loss)`` recorded on rank 0 during fit (drawn in the card's plot).
    """

    loss_key = "train_loss"

    def __init__(self, repo_id: str, private: bool = True, token: str | None = None,
                 endpoint: str | None = None, revision: str = "main", push_every_checkpoint: bool = False,
                 commit_message: str | None = None, raise_on_failure: bool = False, max_retries: int = 5,
                 retry_backoff_s: float = 2.0, export_dir: str | os.PathLike | None = None,
                 merge_adapters: bool = False) -> None:
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
        self.merge_adapters = merge_adapters
        self.results: list[PushResult] = []
        self.skipped: list[str] = []
        self.failure: str | None = None
        self.losses: list[tuple[int, float]] = []
        self._started_at: datetime | None = None
        self._seen: str | None = None  # the last checkpoint folder polled from `latest`
        self._background = BackgroundPush()  # at most one push of an intermediate checkpoint at a time
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
        self._seen = str(before) if before is not None else None  # one from before this fit is not new
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
        loss = float_or_none(value)
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
        self._background.join()
        if folder is None:
            result = PushResult(str(self._export_dir_hint()), self.revision, error=self._export_error)
            result.finished = time.monotonic()
            self.results.append(result)
        else:
            result = self.publish(folder, self.revision, summary=self._summary(trainer, pl_module, folder))
            if result.ok and self._exported_tmp and folder == self._exported:
                shutil.rmtree(folder.parent, ignore_errors=True)
        self._report(result, exported=folder is not None)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if self._background.running:
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
        step = step if step is not None else step_of(folder)
        result = PushResult(str(folder), revision, step)
        with self._lock:
            self.results.append(result)
        handles: list[BinaryIO] = []
        try:
            extra = self._card_files(summary or TrainingSummary(steps=step), revision, folder=folder)
            if write_card:  # the folder then holds exactly what the Hub will (a plain re-upload redoes it)
                try:
                    for name, data in extra.items():
                        atomic_write(folder / name, data)
                except OSError as exc:
                    logger.warning("PushToHub: could not write the model card into %s (%s); it is uploaded "
                                   "all the same.", folder, exc)
            files = open_files(folder, handles)
            files.update({name: io.BytesIO(data) for name, data in extra.items()})
            message = commit_message or self.commit_message or f"Upload {folder.name} (lightning-bridge)"
            self._uploader().push(files, revision, message, result)
        except Exception as exc:  # noqa: BLE001 - a failed push must never kill training
            result.error = self._redact(describe(exc))
        finally:
            for handle in handles:
                handle.close()
            result.finished = time.monotonic()
        if result.error is None:
            logger.info("PushToHub: pushed %s to %s@%s (commit %s, %.1f s, %d retries)", folder, self.repo_id,
                        revision, (result.commit_id or "?")[:10], result.finished - result.started,
                        result.retries)
        else:
            logger.error("PushToHub: pushing %s to %s@%s failed: %s", folder, self.repo_id, revision,
                         result.error)
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
        return (f"{env}{shlex.join(cli)}\n  (with HF_TOKEN set or after `{_cli_name()} auth login`), "
                "or in Python:\n"
                f"  python -c {shlex.quote(python)}")
    # --- what to push, and when -------------------------------------------------------------------
    def _poll(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = self._latest_folder(trainer)
        if folder is None or str(folder) == self._seen:
            return
        self._seen = str(folder)
        if self._background.running:
            self.skipped.append(str(folder))
            logger.info("PushToHub: not pushing %s: the previous push (%s) is still running.", folder,
                        self._background.name)
            return
        handles: list[BinaryIO] = []
        try:
            files = open_files(folder, handles)  # pins the files: pruning cannot pull them away now
        except OSError as exc:
            for handle in handles:
                handle.close()
            logger.warning("PushToHub: could not read the checkpoint %s (%s); not pushing it.", folder, exc)
            return
        summary = self._summary(trainer, pl_module, folder)
        losses = list(self.losses)
        self._background.start(f"PushToHub-{folder.name}", self._push_branch, folder, files, handles, summary,
                               losses)

    def _push_branch(self, folder: Path, files: dict[str, Any], handles: list[BinaryIO],
                     summary: TrainingSummary, losses: list[tuple[int, float]]) -> None:
        """Background thread: push ``folder`` to branch ``step-<N>``. HTTP and file I/O only."""
        branch = folder.name
        result = PushResult(str(folder), branch, step_of(folder))
        with self._lock:
            self.results.append(result)
        try:
            extra = self._card_files(summary, branch, losses, folder=folder)
            files.update({name: io.BytesIO(data) for name, data in extra.items()})
            self._uploader().push(files, branch, f"Upload {folder.name} (lightning-bridge)", result,
                                  start_from=self.revision)
            logger.info("PushToHub: pushed %s to %s@%s (%.1f s)", folder, self.repo_id, branch,
                        time.monotonic() - result.started)
        except Exception as exc:  # noqa: BLE001 - never into training
            result.error = self._redact(describe(exc))
            logger.error("PushToHub: pushing %s to %s@%s failed: %s (the final push is not affected)",
                         folder, self.repo_id, branch, result.error)
        finally:
            for handle in handles:
                handle.close()
            result.finished = time.monotonic()

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
            adapted = lora_config_of(strategy.model_chunks) is not None
            if adapted and not self.merge_adapters:
                strategy.bridge.save_hf_adapter(strategy.model_chunks, path)
            else:
                strategy.bridge.save_hf_pretrained(strategy.model_chunks, path, show_progress=False,
                                                   merge_adapters=adapted)
        except Exception as exc:  # noqa: BLE001 - reported at the end of fit, like a failed push
            self._export_error = self._redact(f"exporting the model to {path} failed: {describe(exc)}")
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
            self.failure = (f"PushToHub could not publish to {where}: {result.error}. Nothing was pushed; "
                            "save the model with strategy.bridge.save_hf_pretrained(strategy.model_chunks, "
                            "folder) and "
                            f"upload it with `{_cli_name()} upload {self.repo_id} <folder> .`")
        logger.error("%s", self.failure)
        rank_zero_warn(self.failure)
        if self.raise_on_failure:
            raise RuntimeError(self.failure)

    def _uploader(self) -> HubUploader:
        """The uploader with this callback's current settings (a cheap object: made per use)."""
        return HubUploader(self.repo_id, self.private, self._token, self.endpoint, self.max_retries,
                           self.retry_backoff_s)

    def _endpoint(self) -> str | None:
        return self._uploader().endpoint_url()

    def _redact(self, text: str) -> str:
        return self._uploader().redact(text)

    def _summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None,
                 folder: Path | None) -> TrainingSummary:
        return training_summary(trainer, pl_module, step_of(folder), self.loss_key, self._started_at)

    def _card_files(self, summary: TrainingSummary, revision: str, losses: list[tuple[int, float]] | None = None,
                    folder: Path | None = None) -> dict[str, bytes]:
        """The card and the plot; an adapter folder's card says ``library_name: peft``."""
        losses = self.losses if losses is None else losses
        summary = dataclasses.replace(summary, adapter=adapter_kind(folder))
        return card_files(self.repo_id, summary, revision, losses, self._redact)


# --- module helpers ---------------------------------------------------------------------------------------
def _checkpoint_dirs(trainer: pl.Trainer, me: Any) -> list[Path]:
    """``dirpath`` of every callback that looks like an HFCheckpoint (duck typing): it has a ``dirpath``
    holding a ``latest`` file, or a ``dirpath`` and a ``save_now`` method (before its first save)."""
    dirs = []
    for callback in getattr(trainer, "callbacks", None) or []:
        dirpath = getattr(callback, "dirpath", None)
        if callback is me or dirpath is None:
            continue
        if has_latest(dirpath) or callable(getattr(callback, "save_now", None)):
            dirs.append(Path(dirpath))
    return dirs


def _broadcast(trainer: pl.Trainer, obj: Any) -> Any:
    broadcast = getattr(trainer.strategy, "broadcast", None)
    return broadcast(obj, src=0) if broadcast is not None else obj


def _py(text: str) -> str:
    """A Python string literal in double quotes (JSON's are valid Python), for a shell-quoted one-liner."""
    return json.dumps(text)


def _cli_name() -> str:
    """The Hub CLI of the installed huggingface_hub: ``hf`` (1.x, 2.x) or ``huggingface-cli`` (older)."""
    try:
        from importlib.metadata import distribution

        names = {e.name for e in distribution("huggingface_hub").entry_points if e.group == "console_scripts"}
    except Exception:  # noqa: BLE001 - not installed as a distribution: assume a current one
        return "hf"
    return "hf" if "hf" in names or "huggingface-cli" not in names else "huggingface-cli"
