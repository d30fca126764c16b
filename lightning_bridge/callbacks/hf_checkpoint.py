"""HFCheckpoint: Hugging Face checkpoints written while training runs, without stalling it.

    strategy = MegatronBridgeStrategy("meta-llama/Llama-3.2-1B", tensor_model_parallel_size=2)
    trainer = Trainer(strategy=strategy,
                      callbacks=[HFCheckpoint("hf-checkpoints", every_n_train_steps=500, keep_last_k=3)])

Every save writes ``dirpath/step-<global_step>/``: safetensors shards + index, ``config.json``,
``generation_config.json`` and the source model's tokenizer files, loadable by
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

How a save runs
---------------
* **Training thread (every rank)**: drains ``bridge.export_hf_weights`` (it holds the collectives:
  TP gathers, PP sends) and hands each tensor it receives to a staging queue, as a private copy, so
  the optimizer may change the weights right after. On a GPU the copy goes asynchronously, on the
  current stream, into pinned host memory; when this rank's share fits the budget, every tensor
  keeps its pinned buffer from save to save, and ``on_train_start`` (:meth:`HFCheckpoint.warm_up`)
  pins them before the first step, so a save blocks training for the device-to-host copy only
  (about 0.3 s for Llama-3-8B on an H200, see benchmarks/README.md). On the CPU it is a clone.
* **Writer thread (one per rank, only while a save is in flight)**: takes tensors from the queue
  into an :class:`~lightning_bridge.hf_io.ShardedSafetensorsWriter`, which writes each shard as soon
  as it is complete; then config, generation config and tokenizer files, the index, fsync and the
  atomic rename; then the ``latest`` pointer and ``keep_last_k`` pruning. It never issues a
  collective.
* **Staging budget**: the training thread may run ahead of the disk by ``staging_budget_bytes`` of
  staged tensors; beyond that it waits for the writer to finish a shard ("stream" mode). It never
  waits while the writer is idle and needs more tensors to finish a shard, so the save cannot
  deadlock whatever the budget. Default: on a GPU, everything this rank receives when that fits in
  a quarter of the host's available memory (per local rank), else two shards; on the CPU, two
  shards. ``save_stats[i]["staged_all"]`` says whether a save fitted in the budget whole.
* **Memory**: the staged bytes (up to the budget) in host memory, pinned on a GPU and kept pinned
  between saves when everything fits; nothing extra on the device beyond the export's own
  temporaries (a tensor or two at a time).
* **One save at a time**: a save that falls due while the previous one is still writing first
  waits for it (``waited_s`` in the stats), so there is never more than one writer per rank.

Where files go (``mode``)
-------------------------
* ``"consolidate"``: global rank 0 receives every tensor and writes every file. The shards follow
  the source checkpoint's layout (``plan_shards`` with its weight map) when the bridge has one.
* ``"distribute"``: the export gives each tensor to exactly one rank (round-robin within the
  owning pipeline stage); the shard plan follows those destinations: each rank's tensors, in
  export order, split by ``max_shard_size``, numbered globally (``model-0000i-of-0000n``). Each
  rank writes its own shards, atomically, as ``.step-N.tmp-<pid>-<token>/part-<rank>/`` inside one
  temporary folder; rank 0's writer waits (polling the file system, no collective) until every
  part has appeared, moves the shard files up, writes the index and renames the folder to
  ``step-N``. A rank whose part fails leaves ``part-<rank>.failed`` with the reason. ``dirpath``
  must be on a file system every rank sees (checked at setup).

Decisions and errors
--------------------
Saves are decided from ``trainer.global_step`` (and the epoch), identical on every rank. The only
cross-rank status exchange runs on the training thread at fixed points: at the start of the next
save and at the end of ``fit`` (``on_train_end``), every rank waits for its own writer, the ranks
gather their outcomes and rank 0 broadcasts the result, so every rank raises the same error (the
folder and the reason) at the same point. A failed save removes its temporary folder; earlier
checkpoints, ``latest`` and the pruning are untouched. After an exception elsewhere in ``fit``
(``on_exception``) the writer is finished or abandoned without any collective.

Atomicity: a checkpoint only ever appears under its final name complete (rename of a finished
folder; a replaced folder goes through hf_io's ``.old`` swap), ``latest`` is replaced with
``os.replace``, and pruned folders are renamed to a temporary name before they are deleted. A kill
at any moment therefore leaves complete ``step-*`` folders only; the temporaries it leaves are
removed at the next setup.

The folder: ``dirpath`` holds only ``step-<n>/`` folders, the ``latest`` text file (the name of the
newest complete checkpoint; no symlink, for file systems without them) and our temporaries; any
other content is refused at setup. A ``step-<n>`` left by an earlier run is replaced when this run
saves that step (the same ``.old`` swap); ``keep_last_k`` counts the folders up to the step just
saved, so checkpoints of later steps left by an earlier run are not deleted.

Outside a Trainer (scripts, benchmarks), on every rank: ``callback.save(bridge, model_chunks, step)``
then ``callback.wait()``; ``callback.warm_up(bridge, model_chunks)`` first pins the buffers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from lightning_bridge.hf_io import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    ShardedSafetensorsWriter,
    TensorSpec,
    _alive,
    _fsync,
    cleanup_stale_temp_dirs,
    plan_shards,
)

logger = logging.getLogger(__name__)

SaveMode = Literal["consolidate", "distribute"]
LATEST = "latest"
_STEP = re.compile(r"^step-(\d+)$")
_OURS_TEMP = re.compile(r"^\.(?P<final>step-\d+|latest|hf-probe)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")
_PART = "part-{:05d}"
_PART_WAIT_GRACE_S = 60.0  # how long rank 0 waits for parts that other ranks reported written
_POLL_S = 0.02


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather(obj: Any) -> list[Any]:
    if _world_size() == 1:
        return [obj]
    out: list[Any] = [None] * _world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    if _world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:  # hf_io's writer puts its whole message there
        return exc.strerror.rstrip(".") + (f" ({exc.filename})" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}".rstrip(".")


class _Aborted(Exception):
    """The save was abandoned (an exception elsewhere in fit) before all its tensors arrived."""


@dataclass
class _Layout:
    """Where every tensor of a save goes; the same for every save of a model, so computed once."""

    plan: dict[str, list[str]]  # shard file -> tensor names (global)
    owner: dict[str, int]  # shard file -> the rank that writes it
    received: list[str]  # the names this rank receives, in export order
    nbytes: dict[str, int]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    total_bytes: int
    budget: int = 0  # this rank's staging budget, decided once (available memory changes as it is used)
    staged_all: bool = True  # this rank's whole share fits the budget
    extra_files: dict[str, str] = field(default_factory=dict)  # rank 0: config.json, generation_config.json
    copy_files: list[Path] = field(default_factory=list)  # rank 0: tokenizer files

    @property
    def writer_ranks(self) -> list[int]:
        return sorted({0, *self.owner.values()})

    def own_plan(self, rank: int) -> dict[str, list[str]]:
        return {file: names for file, names in self.plan.items() if self.owner[file] == rank}


def _distribute_plan(specs: Sequence[TensorSpec], destination: dict[str, int],
                     max_shard_size: int) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Shards that follow the export destinations: per rank, its tensors split by size, numbered globally."""
    groups: list[tuple[int, list[str]]] = []
    for rank in sorted(set(destination.values())):
        mine = [spec for spec in specs if destination[spec.name] == rank]
        groups += [(rank, names) for names in plan_shards(mine, max_shard_size=max_shard_size).values()]
    if len(groups) == 1:
        return {SAFE_WEIGHTS_NAME: groups[0][1]}, {SAFE_WEIGHTS_NAME: groups[0][0]}
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    return ({f: names for f, (_, names) in zip(files, groups)},
            {f: rank for f, (rank, _) in zip(files, groups)})


