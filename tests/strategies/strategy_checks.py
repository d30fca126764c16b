"""Fits that run inside every rank of a gloo launch (see test_megatron.py)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from megatron.core import parallel_state as ps
from torch.utils.data import DataLoader

from lightning_bridge import CausalLMModule, MegatronBridgeStrategy

GLOBAL_BATCH = 8


def counting_data(n: int, seq: int = 16, vocab: int = 96) -> list[dict[str, torch.Tensor]]:
    """A learnable task: x_t = (start + stride * t) mod vocab."""
    g = torch.Generator().manual_seed(0)
    starts, strides = torch.randint(0, vocab, (n,), generator=g), torch.randint(1, 4, (n,), generator=g)
    return [{"input_ids": (s + d * torch.arange(seq)) % vocab} for s, d in zip(starts, strides)]


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train_loss"]))


def _world_size() -> int:
    """The launch's world size (Lightning's teardown removes WORLD_SIZE from the environment)."""
    if "WORLD_SIZE" not in os.environ:
        os.environ["WORLD_SIZE"] = str(torch.distributed.get_world_size())
    return int(os.environ["WORLD_SIZE"])


def _trainer(strategy, max_steps=-1, max_epochs=None, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=_world_size(), strategy=strategy,
                      max_steps=max_steps, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=list(callbacks), **kwargs)


def _fit(folder: str, tp: int, pp: int, steps: int, lr: float) -> tuple[list[float], dict | None]:
    dp = _world_size() // (tp * pp)
    strategy = MegatronBridgeStrategy(folder, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                      micro_batch_size=2)
    recorder = LossRecorder()
    trainer = _trainer(strategy, max_steps=steps, callbacks=[recorder], enable_checkpointing=False)
    data = DataLoader(counting_data(64), batch_size=GLOBAL_BATCH // dp)
    trainer.fit(CausalLMModule(learning_rate=lr), data)
    weights = dict(strategy.bridge.export_hf_weights(strategy.model_chunks, mode="consolidate"))
    ps.destroy_model_parallel()
    return recorder.losses, (weights or None)


def layouts_agree(folder: str, layouts: list[tuple[int, int]]) -> dict:
    """Per layout: weights after one step, and the losses of a longer fit."""
    results = {}
    for tp, pp in layouts:
        _, one_step = _fit(folder, tp, pp, steps=1, lr=1e-4)
        losses, _ = _fit(folder, tp, pp, steps=12, lr=1e-2)
        results[(tp, pp)] = {"one_step": one_step, "losses": losses}
    return results


def resume_and_validate(folder: str, checkpoint_dir: str, tp: int, pp: int) -> dict:
    """Two epochs with a checkpoint per epoch; then resume from epoch 0; plus validation metrics."""
    data = DataLoader(counting_data(32), batch_size=4)
    val = DataLoader(counting_data(8)[::-1], batch_size=4)

    def run(ckpt_path=None):
        recorder = LossRecorder()
        checkpoints = pl.callbacks.ModelCheckpoint(dirpath=checkpoint_dir, every_n_epochs=1, save_top_k=-1)
        strategy = MegatronBridgeStrategy(folder, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                          micro_batch_size=2)
        trainer = _trainer(strategy, max_epochs=2, callbacks=[recorder, checkpoints])
        trainer.fit(CausalLMModule(learning_rate=3e-3, warmup_steps=2), data, val, ckpt_path=ckpt_path)
        return trainer, strategy, recorder.losses

    trainer, strategy, full = run()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    weights = dict(strategy.bridge.export_hf_weights(strategy.model_chunks, mode="consolidate"))
    first = sorted(Path(checkpoint_dir).glob("epoch=0*"))[0]
    _, _, resumed = run(ckpt_path=str(first))
    return {"full": full, "resumed": resumed, "metrics": metrics, "weights": weights or None,
            "val_batches": [b["input_ids"] for b in val]}
