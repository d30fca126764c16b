"""HF checkpoint -> Megatron (import), logits check, Megatron -> HF (export to host, save to disk).

    torchrun --nproc_per_node=2 benchmarks/conversion.py --shapes llama3.2-1b --tp 2

Prints one JSON line of figures on rank 0, with transformers' own load of the same files as the
baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from memory import PeakMemory
from shapes import random_checkpoint

from lightning_bridge import AutoBridge, pinned_read
from lightning_bridge.conversion import loading
from lightning_bridge.distributed import initialize_distributed
from lightning_bridge.hf_io import HFCheckpointReader
from lightning_bridge.verify import megatron_logits, relative_difference, transformers_logits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="llama3.2-1b")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workdir", default="/tmp/lb-bench")
    parser.add_argument("--check-logits", action="store_true", help="also compare fp32 logits with transformers")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the import on rank 0")
    parser.add_argument("--save-repeats", type=int, default=1, help="saves, each followed by a raw write")
    parser.add_argument("--import-only", action="store_true", help="stop after the import")
    parser.add_argument("--read-threads", type=int, help="override loading.READ_THREADS")
    parser.add_argument("--chunk-mb", type=int, help="override pinned_read.CHUNK_BYTES (MiB)")
    parser.add_argument("--pageable-save", action="store_true",
                        help="saves copy to pageable host memory instead of pinned (experiment)")
    args = parser.parse_args()
    if args.read_threads:
        loading.READ_THREADS = args.read_threads
    if args.chunk_mb:
        pinned_read.CHUNK_BYTES = args.chunk_mb * 2**20
    figures_extra = {"read_threads": loading.READ_THREADS, "chunk_mb": pinned_read.CHUNK_BYTES >> 20}
    dtype = getattr(torch, args.dtype)
    initialize_distributed()
    rank = dist.get_rank()
    source = os.path.join(args.workdir, f"{args.shapes}-{args.dtype}")
    if rank == 0:
        random_checkpoint(args.shapes, source, dtype)
    dist.barrier()
    figures: dict = {"shapes": args.shapes, "tp": args.tp, "pp": args.pp, "dtype": args.dtype,
                     "world_size": dist.get_world_size(), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     **figures_extra}
    reader = HFCheckpointReader(source)
    nbytes = sum(torch.Size(reader.shape(n)).numel() * dtype.itemsize for n in reader.names())
    figures["checkpoint_gb"] = round(nbytes / 1e9, 3)

    if rank == 0 and torch.cuda.is_available():  # baseline: transformers' own load of the same files
        import transformers

        transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map="cuda")  # warm cache
        torch.cuda.synchronize()
        with PeakMemory() as peak:
            start = time.perf_counter()
            hf = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map="cuda")
            torch.cuda.synchronize()
            figures["transformers_load_s"] = round(time.perf_counter() - start, 3)
        figures.update(peak.figures("transformers_load"))
        del hf
        torch.cuda.empty_cache()
    dist.barrier()

    bridge = AutoBridge.from_hf_pretrained(source, torch_dtype=dtype)
    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size, provider.pipeline_model_parallel_size = args.tp, args.pp
    provider.perform_initialization = False
    _sync()
    profiler = _profiler(args.profile and rank == 0)
    with PeakMemory() as peak:
        start = time.perf_counter()
        with profiler:
            model = provider(wrap_with_ddp=False)
        _sync()
        figures["import_s"] = round(time.perf_counter() - start, 3)
    figures.update(peak.figures("import"))
    if args.profile and rank == 0:
        import pstats

        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
    if args.import_only:
        if rank == 0:
            print("FIGURES " + json.dumps(figures), flush=True)
        dist.barrier()
        return

    _sync()
    with PeakMemory() as peak:
        start = time.perf_counter()
        exported_bytes = 0
        for _, tensor in bridge.export_hf_weights(model, cpu=True, mode="consolidate"):
            exported_bytes += tensor.numel() * tensor.element_size()
        _sync()
        elapsed = time.perf_counter() - start
    figures.update(peak.figures("export"))
    figures["export_to_host_s"] = round(elapsed, 3)
    figures["export_to_host_gb_per_s"] = round(exported_bytes / 1e9 / elapsed, 2) if rank == 0 else None

    out = os.path.join(args.workdir, f"out-{args.shapes}-tp{args.tp}-pp{args.pp}")
    if args.pageable_save:
        from lightning_bridge.conversion import exporting

        exporting.to_host = lambda tensor: tensor.to("cpu")
        figures["pageable_save"] = True
    ours, raws = [], []
    for repeat in range(args.save_repeats):  # interleaved with the raw writes: the disk's pace drifts
        _sync()
        with PeakMemory() as peak:
            start = time.perf_counter()
            bridge.save_hf_pretrained(model, out, show_progress=False)
            _sync()
            ours.append(round(time.perf_counter() - start, 3))
        if repeat == 0:
            figures.update(peak.figures("save"))
        if rank == 0:
            result = HFCheckpointReader(out)
            if repeat == 0:
                original = HFCheckpointReader(source)
                figures["round_trip_bitwise"] = sorted(result.names()) == sorted(original.names()) and all(
                    torch.equal(result.get(n), original.get(n)) for n in original.names())
            raws.append(_raw_write({n: result.get(n) for n in result.names()}, result.weight_map,
                                   os.path.join(args.workdir, "raw")))
            shutil.rmtree(out)
        dist.barrier()
    figures["save_hf_pretrained_s"] = ours
    if rank == 0:
        figures["raw_safetensors_write_s"] = raws
        figures["save_ratio_median"] = round(statistics.median(ours) / statistics.median(raws), 3)
    del model
    if args.check_logits:
        figures["logits_rel_diff_fp32"] = _logits_check(source, args)
    if rank == 0:
        print("FIGURES " + json.dumps(figures), flush=True)
    dist.barrier()


def _logits_check(source: str, args) -> float | None:
    """fp32 Megatron logits at this layout vs transformers' fp32 logits on the same input."""
    from megatron.core import parallel_state as ps

    torch.backends.cuda.matmul.allow_tf32 = False
    bridge = AutoBridge.from_hf_pretrained(source, torch_dtype=torch.float32)
    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size, provider.pipeline_model_parallel_size = args.tp, args.pp
    provider.perform_initialization = False
    model = provider()
    ids = torch.randint(0, bridge.hf_config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    ours = megatron_logits(model, ids)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    result = None
    if dist.get_rank() == 0:
        import transformers

        device_map = "cuda" if torch.cuda.is_available() else None
        hf = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, device_map=device_map).eval()
        result = relative_difference(ours, transformers_logits(hf, ids))
    ps.destroy_model_parallel()
    return result


def _raw_write(tensors: dict[str, torch.Tensor], weight_map: dict[str, str], folder: str) -> float:
    """The baseline: the same host tensors in the same files, ``safetensors.save_file`` and fsync each."""
    from safetensors.torch import save_file

    from lightning_bridge.publish import fsync_path

    os.makedirs(folder)
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        files.setdefault(file, []).append(name)
    start = time.perf_counter()
    for file, names in files.items():
        save_file({n: tensors[n].contiguous() for n in names}, os.path.join(folder, file), metadata={"format": "pt"})
        fsync_path(Path(folder) / file)
    elapsed = round(time.perf_counter() - start, 3)
    shutil.rmtree(folder)
    return elapsed


def _profiler(enabled: bool):
    import contextlib
    import cProfile

    return cProfile.Profile() if enabled else contextlib.nullcontext()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.barrier()


if __name__ == "__main__":
    main()
