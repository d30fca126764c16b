"""HFCheckpoint: how long a save blocks training, against a raw safetensors write of the same bytes.

    torchrun --nproc_per_node=1 benchmarks/hf_checkpoint_stall.py --shapes llama3-8b

The model is built without reading any checkpoint: ``AutoBridge.from_hf_config`` on a LlamaConfig of
the shapes, a bf16 provider with ``perform_initialization=False``, then random weights drawn in place.

1. Baseline, same run: the model's HF tensors, already in host memory, written with
   ``safetensors.save_file`` in the same shard plan, each file fsynced (``raw_write_s``).
2. For each staging mode (``staged``: the default budget, everything fits; ``stream``: a budget of
   two shards, the loop waits for the disk), ``--saves`` saves through ``HFCheckpoint.save`` with
   forward passes running on the GPU (the "training") while the files are written in the background.

Prints one line ``FIGURES {json}`` on rank 0: per save ``blocked_s`` (training thread inside the save),
``blocked_synced_s`` (the same plus a device sync, so the device-to-host copies are counted),
``total_s`` (until the checkpoint is published), ``ratio_total_to_raw``, and the forward passes per
second while the writer runs against the idle baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from memory import PeakMemory
from safetensors.torch import save_file
from shapes import llama_config

from lightning_bridge import AutoBridge
from lightning_bridge.callbacks import HFCheckpoint
from lightning_bridge.distributed import initialize_distributed
from lightning_bridge.hf_io import plan_shards
from lightning_bridge.publish import fsync_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="llama3-8b")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dirpath", default="/tmp/lb-bench/hf-checkpoint-stall")
    parser.add_argument("--saves", type=int, default=3, help="saves per staging mode")
    parser.add_argument("--staging", default="staged,stream", help="comma-separated: staged, stream")
    parser.add_argument("--max-shard-size", type=int, default=5 * 2**30)
    parser.add_argument("--seq", type=int, default=1024,
                        help="tokens per forward pass of the stand-in training")
    parser.add_argument("--baseline-s", type=float, default=5.0,
                        help="seconds of forward passes for the baseline")
    parser.add_argument("--raw-repeats", type=int, default=1,
                        help="raw writes in a row: does the disk itself slow down on the next write?")
    args = parser.parse_args()

    initialize_distributed()
    rank = dist.get_rank()
    config = llama_config(args.shapes, torch.bfloat16)
    bridge = AutoBridge.from_hf_config(config, torch_dtype=torch.bfloat16)
    provider = bridge.to_megatron_provider(load_weights=False)
    provider.tensor_model_parallel_size = args.tp
    provider.perform_initialization = False
    start = time.perf_counter()
    chunks = provider(wrap_with_ddp=False)
    with torch.no_grad():
        for param in (p for chunk in chunks for p in chunk.parameters()):
            param.normal_(0.0, 0.02)
    _sync()
    figures: dict = {
        "shapes": args.shapes, "tp": args.tp, "world_size": dist.get_world_size(), "dirpath": args.dirpath,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "build_s": round(time.perf_counter() - start, 3), "max_shard_size": args.max_shard_size,
    }
    forward = _forward_pass(chunks, config.vocab_size, args.seq)
    start = time.perf_counter()
    figures["forward_per_s_baseline"] = round(
        _rate(forward, lambda: time.perf_counter() < start + args.baseline_s, start), 3)

    _sync()
    start = time.perf_counter()  # the floor of any save's blocked time: draining the export, on the device
    for _ in bridge.export_hf_weights(chunks, cpu=False, mode="consolidate"):
        pass
    _sync()
    figures["export_only_s"] = round(time.perf_counter() - start, 3)

    root = Path(args.dirpath)
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    figures.update(_raw_write(bridge, chunks, root / "raw", args.max_shard_size, args.raw_repeats))

    figures["staging"] = {}
    for staging in args.staging.split(","):
        budget = None if staging == "staged" else 2 * args.max_shard_size
        callback = HFCheckpoint(root / staging, keep_last_k=1, max_shard_size=args.max_shard_size,
                                staging_budget_bytes=budget)
        peak = PeakMemory().__enter__()
        _sync()
        start = time.perf_counter()
        callback.warm_up(bridge, chunks)  # what on_train_start does: plan, and pin the staging buffers
        _sync()
        warm_up_s = time.perf_counter() - start
        saves = []
        for step in range(1, args.saves + 1):
            _sync()
            start = time.perf_counter()
            callback.save(bridge, chunks, step)
            host = time.perf_counter() - start
            _sync()
            synced = time.perf_counter() - start
            rate = _rate(forward, lambda cb=callback: cb.writing, time.perf_counter())
            stats = callback.wait()
            saves.append({
                "step": step, "blocked_s": round(stats["blocked_s"], 3), "blocked_host_s": round(host, 3),
                "blocked_synced_s": round(synced, 3), "total_s": round(stats["total_s"], 3),
                "ratio_total_to_raw": round(stats["total_s"] / figures["raw_write_s"], 3),
                "published_s": round(stats["published_s"], 3),  # the folder in place, before pruning
                "ratio_blocked_to_raw": round(synced / figures["raw_write_s"], 3),
                "forward_per_s_during_write": round(rate, 3), "staged_all": stats["staged_all"],
            })
        peak.__exit__(None, None, None)
        figures["staging"][staging] = {"budget_bytes": budget, "warm_up_s": round(warm_up_s, 3),
                                       "saves": saves, **peak.figures("saves")}
        if rank == 0:
            shutil.rmtree(root / staging, ignore_errors=True)
        dist.barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        print("FIGURES " + json.dumps(figures), flush=True)
    dist.barrier()


def _raw_write(bridge: AutoBridge, chunks: list, folder: Path, max_shard_size: int, repeats: int = 1) -> dict:
    """The floor: the same tensors, in host memory already, written by safetensors in the same shards.

    ``raw_write_s`` is the first write; ``raw_write_repeats_s`` lists every write, one after the
    other, each folder removed before the next (as ``keep_last_k=1`` does).
    """
    specs = bridge.hf_tensor_specs(chunks)
    tensors = {name: tensor.to("cpu", copy=True)
               for name, tensor in bridge.export_hf_weights(chunks, cpu=False, mode="consolidate")}
    result: dict = {"checkpoint_gb": round(sum(s.nbytes for s in specs) / 1e9, 3)}
    if dist.get_rank() == 0:
        plan = plan_shards(specs, max_shard_size=max_shard_size)
        times = []
        for _ in range(repeats):
            folder.mkdir(parents=True)
            start = time.perf_counter()
            for file, names in plan.items():
                save_file({name: tensors[name] for name in names}, folder / file, metadata={"format": "pt"})
                fsync_path(folder / file)
            times.append(round(time.perf_counter() - start, 3))
            shutil.rmtree(folder)
        result.update(raw_write_s=times[0], raw_write_repeats_s=times, raw_shards=len(plan),
                      raw_write_gb_per_s=round(result["checkpoint_gb"] / times[0], 3))
    del tensors
    return _broadcast(result)


def _forward_pass(chunks: list, vocab_size: int, seq: int):
    """One forward pass of the model (no grad): the stand-in for training work on the device."""
    device = next(chunks[0].parameters()).device
    ids = torch.randint(0, vocab_size, (1, seq), device=device)
    positions = torch.arange(seq, device=device).unsqueeze(0)

    @torch.no_grad()
    def run() -> None:
        chunks[0](ids, positions, None)
        _sync_device()

    return run


def _rate(step, keep_going, start: float) -> float:
    """Calls of ``step`` per second while ``keep_going()`` (at least one call)."""
    count = 0
    while True:
        step()
        count += 1
        if not keep_going():
            return count / (time.perf_counter() - start)


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sync_device() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _sync() -> None:
    _sync_device()
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
