"""Where the HF -> Megatron import spends its time, and how fast the checkpoint can be read.

    torchrun --nproc_per_node=1 benchmarks/import_profile.py --shapes llama3.2-1b

Times each phase of ``provider()`` (parallel state, model build, load plan, weight copy) and
reads the whole checkpoint onto the GPU several ways (safetensors' memory map then ``.to``; its
own ``device=`` path; ``pread`` into reused pinned buffers then asynchronous copies), next to
transformers' ``from_pretrained(device_map="cuda")`` of the same files. One JSON line on rank 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from shapes import random_checkpoint

from lightning_bridge import AutoBridge, pinned_read
from lightning_bridge.distributed import initialize_distributed, initialize_model_parallel
from lightning_bridge.hf_io import HFCheckpointReader


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, *args, **kwargs):
    _sync()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    _sync()
    return round(time.perf_counter() - start, 4), result


def _checkpoint_nbytes(folder: str) -> int:
    reader = HFCheckpointReader(folder)
    return sum(math.prod(reader.shape(n)) * reader.dtype(n).itemsize for n in reader.names())


def _read_all(folder: str, threads: int, read_one) -> int:
    """Read every tensor of the checkpoint onto the GPU with ``read_one(reader, name)`` on threads."""
    reader = HFCheckpointReader(folder)
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(lambda name: read_one(reader, name).numel(), reader.names()))


def read_mmap_to(folder: str, threads: int) -> int:
    """The memory-mapped tensor (safetensors ``get_tensor``) copied with ``.to("cuda")``."""
    from safetensors import safe_open

    handles = {file: safe_open(os.path.join(folder, file), framework="pt", device="cpu")
               for file in set(HFCheckpointReader(folder).weight_map.values())}
    return _read_all(folder, threads,
                     lambda reader, name: handles[reader.weight_map[name]].get_tensor(name).to("cuda"))


def read_safetensors_device(folder: str) -> int:
    from safetensors import safe_open

    total = 0
    reader = HFCheckpointReader(folder)
    for file in dict.fromkeys(reader.weight_map.values()):
        with safe_open(os.path.join(folder, file), framework="pt", device="cuda:0") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                total += f.get_tensor(name).numel()
    return total


def read_pinned(folder: str, threads: int, chunk_mb: int) -> int:
    """The loader's own path (:mod:`lightning_bridge.pinned_read`) at this thread count and buffer size."""
    previous, pinned_read.CHUNK_BYTES = pinned_read.CHUNK_BYTES, chunk_mb << 20
    try:
        return _read_all(folder, threads, lambda reader, name: reader.get(name, device="cuda"))
    finally:
        pinned_read.CHUNK_BYTES = previous


def pinned_alloc_s(mb: int) -> float:
    start = time.perf_counter()
    torch.empty(mb << 20, dtype=torch.uint8, pin_memory=True)
    return round(time.perf_counter() - start, 4)


def import_phases(folder: str) -> dict:
    """provider() step by step, each phase timed."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mcore_random

    from lightning_bridge.conversion.context import ConversionContext
    from lightning_bridge.conversion.loading import check_checkpoint_names, plan_loads

    phases = {}
    bridge = AutoBridge.from_hf_pretrained(folder, torch_dtype=torch.bfloat16)
    provider = bridge.to_megatron_provider()
    provider.perform_initialization = False
    _sync()
    start = time.perf_counter()
    phases["parallel_state_s"], _ = _timed(initialize_model_parallel, seed=provider.seed)
    phases["finalize_s"], _ = _timed(provider.finalize)
    phases["seed_s"], _ = _timed(mcore_random.model_parallel_cuda_manual_seed, provider.seed)
    phases["build_gptmodel_s"], chunk = _timed(provider.provide)
    if torch.cuda.is_available():
        phases["to_cuda_s"], chunk = _timed(chunk.cuda, torch.cuda.current_device())
    registry = bridge.mapping_registry()

    def check_names():
        reader = bridge.checkpoint_reader()
        expected = registry.expected_hf_names(bridge.model_bridge.wildcard_ranges())
        check_checkpoint_names(reader, registry, expected, bridge.model_bridge.ignored_hf_patterns)
        return reader

    phases["reader_and_names_s"], reader = _timed(check_names)
    context = ConversionContext.from_config(provider, provider.vocab_size, provider.padded_vocab_size)
    phases["plan_s"], _ = _timed(plan_loads, [chunk], reader, registry, context)
    phases["load_weights_s"], _ = _timed(provider.weight_loader, [chunk], provider)
    phases["total_s"] = round(time.perf_counter() - start, 4)
    del chunk
    ps.destroy_model_parallel()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return phases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="llama3.2-1b")
    parser.add_argument("--workdir", default="/tmp/lb-bench")
    args = parser.parse_args()
    initialize_distributed()
    folder = str(random_checkpoint(args.shapes, os.path.join(args.workdir, f"{args.shapes}-bfloat16")))
    import transformers

    figures: dict = {"shapes": args.shapes}
    nbytes = _checkpoint_nbytes(folder)
    figures["checkpoint_gb"] = round(nbytes / 1e9, 3)

    def hf_load():
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                                 device_map="cuda")

    _timed(hf_load)
    figures["transformers_s"] = [_timed(hf_load)[0] for _ in range(2)]
    torch.cuda.empty_cache()
    figures["phases_cold_process"] = import_phases(folder)
    figures["phases_again"] = import_phases(folder)

    def rate(label, fn, *a):
        seconds, _ = _timed(fn, *a)
        figures[label] = {"s": seconds, "gb_per_s": round(nbytes / 1e9 / seconds, 2)}
        torch.cuda.empty_cache()

    rate("mmap_to_cuda_1thread", read_mmap_to, folder, 1)
    rate("mmap_to_cuda_4threads", read_mmap_to, folder, 4)
    rate("safetensors_device_cuda", read_safetensors_device, folder)
    figures["pinned_alloc_64mb_s"] = pinned_alloc_s(64)
    figures["pinned_alloc_512mb_s"] = pinned_alloc_s(512)
    for threads, chunk_mb in [(1, 64), (4, 16), (4, 64), (8, 32), (4, 64)]:
        rate(f"pinned_pread_{threads}t_{chunk_mb}mb", read_pinned, folder, threads, chunk_mb)
    print("FIGURES " + json.dumps(figures), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
