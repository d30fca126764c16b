"""HFCheckpoint: Hugging Face checkpoints written while training runs, without stalling it.

    strategy = MegatronBridgeStrategy("meta-llama/Llama-3.2-1B", tensor_model_parallel_size=2)
    trainer = Trainer(strategy=strategy,
                      callbacks=[HFCheckpoint("hf-checkpoints", every_n_train_steps=500, keep_last_k=3)])

Every save writes ``dirpath/step-<global_step>/``: safetensors shards + index, ``config.json``,
``generation_config.json`` and the source model's tokenizer files, loadable by
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

How a save runs (the training thread stages tensors, a writer thread per rank writes them, within a
staging budget, one save at a time) is described in :mod:`~lightning_bridge.callbacks.checkpoint_writer`;
the folder names in :mod:`~lightning_bridge.callbacks.checkpoint_folder`.

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

import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from lightning_bridge.callbacks.checkpoint_folder import (
    LATEST,
    OURS_TEMP,
    STEP,
    all_gather,
    atomic_write,
    broadcast,
    get_rank,
    get_world_size,
    step_folders,
)
from lightning_bridge.callbacks.checkpoint_writer import (
    PART_WAIT_GRACE_S,
    Layout,
    SaveJob,
    available_memory,
    distribute_plan,
    on_gpu,
)
from lightning_bridge.hf_io import ADAPTER_WEIGHTS_NAME, TensorSpec, cleanup_stale_temp_dirs, plan_shards
from lightning_bridge.lora import ADAPTER_CONFIG_NAME, AdapterPlan, adapter_config_json, lora_config_of
from lightning_bridge.publish import process_alive, staging_path, temp_token

logger = logging.getLogger(__name__)

SaveMode = Literal["consolidate", "distribute"]


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
        merge_adapters: for a model trained with LoRA/DoRA adapters (``MegatronBridgeStrategy(peft=...)``):
            False (the default) saves each checkpoint as a PEFT adapter folder (``adapter_config.json``
            and ``adapter_model.safetensors``, for ``PeftModel.from_pretrained(base, folder)``); True
            saves full HF weights with the adapters merged (as PEFT's ``merge_and_unload()``).
    """

    def __init__(self, dirpath: str | os.PathLike = "hf-checkpoints", every_n_train_steps: int | None = 500,
                 every_n_epochs: int | None = None, save_last: bool = True, keep_last_k: int | None = 3,
                 mode: SaveMode = "consolidate", dtype: torch.dtype | None = None,
                 max_shard_size: int = 5 * 2**30, staging_budget_bytes: int | None = None,
                 show_progress: bool = False, merge_adapters: bool = False) -> None:
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
        self.merge_adapters = merge_adapters
        self.save_stats: list[dict[str, Any]] = []
        self._saved_steps: set[int] = set()
        self._pending: SaveJob | None = None
        self._prepared = False
        self._token = ""
        self._layout_key: tuple | None = None
        self._layout: Layout | None = None
        self._adapter_plan: AdapterPlan | None = None  # with the layout of a model with adapters
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
        if get_rank() == 0:
            try:
                path = str(self._check_dirpath())
            except Exception as exc:  # noqa: BLE001 - every rank must reach the broadcast
                error = (type(exc).__name__, str(exc))
        error, path, token = broadcast((error, path, temp_token()))
        if error is not None:
            kind = {"ValueError": ValueError, "PermissionError": PermissionError}.get(error[0], OSError)
            raise kind(error[1])
        self.dirpath, self._token = Path(path), token
        if self.mode == "distribute" and get_world_size() > 1:
            self._check_shared_file_system()
        self._prepared = True

    def warm_up(self, bridge: Any, model_chunks: Sequence[torch.nn.Module]) -> None:
        """Plan the saves now and, on a GPU when this rank's share fits the staging budget, pin its host
        buffers, so the first save does not pay for pinning (seconds for a few GB). Collective."""
        self.prepare()
        chunks = list(model_chunks)
        layout = self._layout_for(bridge, chunks)
        if layout.staged_all and on_gpu(chunks):
            for name in layout.received:
                self._pinned(name, layout.shapes[name], layout.dtypes[name], True)

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
        job = SaveJob(layout, step, dirpath=self.dirpath, token=self._token, pinned=self._pinned,
                      after_publish=self._after_publish, show_progress=self.show_progress)
        job.waited_s = waited
        job.start()
        self._pending = job
        try:
            for name, tensor in self._export(bridge, chunks):
                job.put(name, tensor)
        except BaseException:
            job.close(abort=True)
            raise
        job.blocked_s = time.perf_counter() - start
        job.close()
        return True

    def saves_adapters(self, chunks: Sequence[torch.nn.Module]) -> bool:
        """Whether a save of ``chunks`` is a PEFT adapter folder (a LoRA model, ``merge_adapters=False``)."""
        return not self.merge_adapters and lora_config_of(chunks) is not None

    def _export(self, bridge: Any, chunks: list[torch.nn.Module]):
        cpu = not on_gpu(chunks)
        if self.saves_adapters(chunks):  # small: rank 0 receives them, whatever the mode
            return bridge.export_adapter_weights(chunks, cpu=cpu, mode="consolidate", dtype=self.dtype,
                                                 plan=self._adapter_plan)
        return bridge.export_hf_weights(chunks, cpu=cpu, mode=self.mode, dtype=self.dtype,
                                        merge_adapters=self.merge_adapters and lora_config_of(chunks) is not None)

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
            ours = ((STEP.match(entry.name) and entry.is_dir() and not entry.is_symlink())
                    or (entry.name == LATEST and entry.is_file()) or OURS_TEMP.match(entry.name))
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
            found = OURS_TEMP.match(entry.name)
            if found and entry.is_file() and not process_alive(int(found["pid"])):
                entry.unlink(missing_ok=True)
        return path

    def _check_shared_file_system(self) -> None:
        probe = self.dirpath / f".hf-probe.tmp-{self._token}"
        if get_rank() == 0:
            probe.mkdir(exist_ok=True)
        broadcast(None)  # the probe exists before anyone looks
        seen = all_gather(probe.is_dir())
        if get_rank() == 0:
            shutil.rmtree(probe, ignore_errors=True)
        if not all(seen):
            missing = [r for r, ok in enumerate(seen) if not ok]
            raise ValueError(
                f"HFCheckpoint(mode='distribute') needs dirpath {self.dirpath} on a file system shared by "
                f"every rank, but rank(s) {missing} do not see it. Use a shared folder, or "
                "mode='consolidate'.")

    def _layout_for(self, bridge: Any, chunks: list[torch.nn.Module]) -> Layout:
        """The shard plan and who writes what (collective the first time; cached per model)."""
        key = (id(bridge), tuple(id(c) for c in chunks))
        if self._layout_key == key and self._layout is not None:
            return self._layout
        rank = get_rank()
        if self.saves_adapters(chunks):
            layout = self._adapter_layout(bridge, chunks, rank)
        else:
            layout = self._weights_layout(bridge, chunks, rank)
        layout.budget, layout.staged_all = self._budget(layout, chunks)
        self._layout_key, self._layout = key, layout
        self._pinned_pool.clear()  # kept only while everything fits: see _pinned
        return layout

    def _weights_layout(self, bridge: Any, chunks: list[torch.nn.Module], rank: int) -> Layout:
        """The HF weights' shards (after the source layout, or by ``max_shard_size``), config and tokenizer."""
        plan = bridge.export_plan(chunks)  # the one collective of the planning, kept by the bridge
        specs = bridge.hf_tensor_specs(chunks, dtype=self.dtype)
        if self.mode == "distribute":
            destination = plan.destinations()
            plan, owner = distribute_plan(specs, destination, self.max_shard_size)
            received = [s.name for s in specs if destination[s.name] == rank]
        else:
            plan = plan_shards(specs, max_shard_size=self.max_shard_size,
                               source_weight_map=bridge.source_weight_map())
            owner = dict.fromkeys(plan, 0)
            received = [s.name for s in specs] if rank == 0 else []
        nbytes = {s.name: s.nbytes for s in specs}
        layout = Layout(plan, owner, received, nbytes, {s.name: s.shape for s in specs},
                        {s.name: s.dtype for s in specs}, sum(nbytes.values()))
        if rank == 0:
            extra_files, copy_files = bridge.hf_metadata_files(self.dtype)
            layout.extra_files.update(extra_files)
            layout.copy_files = list(copy_files)
        return layout

    def _adapter_layout(self, bridge: Any, chunks: list[torch.nn.Module], rank: int) -> Layout:
        """One ``adapter_model.safetensors`` written by rank 0, beside ``adapter_config.json``."""
        plan = self._adapter_plan = AdapterPlan.compute(chunks)  # the one collective of the planning, kept
        config = bridge.adapter_config(chunks, plan)
        specs = [TensorSpec(t.name, tuple(t.full_shape), self.dtype or t.dtype) for t in plan.tensors]
        names = [s.name for s in specs]
        nbytes = {s.name: s.nbytes for s in specs}
        layout = Layout({ADAPTER_WEIGHTS_NAME: names}, {ADAPTER_WEIGHTS_NAME: 0}, names if rank == 0 else [],
                        nbytes, {s.name: s.shape for s in specs}, {s.name: s.dtype for s in specs},
                        sum(nbytes.values()))
        if rank == 0:
            layout.extra_files[ADAPTER_CONFIG_NAME] = adapter_config_json(config)
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

    def _budget(self, layout: Layout, chunks: list[torch.nn.Module]) -> tuple[int, bool]:
        mine = sum(layout.nbytes[name] for name in layout.received)
        budget = self.staging_budget_bytes
        if budget is None:
            budget = 2 * self.max_shard_size
            if on_gpu(chunks):
                local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count())))
                if mine <= available_memory() / 4 / local:
                    budget = max(budget, mine)
        return budget, mine <= budget

    def _finish_pending(self) -> dict[str, Any] | None:
        """The sync point: every rank waits for its writer, outcomes are shared, errors raised everywhere."""
        job = self._pending
        if job is None:
            return None
        self._pending = None
        job.own_done.wait()
        errors = all_gather(job.own_error)
        if get_rank() == 0:
            job.others_finished({r: e for r, e in enumerate(errors) if r != 0 and e})
            job.join()
            outcome = {"error": job.error, "total_s": job.total_s, "published_s": job.published_s}
        else:
            outcome = None
        outcome = broadcast(outcome)
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
        job.give_up_after(PART_WAIT_GRACE_S)
        job.join()
        if job.error or job.own_error:
            logger.warning("HFCheckpoint: the save of step %d did not complete: %s",
                           job.step, job.error or job.own_error)

    def _after_publish(self, final_dir: Path) -> None:
        """Rank 0's writer, once a checkpoint is complete: point ``latest`` at it, prune old ones."""
        atomic_write(self.dirpath / LATEST, (final_dir.name + "\n").encode(), durable=True)
        if self.keep_last_k is None:
            return
        step = int(STEP.match(final_dir.name)[1])
        older = sorted(n for n in step_folders(self.dirpath) if n <= step)
        for n in older[:-self.keep_last_k]:
            trash = staging_path(self.dirpath / f"step-{n}")
            try:
                os.rename(self.dirpath / f"step-{n}", trash)  # never half-deleted under its final name
                shutil.rmtree(trash)
            except OSError as exc:
                logger.warning("HFCheckpoint could not remove the old checkpoint step-%d in %s: %s",
                               n, self.dirpath, exc)

