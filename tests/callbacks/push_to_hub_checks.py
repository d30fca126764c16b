"""Code that runs inside spawned ranks (see test_push_to_hub.py): fits that end with a PushToHub.

The Hub is the parent's HubEmulator: the parent sets HF_ENDPOINT, HF_TOKEN, HF_HOME and
HF_HUB_DISABLE_XET in the environment the ranks inherit. Each rank sends its stdout/stderr to
``out_root/rank<r>.out`` and returns every log record it saw, so the test can look for the token.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import torch


def fit_and_push(source: str, out_root: str, runs: dict[str, dict]) -> dict:
    """Several fits, one after another in these processes; what each rank saw of each."""
    import huggingface_hub.constants
    from megatron.core import parallel_state as ps

    huggingface_hub.constants.HF_HUB_DISABLE_XET = True  # the env says so too; be sure
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])  # Lightning's teardown unsets it
    out = open(Path(out_root) / f"rank{rank}.out", "w")  # noqa: SIM115 - lives as long as the process
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    records: list[str] = []
    handler = _Collect(records)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    results: dict = {}
    try:
        for key, run in runs.items():
            start = time.perf_counter()
            results[key] = _fit(source, str(Path(out_root) / key), world_size, **run)
            results[key]["seconds"] = time.perf_counter() - start
            ps.destroy_model_parallel()
    finally:
        root.removeHandler(handler)
        sys.stdout.flush()
        sys.stderr.flush()
    results["log_records"] = records
    return results


class _Collect(logging.Handler):
    def __init__(self, records: list[str]):
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append(f"{record.name} {record.levelname} {record.getMessage()}")
        except Exception:  # noqa: BLE001 - a record that cannot format is not the token
            self.records.append(f"{record.name} {record.levelname} {record.msg!r}")


def _fit(source: str, root: str, world_size: int, *, repo_id: str, hf_checkpoint: bool, every: bool,
         steps: int) -> dict:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_bridge.callbacks.push_to_hub import PushToHub
    from lightning_bridge.module import CausalLMModule
    from lightning_bridge.strategies import MegatronBridgeStrategy

    data = [{"input_ids": torch.arange(i % 7, i % 7 + 16) % 96} for i in range(64)]
    callbacks: list[pl.Callback] = []
    if hf_checkpoint:
        from lightning_bridge.callbacks.hf_checkpoint import HFCheckpoint

        callbacks.append(HFCheckpoint(Path(root) / "hf", every_n_train_steps=1, keep_last_k=None, save_last=True))
    # token=None, endpoint=None: HF_TOKEN and HF_ENDPOINT from the environment.
    push = PushToHub(repo_id, push_every_checkpoint=every, retry_backoff_s=0.01,
                     export_dir=None if hf_checkpoint else Path(root) / "export")
    callbacks.append(push)
    strategy = MegatronBridgeStrategy(source, tensor_model_parallel_size=2, micro_batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy=strategy, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         val_check_interval=steps, limit_val_batches=2, num_sanity_val_steps=0,
                         callbacks=callbacks)
    module = CausalLMModule(learning_rate=1e-2, warmup_steps=1)
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data[:8], batch_size=4))
    return {"global_step": trainer.global_step, "tokens_seen": module.tokens_seen,
            "results": list(push.results), "skipped": list(push.skipped), "failure": push.failure,
            "losses": list(push.losses), "exported": str(push._exported) if push._exported else None,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
