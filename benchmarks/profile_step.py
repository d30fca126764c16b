"""Where a training step's time goes: GPU kernel time against wall time, and the top kernels and ops.

    python benchmarks/profile_step.py --paths mcore,strategy     # Llama-3.2-1B shapes, seq 2048

Runs each path of ``train_mfu.py`` for ``--warmup`` + ``--steps`` steps under ``torch.profiler`` and prints, per path: wall time per step, the sum of GPU kernel time per step (a step
whose kernels sum to much less than its wall time waits on the host), and the largest kernels and
host-side ops.
"""

from __future__ import annotations

import argparse
import time

import torch
from shapes import SHAPES, llama_config
from torch.utils.data import DataLoader
from train_mfu import free_memory, run_path
from train_throughput import CountingSequences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="llama3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--paths", default="mcore,strategy")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    config = llama_config(args.shapes, torch.bfloat16)
    for path in args.paths.split(","):
        data = DataLoader(CountingSequences(args.batch * (args.steps + args.warmup), args.seq, config.vocab_size),
                          batch_size=args.batch)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        args.steps += args.warmup
        with torch.profiler.profile(activities=activities) as profiler:
            start = time.perf_counter()
            step_times, _ = run_path(path, args, config, data)
            total = time.perf_counter() - start
        args.steps -= args.warmup
        events = profiler.key_averages()
        kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        wall = sum(step_times[args.warmup:]) / max(len(step_times) - args.warmup, 1)
        print(f"\n=== {path}: wall {wall * 1e3:.1f} ms/step after warm-up; GPU kernels "
              f"{kernel_us / 1e3 / len(step_times):.1f} ms/step over all {len(step_times)} steps (run {total:.0f} s)")
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        free_memory()


if __name__ == "__main__":
    main()