class _SaveJob:
    """One save on this rank: the staging queue (training thread -> writer thread) and the writer."""

    def __init__(self, callback: HFCheckpoint, layout: _Layout, step: int):
        self.cb, self.layout, self.step = callback, layout, step
        self.rank = _rank()
        self.final_dir = callback.dirpath / f"step-{step}"
        self.parts = layout.writer_ranks != [0]
        self.shared_tmp = callback.dirpath / f".step-{step}.tmp-{callback._token}"
        self.own_plan = layout.own_plan(self.rank)
        self.budget, self.staged_all = layout.budget, layout.staged_all
        self.file_of = {name: file for file, names in self.own_plan.items() for name in names}
        self.started = time.perf_counter()
        self.waited_s = self.blocked_s = 0.0
        self.total_s: float | None = None
        self.published_s: float | None = None  # until the folder is in place, before pruning
        self.own_error: str | None = None  # this rank's part
        self.error: str | None = None  # rank 0: the whole save
        self.published = False
        self.own_done, self._abort = threading.Event(), threading.Event()
        self._deadline: float | None = None
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._staged = 0
        self._busy = self._closed = self._aborting = self._failed = False
        self._thread: threading.Thread | None = None
        self._active = self.rank == 0 or bool(self.own_plan)

    # --- training thread ------------------------------------------------------------------------
    def start(self) -> None:
        if not self._active:
            self.own_done.set()
            return
        self._thread = threading.Thread(target=self._run, name=f"HFCheckpoint-step-{self.step}", daemon=True)
        self._thread.start()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Stage one exported tensor; waits while the budget is full and the writer can free some."""
        dtype = self.layout.dtypes.get(name, tensor.dtype)  # the planned dtype, whatever the export gave
        nbytes = tensor.numel() * dtype.itemsize
        with self._cond:
            while (not self._failed and self._staged and self._staged + nbytes > self.budget
                   and (self._queue or self._busy)):
                self._cond.wait()
            if self._failed:
                return  # keep draining the export (other ranks are in its collectives), drop the data
            self._staged += nbytes
        event = None
        if tensor.is_cuda:
            staged = self.cb._pinned(name, tensor.shape, dtype, keep=self.staged_all)
            staged.copy_(tensor, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:  # a copy: the exported tensor may alias a live parameter
            staged = tensor.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        with self._cond:
            if not self._failed:
                self._queue.append((name, staged, event, nbytes))
                self._cond.notify_all()

    def close(self, abort: bool = False) -> None:
        """No more tensors; with ``abort`` the save is abandoned (its partial output removed)."""
        with self._cond:
            self._closed, self._aborting = True, self._aborting or abort
            self._cond.notify_all()
        if abort:
            self._abort.set()

    def others_finished(self, errors: dict[int, str]) -> None:
        """Rank 0, at the sync point: every other rank's part is finished, with these failures."""
        if errors:
            self._abort.set()
            self.error = self.error or "; ".join(f"rank {r}: {e}" for r, e in sorted(errors.items()))
        self._deadline = time.monotonic() + _PART_WAIT_GRACE_S

    def give_up_after(self, seconds: float) -> None:
        """Rank 0 without a sync point (after an exception): stop waiting for parts after a while."""
        self._deadline = time.monotonic() + seconds

    @property
    def closed(self) -> bool:
        return self._closed

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- writer thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._write_own()
        except BaseException as exc:  # noqa: BLE001 - reported at the next sync point
            self.own_error = _describe(exc)
            self._fail_queue()
            if self.parts and self.rank != 0:
                self._mark_failed()
        finally:
            self.own_done.set()
        if self.rank != 0:
            return
        self.error = self.error or self.own_error
        try:
            if self.parts:
                self._assemble()
            if self.error is None:
                self.published = True
                self.published_s = time.perf_counter() - self.started
                self.cb._after_publish(self.final_dir)
        except BaseException as exc:  # noqa: BLE001
            if self.published:
                self.error = (f"the checkpoint {self.final_dir} is complete, but updating {LATEST} or "
                              f"removing older checkpoints failed: {_describe(exc)}")
            else:
                self.error = self.error or _describe(exc)
                shutil.rmtree(self.shared_tmp, ignore_errors=True)
        self.total_s = time.perf_counter() - self.started
        if self.error is None:
            logger.info("HFCheckpoint saved %s (%d bytes): training blocked %.2f s, total %.2f s",
                        self.final_dir, self.layout.total_bytes, self.blocked_s, self.total_s)
        else:
            logger.error("HFCheckpoint could not save %s: %s", self.final_dir, self.error)

    def _next(self):
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._aborting:
                raise _Aborted(f"the save of step {self.step} was abandoned before all tensors arrived")
            if not self._queue:
                return None
            self._busy = True
            return self._queue.popleft()

    def _write_own(self) -> None:
        target = self.shared_tmp / _PART.format(self.rank) if self.parts else self.final_dir
        writer = ShardedSafetensorsWriter(target, self.own_plan, show_progress=self.cb.show_progress,
                                          overwrite=target.exists())
        remaining = {file: len(names) for file, names in self.own_plan.items()}
        held = dict.fromkeys(self.own_plan, 0)
        try:
            while (item := self._next()) is not None:
                name, tensor, event, nbytes = item
                released = 0
                try:
                    if event is not None:
                        event.synchronize()
                    file = self.file_of.get(name)
                    writer.add(name, tensor)  # writes the shard once it is complete
                    del tensor
                    held[file] += nbytes
                    remaining[file] -= 1
                    if remaining[file] == 0:
                        released = held.pop(file)
                finally:
                    with self._cond:
                        self._busy = False
                        self._staged -= released
                        self._cond.notify_all()
            if self.rank == 0:
                for relative, data in self.layout.extra_files.items():
                    writer.add_file(relative, data)
                for path in self.layout.copy_files:
                    writer.copy_file(path)
            writer.finalize()
        except BaseException:
            writer.abort()
            raise

    def _fail_queue(self) -> None:
        with self._cond:
            self._failed, self._busy = True, False
            self._queue.clear()
            self._staged = 0
            self._cond.notify_all()

    def _mark_failed(self) -> None:
        marker = self.shared_tmp / f"{_PART.format(self.rank)}.failed"
        try:
            self.shared_tmp.mkdir(parents=True, exist_ok=True)
            partial = marker.with_name(f".{marker.name}.{os.getpid()}")
            partial.write_text(self.own_error or "failed")
            os.replace(partial, marker)  # rank 0 never reads half a message
        except OSError:
            pass  # rank 0 learns it at the sync point anyway

    def _assemble(self) -> None:
        """Rank 0 (distribute): wait for every rank's part, move the shards up, index, publish."""
        pending = set(self.layout.writer_ranks) - {0}
        while pending:  # even after a failure: never remove the folder while another rank writes into it
            for rank in sorted(pending):
                part = self.shared_tmp / _PART.format(rank)
                if part.is_dir():
                    pending.discard(rank)
                elif (failed := part.with_name(part.name + ".failed")).is_file():
                    pending.discard(rank)
                    self.error = self.error or f"rank {rank}: {failed.read_text(errors='replace')}"
            late = self._deadline is not None and time.monotonic() > self._deadline
            if pending and (self._abort.is_set() or late):
                if self.error is None:
                    shown = ", ".join(str(r) for r in sorted(pending))
                    self.error = (f"the shards of rank(s) {shown} never appeared in {self.shared_tmp}. With "
                                  "mode='distribute', dirpath must be on a file system that every rank sees")
                break
            if pending:
                time.sleep(_POLL_S)
        if self.error is not None:
            shutil.rmtree(self.shared_tmp, ignore_errors=True)
            return
        try:
            self._merge_parts()
        except OSError as exc:
            shutil.rmtree(self.shared_tmp, ignore_errors=True)
            self.error = (f"could not publish the checkpoint {self.final_dir} ({exc.strerror or exc}); "
                          f"the partial output was removed and {self.final_dir} was not touched")

    def _merge_parts(self) -> None:
        layout, root = self.layout, self.shared_tmp
        for rank in layout.writer_ranks:
            part = root / _PART.format(rank)
            names = list(layout.own_plan(rank))
            if rank == 0:
                names += list(layout.extra_files) + [p.name for p in layout.copy_files]
            for name in names:
                os.rename(part / name, root / name)
            shutil.rmtree(part)
        if len(layout.plan) > 1 or SAFE_WEIGHTS_NAME not in layout.plan:
            weight_map = {name: file for file, names in layout.plan.items() for name in names}
            index = {"metadata": {"total_size": layout.total_bytes},
                     "weight_map": dict(sorted(weight_map.items()))}
            (root / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            _fsync(root / SAFE_WEIGHTS_INDEX_NAME)
        _fsync(root)
        if self.final_dir.exists():  # left by an earlier run: swap it out, as hf_io's writer does
            old = self.cb.dirpath / f".{self.final_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(self.final_dir, old)
            os.rename(root, self.final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(root, self.final_dir)
        _fsync(self.cb.dirpath)


class HFCheckpoint(pl.Callback):
    """Save Hugging Face checkpoints of a :class:`MegatronBridgeStrategy` model while it trains.

    Args:
        dirpath: the folder of the checkpoints (``step-<n>/`` and ``latest``); it must hold nothing
            else: a folder with other files is refused at setup.
        every_n_train_steps: save when ``trainer.global_step`` is a multiple of it (None/0: never).
        every_n_epochs: save at the end of every n-th training epoch (None/0: never).
        save_last: also save at the end of ``fit`` (unless that step is already saved).
        keep_last_k: keep the newest k checkpoints (by step, up to the one just saved); None keeps all.
        mode: ``"consolidate"`` (global rank 0 writes everything) or ``"distribute"`` (every rank
            writes the shards of the tensors the export gives it; needs a shared file system).
        dtype: dtype of the saved tensors; None keeps the source checkpoint's dtypes.
        max_shard_size: bytes per shard (the source layout wins in consolidate mode when there is one).
        staging_budget_bytes: how far (bytes of staged tensors) training may run ahead of the disk;
            None for the default described in the module docstring.
        show_progress: a progress bar per save (on the ranks that write).
    """

    def __init__(self, dirpath: str | os.PathLike = "hf-checkpoints", every_n_train_steps: int | None = 500,
                 every_n_epochs: int | None = None, save_last: bool = True, keep_last_k: int | None = 3,
                 mode: SaveMode = "consolidate", dtype: torch.dtype | None = None,
                 max_shard_size: int = 5 * 2**30, staging_budget_bytes: int | None = None,
                 show_progress: bool = False) -> None:
        if mode not in ("consolidate", "distribute"):
            raise ValueError(f"mode={mode!r}: HFCheckpoint supports 'consolidate' and 'distribute'.")
        for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 0:
                raise ValueError(f"{name}={value} must be positive (or None/0 for never).")
        if keep_last_k is not None and keep_last_k < 1:
            raise ValueError(f"keep_last_k={keep_last_k} must be at least 1, or None to keep every "
                             "checkpoint.")
        if max_shard_size <= 0 or (staging_budget_bytes is not None and staging_budget_bytes <= 0):
            raise ValueError("max_shard_size and staging_budget_bytes must be positive numbers of bytes.")
        self.dirpath = Path(dirpath)
        self.every_n_train_steps, self.every_n_epochs = every_n_train_steps, every_n_epochs
        self.save_last, self.keep_last_k = save_last, keep_last_k
        self.mode, self.dtype = mode, dtype
        self.max_shard_size, self.staging_budget_bytes = max_shard_size, staging_budget_bytes
        self.show_progress = show_progress
        self.save_stats: list[dict[str, Any]] = []
        self._saved_steps: set[int] = set()
        self._pending: _SaveJob | None = None
        self._prepared = False
        self._token = ""
        self._layout_key: tuple | None = None
        self._layout: _Layout | None = None
        self._pinned_pool: dict[str, torch.Tensor] = {}

    # --- Lightning hooks ----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not (hasattr(strategy, "bridge") and hasattr(strategy, "model_chunks")):
            raise TypeError(
                f"HFCheckpoint needs MegatronBridgeStrategy (a strategy with .bridge and .model_chunks), but "
                f"the trainer uses {type(strategy).__name__}. Pass strategy=MegatronBridgeStrategy(...) to "
                "the Trainer.")
        self.prepare()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_train_steps or self.every_n_epochs or self.save_last:
            self.warm_up(trainer.strategy.bridge, trainer.strategy.model_chunks)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0:
            self.save_now(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.save_now(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last:
            self.save_now(trainer)
        self.wait()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._abandon()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._abandon()  # normally nothing is pending: on_train_end waited

    # --- direct use ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Check and tidy ``dirpath`` (rank 0), agree on it everywhere. Collective; runs once."""
        if self._prepared:
            return
        error, path = None, None
        if _rank() == 0:
            try:
                path = str(self._check_dirpath())
            except Exception as exc:  # noqa: BLE001 - every rank must reach the broadcast
                error = (type(exc).__name__, str(exc))
        error, path, token = _broadcast((error, path, f"{os.getpid()}-{secrets.token_hex(4)}"))
        if error is not None:
            kind = {"ValueError": ValueError, "PermissionError": PermissionError}.get(error[0], OSError)
            raise kind(error[1])
        self.dirpath, self._token = Path(path), token
        if self.mode == "distribute" and _world_size() > 1:
            self._check_shared_file_system()
        self._prepared = True

    def warm_up(self, bridge: Any, model_chunks: Sequence[torch.nn.Module]) -> None:
        """Plan the saves now and, on a GPU when this rank's share fits the staging budget, pin its host
        buffers, so the first save does not pay for pinning (seconds for a few GB). Collective."""
        self.prepare()
        chunks = list(model_chunks)
        layout = self._layout_for(bridge, chunks)
        if layout.staged_all and _on_gpu(chunks):
            for name in layout.received:
                self._pinned(name, layout.shapes[name], layout.dtypes[name], keep=True)

    def save_now(self, trainer: Any) -> bool:
        """Save at ``trainer.global_step`` now, from ``trainer.strategy.bridge`` / ``.model_chunks``.

        Collective: call it on every rank. Returns once this rank's tensors are staged (the files are
        written in the background); False when that step is already saved.
        """
        strategy = trainer.strategy
        return self.save(strategy.bridge, strategy.model_chunks, trainer.global_step)

    def save(self, bridge: Any, model_chunks: Sequence[torch.nn.Module], step: int) -> bool:
        """Save ``model_chunks`` as ``dirpath/step-<step>`` through ``bridge`` (an ``AutoBridge``).

        Collective: call it on every rank; :meth:`wait` (or the next save) finishes it."""
        if step in self._saved_steps:
            return False
        self.prepare()
        start = time.perf_counter()
        self._finish_pending()
        waited = time.perf_counter() - start
        chunks = list(model_chunks)
        layout = self._layout_for(bridge, chunks)
        self._saved_steps.add(step)
        job = _SaveJob(self, layout, step)
        job.waited_s = waited
        job.start()
        self._pending = job
        try:
            for name, tensor in bridge.export_hf_weights(chunks, cpu=not _on_gpu(chunks), mode=self.mode,
                                                         dtype=self.dtype):
                job.put(name, tensor)
        except BaseException:
            job.close(abort=True)
            raise
        job.blocked_s = time.perf_counter() - start
        job.close()
        return True

    def wait(self) -> dict[str, Any] | None:
        """Wait until the save in flight is complete on every rank; raise its error. Collective."""
        return self._finish_pending()

    @property
    def writing(self) -> bool:
        """Whether this rank's writer thread is still busy with a save (no collective)."""
        return self._pending is not None and self._pending.running

    # --- internals ----------------------------------------------------------------------------------
    def _check_dirpath(self) -> Path:
        """Rank 0: create dirpath, refuse foreign content, remove what crashed saves left. Returns it."""
        path = self.dirpath.absolute()
        if path.exists() and not path.is_dir():
            raise ValueError(f"HFCheckpoint dirpath {path} exists and is not a folder. Choose a folder "
                             "for the checkpoints (it is created if missing).")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(exc.errno, f"HFCheckpoint cannot create its folder {path}: {exc.strerror or exc}. "
                                     "Choose a writable dirpath.") from exc
        foreign = []
        for entry in sorted(path.iterdir()):
            ours = ((_STEP.match(entry.name) and entry.is_dir() and not entry.is_symlink())
                    or (entry.name == LATEST and entry.is_file()) or _OURS_TEMP.match(entry.name))
            if not ours:
                foreign.append(entry.name)
        if foreign:
            shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
            raise ValueError(
                f"HFCheckpoint dirpath {path} holds files that are not HFCheckpoint checkpoints: {shown}. "
                "HFCheckpoint manages this folder (it deletes old step-* folders) and will not write among "
                "other files: point dirpath at a new or empty folder, or move those files away.")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OSError(13, f"HFCheckpoint cannot write to its folder {path}: permission denied. "
                              "Make it writable for this user or choose another dirpath.")
        cleanup_stale_temp_dirs(path)
        for entry in path.iterdir():
            found = _OURS_TEMP.match(entry.name)
            if found and entry.is_file() and not _alive(int(found["pid"])):
                entry.unlink(missing_ok=True)
        return path

    def _check_shared_file_system(self) -> None:
        probe = self.dirpath / f".hf-probe.tmp-{self._token}"
        if _rank() == 0:
            probe.mkdir(exist_ok=True)
        _broadcast(None)  # the probe exists before anyone looks
        seen = _all_gather(probe.is_dir())
        if _rank() == 0:
            shutil.rmtree(probe, ignore_errors=True)
        if not all(seen):
            missing = [r for r, ok in enumerate(seen) if not ok]
            raise ValueError(
                f"HFCheckpoint(mode='distribute') needs dirpath {self.dirpath} on a file system shared by "
                f"every rank, but rank(s) {missing} do not see it. Use a shared folder, or "
                "mode='consolidate'.")

    def _layout_for(self, bridge: Any, chunks: list[torch.nn.Module]) -> _Layout:
        """The shard plan and who writes what (collective the first time; cached per model)."""
        key = (id(bridge), tuple(id(c) for c in chunks))
        if self._layout_key == key and self._layout is not None:
            return self._layout
        specs = bridge.hf_tensor_specs(chunks, dtype=self.dtype)
        rank = _rank()
        if self.mode == "distribute":
            destination = bridge.export_destinations(chunks)
            plan, owner = _distribute_plan(specs, destination, self.max_shard_size)
            received = [s.name for s in specs if destination[s.name] == rank]
        else:
            plan = plan_shards(specs, max_shard_size=self.max_shard_size, source_weight_map=bridge.source_weight_map())
            owner = dict.fromkeys(plan, 0)
            received = [s.name for s in specs] if rank == 0 else []
        nbytes = {s.name: s.nbytes for s in specs}
        layout = _Layout(plan, owner, received, nbytes, {s.name: s.shape for s in specs},
                         {s.name: s.dtype for s in specs}, sum(nbytes.values()))
        if rank == 0:
            extra_files, copy_files = bridge.hf_metadata_files(self.dtype)
            layout.extra_files.update(extra_files)
            layout.copy_files = list(copy_files)
        layout.budget, layout.staged_all = self._budget(layout, chunks)
        self._layout_key, self._layout = key, layout
        self._pinned_pool.clear()  # kept only while everything fits: see _pinned
        return layout

    def _pinned(self, name: str, shape: torch.Size, dtype: torch.dtype, keep: bool) -> torch.Tensor:
        """A pinned host buffer for one tensor. When the whole model fits the budget, each tensor keeps
        its buffer from save to save (pinning memory is what makes a first save slow); a save only
        starts once the previous one is written, so a buffer is never in use twice."""
        buffer = self._pinned_pool.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = torch.empty(shape, dtype=dtype, pin_memory=True)
            if keep:
                self._pinned_pool[name] = buffer
        return buffer

    def _budget(self, layout: _Layout, chunks: list[torch.nn.Module]) -> tuple[int, bool]:
        mine = sum(layout.nbytes[name] for name in layout.received)
        budget = self.staging_budget_bytes
        if budget is None:
            budget = 2 * self.max_shard_size
            if _on_gpu(chunks):
                local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count())))
                if mine <= _available_memory() / 4 / local:
                    budget = max(budget, mine)
        return budget, mine <= budget

    def _finish_pending(self) -> dict[str, Any] | None:
        """The sync point: every rank waits for its writer, outcomes are shared, errors raised everywhere."""
        job = self._pending
        if job is None:
            return None
        self._pending = None
        job.own_done.wait()
        errors = _all_gather(job.own_error)
        if _rank() == 0:
            job.others_finished({r: e for r, e in enumerate(errors) if r != 0 and e})
            job.join()
            outcome = {"error": job.error, "total_s": job.total_s, "published_s": job.published_s}
        else:
            outcome = None
        outcome = _broadcast(outcome)
        if outcome["error"] is not None:
            raise RuntimeError(
                f"HFCheckpoint could not save step {job.step} to {job.final_dir}: {outcome['error']}. "
                f"Earlier checkpoints in {self.dirpath} are intact.")
        stats = {"step": job.step, "path": str(job.final_dir), "blocked_s": job.blocked_s,
                 "total_s": outcome["total_s"], "published_s": outcome["published_s"],
                 "bytes": job.layout.total_bytes, "waited_s": job.waited_s,
                 "staged_all": job.staged_all, "mode": self.mode}
        self.save_stats.append(stats)
        return stats

    def _abandon(self) -> None:
        """Finish or drop the save in flight without any collective (after an exception, or at teardown)."""
        job = self._pending
        if job is None:
            return
        self._pending = None
        job.close(abort=not job.closed)  # still exporting when the exception came: drop it
        job.give_up_after(_PART_WAIT_GRACE_S)
        job.join()
        if job.error or job.own_error:
            logger.warning("HFCheckpoint: the save of step %d did not complete: %s",
                           job.step, job.error or job.own_error)

    def _after_publish(self, final_dir: Path) -> None:
        """Rank 0's writer, once a checkpoint is complete: point ``latest`` at it, prune old ones."""
        tmp = self.dirpath / f".{LATEST}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.write_text(final_dir.name + "\n")
        _fsync(tmp)
        os.replace(tmp, self.dirpath / LATEST)
        _fsync(self.dirpath)
        if self.keep_last_k is None:
            return
        step = int(_STEP.match(final_dir.name)[1])
        older = sorted(n for n in _step_folders(self.dirpath) if n <= step)
        for n in older[:-self.keep_last_k]:
            trash = self.dirpath / f".step-{n}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.rename(self.dirpath / f"step-{n}", trash)  # never half-deleted under its final name
                shutil.rmtree(trash)
            except OSError as exc:
                logger.warning("HFCheckpoint could not remove the old checkpoint step-%d in %s: %s",
                               n, self.dirpath, exc)


def _on_gpu(chunks: Sequence[torch.nn.Module]) -> bool:
    return any(p.is_cuda for chunk in chunks for p in chunk.parameters())


def _step_folders(dirpath: Path) -> list[int]:
    return [int(m[1]) for p in dirpath.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]


def _available_memory() -> int:
    try:
        import psutil

        return psutil.virtual_memory().available
    except Exception:  # noqa: BLE001 - no psutil: assume little
        return 0
