"""Fit a Llama-shaped model with MegatronBridgeStrategy; print tokens/s and the loss curve.

    torchrun --nproc_per_node=2 benchmarks/train_throughput.py --shapes llama-100m --tp 2 --steps 300

The data is a learnable synthetic task (counting sequences with random starts and strides), so
the loss must fall well below log(vocab).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from shapes import SHAPES, random_checkpoint
from torch.utils.data import DataLoader, Dataset

from lightning_bridge import CausalLMModule, MegatronBridgeStrategy


class CountingSequences(Dataset):
    """x_t = (start + stride * t) mod V: each sample is predictable after two tokens."""

    def __init__(self, length: int, seq_length: int, vocab: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.vocab = min(vocab, 1000)
        self.starts = torch.randint(0, self.vocab, (length,), generator=generator)
        self.strides = torch.randint(1, 7, (length,), generator=generator)
        self.seq_length = seq_length

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        t = torch.arange(self.seq_length)
        return {"input_ids": (self.starts[index] + self.strides[index] * t) % self.vocab}


class Timer(pl.Callback):
    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.losses: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_times.append(time.perf_counter() - self._start)
        self.losses.append(float(trainer.callback_metrics["train_loss"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="llama-100m", choices=sorted(SHAPES))
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8, help="per data-parallel replica")
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workdir", default="/tmp/lb-bench")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    source = os.path.join(args.workdir, f"{args.shapes}-bfloat16")
    if int(os.environ.get("RANK", "0")) == 0:
        random_checkpoint(args.shapes, source, torch.bfloat16)
    else:
        while not os.path.exists(os.path.join(source, "config.json")):
            time.sleep(0.5)
    strategy = MegatronBridgeStrategy(source, tensor_model_parallel_size=args.tp,
                                      pipeline_model_parallel_size=args.pp, micro_batch_size=args.micro)
    timer = Timer()
    trainer = pl.Trainer(accelerator="auto", devices=world, strategy=strategy, max_steps=args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer], log_every_n_steps=1)
    data = DataLoader(CountingSequences(args.steps * args.batch * world, args.seq, SHAPES[args.shapes]["vocab_size"]), batch_size=args.batch,
                      drop_last=True)
    trainer.fit(CausalLMModule(learning_rate=args.lr, warmup_steps=min(50, args.steps // 10)), data)
    if dist.get_rank() == 0:
        dp = world // (args.tp * args.pp)
        steady = timer.step_times[min(10, len(timer.step_times) // 2):]
        step_s = sum(steady) / len(steady)
        figures = {
            "shapes": args.shapes, "tp": args.tp, "pp": args.pp, "dp": dp, "steps": args.steps, "seq": args.seq,
            "global_batch": args.batch * dp, "micro_batch": args.micro, "step_s": round(step_s, 4),
            "tokens_per_s": round(args.batch * dp * args.seq / step_s),
            "loss_first": round(timer.losses[0], 3), "loss_last": round(timer.losses[-1], 3),
            "loss_curve_every_25": [round(x, 3) for x in timer.losses[::25]],
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        }
        print("FIGURES " + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
