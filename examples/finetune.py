"""Fine-tune an HF model with MegatronBridgeStrategy and get an HF checkpoint out.

    python examples/finetune.py                                   # built-in tiny Llama + corpus, TP=2 on 2 CPU processes
    python examples/finetune.py --model meta-llama/Llama-3.2-1B --devices 8 --tp 2 --pp 2 --max-steps 1000
    torchrun --nproc_per_node=2 examples/finetune.py              # the same, launched by torchrun

Lightning starts the processes itself (``devices=N``) unless a launcher such as torchrun did.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_bridge import CausalLMModule, MegatronBridgeStrategy
from lightning_bridge.builtin import corpus_text, tiny_llama
from lightning_bridge.data import TokenBlocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF id or folder (default: the built-in tiny Llama)")
    parser.add_argument("--text", default=None, help="a text file to train on (default: the built-in corpus)")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--tp", type=int, default=2, help="tensor_model_parallel_size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_model_parallel_size")
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8, help="per data-parallel replica")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output", default="outputs/finetune")
    args = parser.parse_args()

    source = args.model or str(tiny_llama())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    text = open(args.text).read() if args.text else corpus_text()
    blocks = TokenBlocks(text.split("\n\n"), tokenizer, block_size=args.block_size)
    train = DataLoader(blocks, batch_size=args.batch_size, shuffle=True, drop_last=True)
    val = DataLoader(torch.utils.data.Subset(blocks, range(min(len(blocks), 2 * args.batch_size))),
                     batch_size=args.batch_size, drop_last=True)

    strategy = MegatronBridgeStrategy(source, tensor_model_parallel_size=args.tp,
                                      pipeline_model_parallel_size=args.pp, micro_batch_size=args.micro_batch_size)
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                         strategy=strategy, max_steps=args.max_steps, val_check_interval=max(args.max_steps // 2, 1),
                         check_val_every_n_epoch=None, logger=False, enable_checkpointing=False,
                         log_every_n_steps=1, default_root_dir=args.output)
    module = CausalLMModule(learning_rate=args.lr, warmup_steps=max(args.max_steps // 10, 1))
    started = time.perf_counter()
    trainer.fit(module, train, val)
    fit_s = time.perf_counter() - started
    final = strategy.bridge.save_hf_pretrained(strategy.model_chunks, f"{args.output}/final", show_progress=False)
    if trainer.is_global_zero:
        metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
        print(f"fit: {trainer.global_step} steps in {fit_s:.1f} s, {module.tokens_seen} tokens; metrics {metrics}")
        print(f"HF checkpoint: {final}")


if __name__ == "__main__":
    main()
