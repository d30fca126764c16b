"""A LoRA/DoRA fit under MegatronBridgeStrategy inside every rank of a gloo launch (see test_megatron_lora.py)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from peft import LoraConfig
from strategies.strategy_checks import LossRecorder, _trainer, counting_data
from torch.utils.data import DataLoader

from lightning_bridge import CausalLMModule, MegatronBridgeStrategy
from lightning_bridge.callbacks import HFCheckpoint
from lightning_bridge.verify import megatron_logits

PROBE = torch.tensor([[5, 17, 3, 44, 90, 12, 7, 61]])


def lora_fit_and_resume(folder: str, work: str, tp: int, pp: int, use_dora: bool) -> dict:
    """Two epochs of LoRA with a Lightning checkpoint per epoch and HF adapter checkpoints every 4 steps;
    then the second epoch again, resumed from the first epoch's checkpoint."""
    data = DataLoader(counting_data(32), batch_size=4)
    work_dir = Path(work) / f"tp{tp}-pp{pp}-{'dora' if use_dora else 'lora'}"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=use_dora,
                      init_lora_weights="gaussian")  # B != 0 from the start: the probe logits see the adapter

    def run(ckpt_path=None, hf_dir=None):
        recorder = LossRecorder()
        callbacks = [recorder, pl.callbacks.ModelCheckpoint(dirpath=work_dir / "lightning", every_n_epochs=1,
                                                            save_top_k=-1)]
        if hf_dir is not None:
            callbacks.append(HFCheckpoint(hf_dir, every_n_train_steps=4, keep_last_k=2))
        strategy = MegatronBridgeStrategy(folder, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                          micro_batch_size=2, peft=lora)
        trainer = _trainer(strategy, max_epochs=2, callbacks=callbacks)
        trainer.fit(CausalLMModule(learning_rate=1e-2, warmup_steps=0), data, ckpt_path=ckpt_path)
        return strategy, recorder.losses

    strategy, full = run(hf_dir=work_dir / "hf")
    chunks = strategy.model_chunks
    result = {
        "full": full,
        "trainable": sorted(n for c in chunks for n, p in c.named_parameters() if p.requires_grad),
        "base": dict(strategy.bridge.export_hf_weights(chunks, mode="consolidate")) or None,
        "adapters": dict(strategy.bridge.export_adapter_weights(chunks)) or None,
        "logits": megatron_logits(chunks, PROBE).float(),
        "hf_dir": str(work_dir / "hf"),
    }
    first = sorted((work_dir / "lightning").glob("epoch=0*"))[0]
    _, result["resumed"] = run(ckpt_path=str(first))
    return result
