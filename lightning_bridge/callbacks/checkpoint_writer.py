"""The background writer of :class:`~lightning_bridge.callbacks.HFCheckpoint`: one save's staging queue,
its writer thread, the shard layout and the assembly of the parts other ranks wrote.

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
  into an :class:`~lightning_bridge.hf_io.ShardedSafetensorsWriter`, which writes each tensor at its
  place in its shard as it arrives (the shard layout is planned before the save); then config, generation config and tokenizer files, the index, fsync and the
  atomic rename; then the ``latest`` pointer and ``keep_last_k`` pruning. It never issues a
  collective.
* **Staging budget**: the training thread may run ahead of the disk by ``staging_budget_bytes`` of
  staged tensors; beyond that it waits for the writer to write some ("stream" mode). It never
  waits while the writer is idle, so the save cannot deadlock whatever the budget. Default: on a
  GPU, everything this rank receives when that fits in a quarter of the host's available memory
  (per local rank), else two shards; on the CPU, two shards. ``save_stats[i]["staged_all"]`` says
  whether a save fitted in the budget whole.
* **Memory**: the staged bytes (up to the budget) in host memory, pinned on a GPU and kept pinned
  between saves when everything fits; nothing extra on the device beyond the export's own
  temporaries (a tensor or two at a time).
* **One save at a time**: a save that falls due while the previous one is still writing first
  waits for it (``waited_s`` in the stats), so there is never more than one writer per rank.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_bridge.callbacks.checkpoint_folder import LATEST, get_rank
from lightning_bridge.hf_io import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    ShardedSafetensorsWriter,
    TensorSpec,
    plan_shards,
)
from lightning_bridge.publish import fsync_path, publish_folder

PinnedBuffer = Callable[[str, torch.Size, torch.dtype, bool], torch.Tensor]  # name, shape, dtype, keep

logger = logging.getLogger(__name__)

PART = "part-{:05d}"
PART_WAIT_GRACE_S = 60.0  # how long rank 0 waits for parts that other ranks reported written
_POLL_S = 0.02


class _Aborted(Exception):
    """The save was abandoned (an exception elsewhere in fit) before all its tensors arrived."""


@dataclass
class Layout:
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


def distribute_plan(specs: Sequence[TensorSpec], destination: dict[str, int],
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


class SaveJob:
    """One save on this rank: the staging queue (training thread -> writer thread) and the writer.

    It knows nothing of the callback that runs it: ``dirpath`` and ``token`` (rank 0's staging suffix,
    the same on every rank) say where it writes, ``pinned`` gives a pinned host buffer for a tensor
    (GPU saves), and ``after_publish`` runs on rank 0's writer once ``step-<n>`` is in place.
    """

    def __init__(self, layout: Layout, step: int, *, dirpath: Path, token: str, pinned: PinnedBuffer,
                 after_publish: Callable[[Path], None], show_progress: bool = False):
        self.layout, self.step, self.dirpath = layout, step, dirpath
        self._pinned, self._after_publish, self.show_progress = pinned, after_publish, show_progress
        self.rank = get_rank()
        self.final_dir = dirpath / f"step-{step}"
        self.parts = layout.writer_ranks != [0]
        self.shared_tmp = dirpath / f".step-{step}.tmp-{token}"
        self.own_plan = layout.own_plan(self.rank)
        self.budget, self.staged_all = layout.budget, layout.staged_all
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
            staged = self._pinned(name, tensor.shape, dtype, self.staged_all)
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
        self._deadline = time.monotonic() + PART_WAIT_GRACE_S

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
                self._after_publish(self.final_dir)
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
        target = self.shared_tmp / PART.format(self.rank) if self.parts else self.final_dir
        specs = [TensorSpec(name, self.layout.shapes[name], self.layout.dtypes[name])
                 for names in self.own_plan.values() for name in names]
        writer = ShardedSafetensorsWriter(target, self.own_plan, show_progress=self.show_progress,
                                          overwrite=target.exists(), specs=specs)
        try:
            while (item := self._next()) is not None:
                name, tensor, event, nbytes = item
                released = 0
                try:
                    if event is not None:
                        event.synchronize()
                    writer.add(name, tensor)  # written at its place in its shard at once
                    del tensor
                    released = nbytes
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
        marker = self.shared_tmp / f"{PART.format(self.rank)}.failed"
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
                part = self.shared_tmp / PART.format(rank)
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
            part = root / PART.format(rank)
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
            fsync_path(root / SAFE_WEIGHTS_INDEX_NAME)
        fsync_path(root)
        publish_folder(root, self.final_dir)  # a step-N left by an earlier run is swapped out, with rollback


def on_gpu(chunks: Sequence[torch.nn.Module]) -> bool:
    """Whether the model lives on a GPU (then saves stage through pinned host memory)."""
    return any(p.is_cuda for chunk in chunks for p in chunk.parameters())


def available_memory() -> int:
    """The host's available memory in bytes (0 without psutil), for the default staging budget."""
    try:
        import psutil

        return psutil.virtual_memory().available
    except Exception:  # noqa: BLE001 - no psutil: assume little
        return 0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:  # hf_io's writer puts its whole message there
        return exc.strerror.rstrip(".") + (f" ({exc.filename})" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}".rstrip(".")
