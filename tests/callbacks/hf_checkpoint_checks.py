"""Code that runs inside spawned ranks (see test_hf_checkpoint.py), and the kill-loop script.

    python tests/callbacks/hf_checkpoint_checks.py kill-loop SOURCE DIRPATH TRIALS SEED

runs a save loop in forked children and SIGKILLs each after a random delay.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path

import torch


def fit_runs(source: str, out_root: str, input_ids: torch.Tensor, runs: dict[str, dict]) -> dict:
    """Several fits, one per layout, in these processes; what each rank saw of each."""
    from megatron.core import parallel_state as ps

    results, world_size = {}, int(os.environ["WORLD_SIZE"])  # Lightning's teardown unsets it
    for key, run in runs.items():
        start = time.perf_counter()
        results[key] = _fit(source, str(Path(out_root) / key), input_ids, world_size, **run)
        results[key]["seconds"] = time.perf_counter() - start
        ps.destroy_model_parallel()
    results["rank_failure"] = _one_rank_fails(source, str(Path(out_root) / "rank-failure"))
    ps.destroy_model_parallel()
    return results


def _one_rank_fails(source: str, dirpath: str) -> dict:
    """PP=2, distribute: rank 1's disk fails during the second save; every rank must raise the same error."""
    import errno

    import torch.distributed as dist

    from lightning_bridge import AutoBridge
    from lightning_bridge.callbacks import HFCheckpoint
    from lightning_bridge.safetensors_stream import StreamedSafetensorsFile

    bridge = AutoBridge.from_hf_pretrained(source)
    chunks = bridge.to_megatron_model(pipeline_model_parallel_size=2)
    callback = HFCheckpoint(dirpath, mode="distribute", max_shard_size=60_000)
    callback.save(bridge, chunks, 1)
    callback.wait()
    if dist.get_rank() == 1:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "simulated")

        StreamedSafetensorsFile._write_at = full
    callback.save(bridge, chunks, 2)
    try:
        callback.wait()
        error = None
    except RuntimeError as exc:
        error = str(exc)
    return {"error": error, "listing": sorted(p.name for p in Path(dirpath).iterdir()),
            "latest": (Path(dirpath) / "latest").read_text().strip()}


def _fit(source: str, dirpath: str, input_ids: torch.Tensor, world_size: int, *, tp: int, pp: int,
         mode: str, steps: int, every: int, keep: int, max_shard_size: int) -> dict:
    import lightning.pytorch as pl
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from lightning_bridge.callbacks import HFCheckpoint
    from lightning_bridge.hf_io import HFCheckpointReader
    from lightning_bridge.module import CausalLMModule
    from lightning_bridge.strategies import MegatronBridgeStrategy
    from lightning_bridge.verify import megatron_logits

    data = [{"input_ids": torch.arange(i % 7, i % 7 + 16) % 96} for i in range(64)]
    strategy = MegatronBridgeStrategy(source, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                      micro_batch_size=2)
    callback = HFCheckpoint(dirpath, every_n_train_steps=every, keep_last_k=keep, save_last=True, mode=mode,
                            max_shard_size=max_shard_size)
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy=strategy,
                         max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback])
    trainer.fit(CausalLMModule(learning_rate=1e-2, warmup_steps=1), DataLoader(data, batch_size=4))
    chunks, bridge = trainer.strategy.model_chunks, trainer.strategy.bridge
    result = {"global_step": trainer.global_step, "stats": callback.save_stats,
              "writing": callback.writing, "logits": megatron_logits(chunks, input_ids)}
    # A consolidate export of the weights at the end of fit, which the last save must equal bit for bit.
    reference = dict(bridge.export_hf_weights(chunks, mode="consolidate"))
    if dist.get_rank() == 0:
        root = Path(dirpath)
        result["listing"] = sorted(p.name for p in root.iterdir())
        result["latest"] = (root / "latest").read_text().strip()
        saved = HFCheckpointReader(root / result["latest"])
        result["saved_names"] = sorted(saved.names())
        result["reference_names"] = sorted(reference)
        result["bitwise"] = all(torch.equal(saved.get(n), t) and saved.get(n).dtype == t.dtype
                                for n, t in reference.items() if n in saved)
        result["shard_files"] = sorted(set(saved.weight_map.values()))
    return result


# --- the kill loop -------------------------------------------------------------------------------------
def _save_forever(source: str, dirpath: str, ready_fd: int, redo_last: bool) -> None:
    """A child: build the model, then save step after step until killed (from the newest step again when
    ``redo_last``, so the first save replaces an existing folder)."""
    from lightning_bridge import AutoBridge
    from lightning_bridge.callbacks import HFCheckpoint

    bridge = AutoBridge.from_hf_pretrained(source)
    chunks = bridge.to_megatron_model()
    callback = HFCheckpoint(dirpath, keep_last_k=2, max_shard_size=30_000)
    callback.prepare()
    step = max([int(p.name[5:]) for p in Path(dirpath).glob("step-*")] + [0]) - int(redo_last)
    os.write(ready_fd, b"1")
    while True:
        step += 1
        with torch.no_grad():  # new weights each step, like training
            for chunk in chunks:
                for param in chunk.parameters():
                    param.add_(0.01)
        callback.save(bridge, chunks, step)


def kill_loop(source: str, dirpath: str, trials: int, seed: int) -> None:
    """Fork a saving child ``trials`` times and SIGKILL it after a random delay each time."""
    import lightning_bridge.callbacks  # noqa: F401 - imported once, before forking
    from lightning_bridge import AutoBridge  # noqa: F401

    rng = random.Random(seed)
    for trial in range(trials):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            try:
                _save_forever(source, dirpath, write_fd, redo_last=trial % 2 == 1)
            finally:
                os._exit(1)
        os.close(write_fd)
        os.read(read_fd, 1)  # the model is built: saving starts now
        os.close(read_fd)
        delay = rng.uniform(0.0, 0.6)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print(f"trial {trial}: killed after {delay:.3f} s", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "kill-loop":
        kill_loop(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
