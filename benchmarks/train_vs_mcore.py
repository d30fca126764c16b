"""Step time of MegatronBridgeStrategy vs a plain Megatron-Core training loop, same model and batch.

    torchrun --nproc_per_node=2 benchmarks/train_vs_mcore.py --shapes llama3.2-1b --tp 2 --mode strategy
    torchrun --nproc_per_node=2 benchmarks/train_vs_mcore.py --shapes llama3.2-1b --tp 2 --mode mcore

Both modes build the same model from the same random HF checkpoint through the bridge, with the
same Megatron DDP config, distributed Adam optimizer, learning-rate schedule, microbatches and
data. ``mcore`` is the loop Megatron-LM's ``pretrain`` runs, without Lightning: zero the grad
buffers, ``get_forward_backward_func()``, ``optimizer.step()``, ``scheduler.step()``, the loss
averaged over data-parallel ranks. ``strategy`` is ``Trainer.fit`` with ``CausalLMModule``.
Each prints ``FIGURES {json}`` on rank 0: mean step time over the steps after ``--warmup``,
tokens/s, the loss at the first and last step, and peak host and GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from memory import PeakMemory
from shapes import SHAPES, random_checkpoint
from torch.utils.data import DataLoader
from train_throughput import CountingSequences, Timer

from lightning_bridge import AutoBridge, CausalLMModule, MegatronBridgeStrategy
from lightning_bridge.distributed import initialize_distributed
from lightning_bridge.module import causal_lm_loss, next_token_targets
from lightning_bridge.optim import megatron_optimizer


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_strategy(args, source: str, data: DataLoader) -> tuple[list[float], list[float]]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    overrides = {"attention_backend": args.attention_backend} if getattr(args, "attention_backend", None) else {}
    peft = None
    if getattr(args, "lora", False):  # LoRA r=16 on every linear layer of the blocks, the base frozen
        from peft import LoraConfig

        peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    strategy = MegatronBridgeStrategy(source, tensor_model_parallel_size=args.tp,
                                      pipeline_model_parallel_size=args.pp, micro_batch_size=args.micro,
                                      provider_overrides=overrides, peft=peft)
    timer = Timer()  # wall time of each step, device work included
    trainer = pl.Trainer(accelerator="auto", devices=world, strategy=strategy, max_steps=args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer], log_every_n_steps=1, precision=args.precision,
                         use_distributed_sampler=False)  # the same batches, in the same order, as mcore
    trainer.fit(_module(args), data)
    return timer.step_times, timer.losses


def _module(args) -> CausalLMModule:
    return CausalLMModule(learning_rate=args.lr, warmup_steps=min(50, args.steps // 10), lr_decay_steps=args.steps)


def timed_steps(data, steps: int, step) -> tuple[list[float], list[float]]:
    """Run ``step(batch)`` (it returns the loss as a tensor) on up to ``steps`` batches: the wall time
    of each step, device work included, and the losses (read after the timed region)."""
    step_times, losses = [], []
    for batch in data:
        _sync()
        start = time.perf_counter()
        loss = step(batch)
        _sync()
        step_times.append(time.perf_counter() - start)
        losses.append(float(loss))
        if len(step_times) == steps:
            break
    return step_times, losses


def run_mcore(args, source, data: DataLoader) -> tuple[list[float], list[float]]:
    """Megatron-LM's training loop, reduced to what a step needs.

    ``source``: a checkpoint folder, or an HF config (random weights, Megatron's init).
    ``args.attention_backend`` (if set): the provider's core attention (``lightning_bridge.attention``).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    initialize_distributed()
    if isinstance(source, (str, os.PathLike)):
        bridge = AutoBridge.from_hf_pretrained(source, torch_dtype=torch.bfloat16)
    else:
        bridge = AutoBridge.from_hf_config(source, torch_dtype=torch.bfloat16)
    provider = bridge.to_megatron_provider(show_progress=False)
    if getattr(args, "attention_backend", None):
        provider.attention_backend = args.attention_backend
    if getattr(args, "expert_backend", None):
        provider.expert_backend = args.expert_backend
    provider.tensor_model_parallel_size, provider.pipeline_model_parallel_size = args.tp, args.pp
    provider.pipeline_dtype = torch.bfloat16
    provider.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=True, check_for_nan_in_grad=False)
    chunks = provider(wrap_with_ddp=True, ddp_config=ddp_config)
    module = _module(args)  # the same hyper-parameters as the strategy run
    hp = module.hparams
    optimizer = megatron_optimizer(OptimizerConfig(  # the strategy's optimizer: fused AdamW on CUDA
        optimizer="adam", lr=hp.learning_rate, min_lr=hp.learning_rate * 0.1, weight_decay=hp.weight_decay,
        adam_beta1=hp.adam_betas[0], adam_beta2=hp.adam_betas[1], adam_eps=hp.adam_eps,
        clip_grad=hp.gradient_clip_val, bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=True,
    ), chunks)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=hp.learning_rate, min_lr=hp.learning_rate * 0.1,
        lr_warmup_steps=hp.warmup_steps, lr_decay_steps=args.steps, lr_decay_style="cosine",
        start_wd=hp.weight_decay, end_wd=hp.weight_decay, wd_incr_steps=args.steps, wd_incr_style="constant",
    )
    provider.grad_scale_func = optimizer.scale_loss
    provider.finalize_model_grads_func = finalize_model_grads
    provider.no_sync_func = chunks[0].no_sync
    vocab_size = provider.vocab_size
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def loss_func(microbatch, logits):
        labels, mask = next_token_targets(microbatch)
        loss_sum, tokens = causal_lm_loss(logits, labels, mask, vocab_size)
        return loss_sum, tokens.to(torch.int), {"loss": torch.stack([loss_sum.detach().double(), tokens.double()])}

    def forward_step(data_iterator, model):
        microbatch = next(data_iterator)
        ids = microbatch["input_ids"]
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return model(ids, positions, None), partial(loss_func, microbatch)

    def step(batch):
        ids = batch["input_ids"].to(device)
        microbatches = [{"input_ids": ids[i:i + args.micro]} for i in range(0, ids.shape[0], args.micro)]
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(microbatches), model=chunks[0],
            num_microbatches=len(microbatches), seq_length=ids.shape[1], micro_batch_size=args.micro,
            forward_only=False,
        )
        optimizer.step()
        scheduler.step(1)
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for reduced in outputs:
                totals += reduced["loss"]
            dist.all_reduce(totals, group=ps.get_data_parallel_group())
        return totals[0] / totals[1].clamp_min(1)

    return timed_steps(data, args.steps, step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("strategy", "mcore"), required=True)
    parser.add_argument("--shapes", default="llama3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the mean")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="sequences per data-parallel replica per step")
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--workdir", default="/tmp/lb-bench")
    parser.add_argument("--precision", default="bf16-mixed", help="the strategy's; mcore mode always runs bf16")
    parser.add_argument("--attention-backend", default=None,
                        help="the provider's attention_backend (auto, sdpa, flex, local); default: auto")
    args = parser.parse_args()
    if args.tp * args.pp != int(os.environ.get("WORLD_SIZE", "1")):
        parser.error("run with --nproc_per_node equal to tp * pp: both modes are compared with DP=1")
    if args.pp != 1 and args.mode == "mcore":
        parser.error("--mode mcore runs PP=1 (one model chunk); compare pipeline layouts with train_throughput.py")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    source = os.path.join(args.workdir, f"{args.shapes}-bfloat16")
    if rank == 0:
        random_checkpoint(args.shapes, source, torch.bfloat16)
    else:
        while not os.path.exists(os.path.join(source, "config.json")):
            time.sleep(0.5)
    dp = world // (args.tp * args.pp)
    dataset = CountingSequences(args.steps * args.batch * dp, args.seq, SHAPES[args.shapes]["vocab_size"])
    # DP=1: every rank reads the same batches, in order, in both modes.
    data = DataLoader(dataset, batch_size=args.batch, drop_last=True)
    with PeakMemory() as peak:
        step_times, losses = (run_strategy if args.mode == "strategy" else run_mcore)(args, source, data)
    if dist.get_rank() == 0:
        steady = step_times[args.warmup:]
        step_s = sum(steady) / len(steady)
        figures = {
            "mode": args.mode, "shapes": args.shapes, "tp": args.tp, "pp": args.pp, "dp": dp, "seq": args.seq,
            "global_batch": args.batch * dp, "micro_batch": args.micro, "steps": len(step_times),
            "step_s": round(step_s, 4), "step_s_median": round(sorted(steady)[len(steady) // 2], 4),
            "tokens_per_s": round(args.batch * dp * args.seq / step_s),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            **peak.figures("run"),
        }
        print("FIGURES " + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
