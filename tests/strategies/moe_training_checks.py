"""A MoE fit that runs inside every rank of a gloo launch (see test_megatron_moe.py)."""

from __future__ import annotations

from pathlib import Path

from megatron.core import parallel_state as ps
from strategies.strategy_checks import GLOBAL_BATCH, LossRecorder, _trainer, _world_size, counting_data
from torch.utils.data import DataLoader

from lightning_bridge import CausalLMModule, HFCheckpoint, MegatronBridgeStrategy
from lightning_bridge.conversion.parallel import global_named_parameters


def fit_with_expert_parallel(folder: str, ep: int, steps: int, output: str) -> dict:
    """Fit ``steps`` steps at EP=``ep``; HFCheckpoint writes the result to ``output`` with every rank
    writing its own shards (``mode="distribute"``). Returns the losses and the experts of each rank."""
    strategy = MegatronBridgeStrategy(folder, expert_model_parallel_size=ep, micro_batch_size=2)
    recorder = LossRecorder()
    saver = HFCheckpoint(dirpath=output, every_n_train_steps=None, save_last=True, mode="distribute",
                         max_shard_size=40_000)
    trainer = _trainer(strategy, max_steps=steps, callbacks=[recorder, saver], enable_checkpointing=False)
    dp = _world_size()  # TP = PP = 1: every rank is a data-parallel replica (EP splits only the experts)
    trainer.fit(CausalLMModule(learning_rate=1e-2), DataLoader(counting_data(64), batch_size=GLOBAL_BATCH // dp))
    experts = sorted({name.split(".")[6] for chunk in strategy.model_chunks
                      for name, _ in global_named_parameters(chunk) if ".local_experts." in name})
    result = {"losses": recorder.losses, "experts": experts, "ep_size": ps.get_expert_model_parallel_world_size()}
    ps.destroy_model_parallel()
    return result


def resume_with_expert_parallel(folder: str, checkpoint_dir: str, ep: int) -> dict:
    """Two epochs at EP=``ep`` with a Lightning checkpoint per epoch, then a resume from epoch 0."""
    import lightning.pytorch as pl

    data = DataLoader(counting_data(32), batch_size=GLOBAL_BATCH // _world_size())

    def run(ckpt_path=None):
        recorder = LossRecorder()
        checkpoints = pl.callbacks.ModelCheckpoint(dirpath=checkpoint_dir, every_n_epochs=1, save_top_k=-1)
        strategy = MegatronBridgeStrategy(folder, expert_model_parallel_size=ep, micro_batch_size=2)
        trainer = _trainer(strategy, max_epochs=2, callbacks=[recorder, checkpoints])
        trainer.fit(CausalLMModule(learning_rate=3e-3, warmup_steps=2), data, ckpt_path=ckpt_path)
        ps.destroy_model_parallel()
        return recorder.losses

    full = run()
    first = min(Path(checkpoint_dir).glob("epoch=0*"))
    return {"full": full, "resumed": run(ckpt_path=str(first))}


def train_with_expert_parallel(folder: str, ep: int, steps: int, output: str, checkpoint_dir: str) -> dict:
    """Both checks in one launch: the fit with HFCheckpoint, then the checkpoint resume."""
    return {**fit_with_expert_parallel(folder, ep, steps, output),
            "resume": resume_with_expert_parallel(folder, checkpoint_dir, ep)}
