"""Fits that run inside every rank of the family-fit launch (see test_family_fits.py)."""

from __future__ import annotations

import math
import time

import lightning.pytorch as pl
import torch
from megatron.core import parallel_state as ps
from strategies.strategy_checks import LossRecorder, _trainer, _world_size, counting_data
from torch.utils.data import DataLoader

from lightning_bridge import CausalLMModule, MegatronBridgeStrategy
from lightning_bridge.conversion.parallel import global_named_parameters

STEPS = 3
BATCH = 4  # global batch; one microbatch per step per data-parallel replica


VOCAB_PARAMETERS = ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias")


class WeightWatcher(pl.Callback):
    """What training did to this rank's parameters.

    ``unchanged``: parameters left as they were, apart from shards that hold only padded
    vocabulary rows (rank 1 of TP=2, as the vocabulary is padded to 128 x TP); ``padding_nonzero``:
    vocabulary parameters whose padded rows are no longer zero (the loss masks them, so they get
    no gradient and must stay zero).
    """

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.unchanged: list[str] = []
        self.padding_nonzero: list[str] = []

    def on_train_start(self, trainer, module) -> None:
        self.before = {name: p.detach().clone() for name, p in self._parameters(trainer)}

    def on_train_end(self, trainer, module) -> None:
        vocab = trainer.strategy.provider.vocab_size
        for name, p in self._parameters(trainer):
            padding_only = False
            if name in VOCAB_PARAMETERS:
                first_row = ps.get_tensor_model_parallel_rank() * p.shape[0]
                padding_only = first_row >= vocab
                if p[max(vocab - first_row, 0):].any():
                    self.padding_nonzero.append(name)
            if torch.equal(p, self.before[name]) and not padding_only:
                self.unchanged.append(name)

    @staticmethod
    def _parameters(trainer):
        return [(name, p.detach()) for chunk in trainer.strategy.model_chunks
                for name, p in global_named_parameters(chunk)]


def checkpoint_restores_the_weights(trainer: pl.Trainer, path: str) -> bool:
    """Save a (sharded, distributed) checkpoint, zero the weights, load it: are the weights back?"""
    trainer.save_checkpoint(path)
    parameters = WeightWatcher._parameters(trainer)
    saved = {name: p.clone() for name, p in parameters}
    with torch.no_grad():
        for _, p in parameters:
            p.zero_()
    trainer.strategy.load_checkpoint(path)
    return all(torch.equal(p, saved[name]) for name, p in parameters)


def fit_every_family(checkpoints: dict[str, str], settings: dict[str, dict], checkpoint_dir: str) -> dict[str, dict]:
    """Per family: the losses of a short fit, what it did to this rank's parameters, whether a
    distributed checkpoint of the result restores it, and the time taken."""
    results: dict[str, dict] = {}
    for family, folder in checkpoints.items():
        start = time.perf_counter()
        tp = settings[family]["tensor_model_parallel_size"]
        try:
            strategy = MegatronBridgeStrategy(folder, **settings[family])
            recorder, watcher = LossRecorder(), WeightWatcher()
            trainer = _trainer(strategy, max_steps=STEPS, callbacks=[recorder, watcher], enable_checkpointing=False)
            dp = _world_size() // tp
            trainer.fit(CausalLMModule(learning_rate=1e-2, weight_decay=0.0),
                        DataLoader(counting_data(BATCH * STEPS), batch_size=BATCH // dp))
            restored = checkpoint_restores_the_weights(trainer, f"{checkpoint_dir}/{family}")
        except Exception as error:
            # fail the launch at once, naming the family: going on could leave the other rank waiting
            raise RuntimeError(f"fitting {family!r} with {settings[family]} failed: {type(error).__name__}: {error}") from error
        ps.destroy_model_parallel()
        results[family] = {"losses": recorder.losses, "unchanged": watcher.unchanged,
                           "padding_nonzero": watcher.padding_nonzero, "restored": restored,
                           "finite": all(math.isfinite(loss) for loss in recorder.losses),
                           "seconds": time.perf_counter() - start}
    return results
