"""Train with MegatronBridgeStrategy on several GPUs (or CPU processes), launched by torchrun.

    torchrun --nproc_per_node=8 examples/training/multi_gpu_torchrun.py --model meta-llama/Llama-3.2-1B \\
        --devices 8 --tp 2 --pp 2                                  # one node, 8 GPUs: TP=2 x PP=2 x DP=2
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$HEAD \\
        examples/training/multi_gpu_torchrun.py --devices 8 --num-nodes 2 --tp 8 --pp 2
    torchrun --nproc_per_node=2 examples/training/multi_gpu_torchrun.py --accelerator cpu --devices 2 --pp 2

torchrun starts one process per device and sets RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR;
Lightning sees them and does not start processes itself, so ``--devices`` must equal
``--nproc_per_node`` (and ``--num-nodes`` torchrun's ``--nnodes``). The world size must be a
multiple of TP x PP; what is left is data parallelism. Without CUDA the same script runs on the
CPU runtime with gloo (``--accelerator cpu``). At the end, global rank 0 prints the losses and
every rank takes part in writing one HF checkpoint.
"""

from __future__ import annotations

import argparse
import os
import time

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_bridge import CausalLMModule, MegatronBridgeStrategy, StepProgressBar
from lightning_bridge.builtin import corpus_text, tiny_llama
from lightning_bridge.data import TokenBlocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF id or folder (default: the built-in tiny Llama)")
    parser.add_argument("--accelerator", default="gpu", help="gpu, or cpu for the CPU runtime")
    parser.add_argument("--devices", type=int, default=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                        help="processes per node: torchrun's --nproc_per_node")
    parser.add_argument("--num-nodes", type=int, default=1, help="torchrun's --nnodes")
    parser.add_argument("--tp", type=int, default=1, help="tensor_model_parallel_size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_model_parallel_size")
    parser.add_argument("--batch-size", type=int, default=8, help="per data-parallel replica")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: whole batch (PP: 1)")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--output", default="outputs/multi_gpu_torchrun")
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:
        print("note: not started by torchrun; Lightning starts the processes itself")

    source = args.model or str(tiny_llama())
    from transformers import AutoTokenizer

    blocks = TokenBlocks(corpus_text().split("\n\n"), AutoTokenizer.from_pretrained(source), block_size=64)
    train = DataLoader(blocks, batch_size=args.batch_size, shuffle=True, drop_last=True)
    strategy = MegatronBridgeStrategy(source, tensor_model_parallel_size=args.tp,
                                      pipeline_model_parallel_size=args.pp, micro_batch_size=args.micro_batch_size)
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                         strategy=strategy, max_steps=args.max_steps, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, log_every_n_steps=1, default_root_dir=args.output,
                         callbacks=[StepProgressBar()])
    module = CausalLMModule(learning_rate=3e-3, warmup_steps=2)
    started = time.perf_counter()
    trainer.fit(module, train)
    fit_s = time.perf_counter() - started

    # A collective: every rank sends its shards; global rank 0 writes the files.
    saved = strategy.bridge.save_hf_pretrained(strategy.model_chunks, f"{args.output}/final", show_progress=False)
    dp = trainer.world_size // (args.tp * args.pp)
    if trainer.is_global_zero:
        print(f"world {trainer.world_size} = TP {args.tp} x PP {args.pp} x DP {dp}; "
              f"{trainer.global_step} steps in {fit_s:.1f} s; "
              f"train_loss {float(trainer.callback_metrics['train_loss']):.3f}")
        print(f"HF checkpoint: {saved}")


if __name__ == "__main__":
    main()
