"""HF -> Megatron import and Megatron -> HF save on a CPU, against the raw floors of the same run.

    python benchmarks/cpu_conversion.py --shapes llama3.2-1b

Writes (once, in a child process) a random-weight checkpoint of ``--shapes`` in ``--workdir``,
warms the page cache with it, then per repeat, in this order:

1. import: ``AutoBridge.from_hf_pretrained`` + ``to_megatron_model`` (what a user calls);
2. save: ``save_hf_weights`` of that model into a fresh folder, then ``os.sync()``;
3. import floor: ``safetensors.torch.load_file`` of the same files + a copy of every tensor into
   a fresh tensor (the least an import can do: read the bytes, land them in memory it owns);
4. save floor: ``safetensors.torch.save_file`` of those tensors into the same file names, then
   ``os.sync()``.

It prints the three ratios the CPU goals are about (medians over the repeats for the times) and
one ``FIGURES {json}`` line. Peak RSS is the process's peak resident memory during the first
import and save (sampled by ``memory.PeakMemory``; libraries included), before any floor ran,
against the checkpoint's size. ``--profile import`` or ``--profile save`` prints a cProfile of
that step in the first repeat. The round trip is checked bitwise once at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import multiprocessing
import os
import pstats
import shutil
import statistics
import time
from pathlib import Path

import torch
from memory import GB, PeakMemory
from safetensors.torch import load_file, save_file
from shapes import random_checkpoint

from lightning_bridge import AutoBridge
from lightning_bridge.distributed import initialize_distributed
from lightning_bridge.hf_io import HFCheckpointReader

GOALS = {"import_ratio": 1.5, "save_ratio": 1.1, "peak_rss_ratio": 2.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="llama3.2-1b")
    parser.add_argument("--workdir", default="/tmp/lb-bench")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", choices=("import", "save"), help="cProfile this step (first repeat)")
    args = parser.parse_args()

    source = Path(args.workdir) / f"{args.shapes}-bfloat16"
    _write_checkpoint_in_child(args.shapes, source)
    initialize_distributed()  # one gloo rank, the CPU runtime active
    files = sorted(set(HFCheckpointReader(source).weight_map.values()))
    checkpoint_bytes = sum((source / file).stat().st_size for file in files)
    _warm_page_cache(source, files)

    figures: dict = {"shapes": args.shapes, "device": "cpu", "cpu_threads": torch.get_num_threads(),
                     "checkpoint_gb": round(checkpoint_bytes / GB, 3), "files": len(files),
                     "import_s": [], "import_floor_s": [], "save_s": [], "save_floor_s": []}
    out, raw = Path(args.workdir) / "cpu-conversion-out", Path(args.workdir) / "cpu-conversion-raw"
    for repeat in range(args.repeats):
        first = repeat == 0
        profile = args.profile if first else None
        with PeakMemory() as peak:
            with _profiled(profile == "import"):
                seconds, (bridge, model) = _timed(_import, source)
        figures["import_s"].append(seconds)
        if first:
            figures["rss_before_import_gb"] = round(peak.start_rss / GB, 2)
            figures["import_peak_rss_gb"] = round(peak.peak_rss / GB, 2)

        shutil.rmtree(out, ignore_errors=True)
        with PeakMemory() as peak:
            with _profiled(profile == "save"):
                seconds, _ = _timed(_save, bridge, model, out)
        figures["save_s"].append(seconds)
        if first:
            figures["save_peak_rss_gb"] = round(peak.peak_rss / GB, 2)
        del bridge, model
        gc.collect()

        seconds, tensors = _timed(_import_floor, source, files)
        figures["import_floor_s"].append(seconds)
        shutil.rmtree(raw, ignore_errors=True)
        seconds, _ = _timed(_save_floor, tensors, raw)
        figures["save_floor_s"].append(seconds)
        del tensors
        gc.collect()
        shutil.rmtree(raw, ignore_errors=True)

    figures["round_trip_bitwise"] = _same_tensors(source, out)
    shutil.rmtree(out, ignore_errors=True)
    peak_rss = max(figures["import_peak_rss_gb"], figures["save_peak_rss_gb"])
    figures["import_ratio"] = _ratio(figures["import_s"], figures["import_floor_s"])
    figures["save_ratio"] = _ratio(figures["save_s"], figures["save_floor_s"])
    figures["peak_rss_ratio"] = round(peak_rss / figures["checkpoint_gb"], 2)
    _report(figures)


# --- the steps --------------------------------------------------------------------------------------
def _import(source: Path):
    bridge = AutoBridge.from_hf_pretrained(source, torch_dtype=torch.bfloat16)
    return bridge, bridge.to_megatron_model(show_progress=False)


def _save(bridge: AutoBridge, model, out: Path) -> None:
    bridge.save_hf_weights(model, out, show_progress=False)
    os.sync()


def _import_floor(source: Path, files: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Every file read with safetensors and each tensor copied into a fresh tensor."""
    copies = {}
    for file in files:
        loaded = load_file(source / file)
        copies[file] = {name: torch.empty_like(tensor).copy_(tensor) for name, tensor in loaded.items()}
        del loaded
    return copies


def _save_floor(tensors: dict[str, dict[str, torch.Tensor]], folder: Path) -> None:
    folder.mkdir(parents=True)
    for file, group in tensors.items():
        save_file(group, folder / file, metadata={"format": "pt"})
    os.sync()


# --- helpers -----------------------------------------------------------------------------------------
def _write_checkpoint_in_child(shapes: str, folder: Path) -> None:
    """The random checkpoint, built in a child process so its memory is not in this one's peak."""
    if (folder / "config.json").is_file():
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    child = multiprocessing.get_context("spawn").Process(target=random_checkpoint, args=(shapes, folder))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"Writing the random {shapes} checkpoint to {folder} failed (exit code "
                           f"{child.exitcode}); see the output above.")


def _warm_page_cache(folder: Path, files: list[str]) -> None:
    """Read every file once through one reused buffer, so both sides read from the page cache."""
    buffer = bytearray(64 * 2**20)
    for file in files:
        with open(folder / file, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def _timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return round(time.perf_counter() - start, 3), result


@contextlib.contextmanager
def _profiled(enabled: bool):
    if not enabled:
        yield
        return
    profiler = cProfile.Profile()
    with profiler:
        yield
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(35)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


def _same_tensors(source: Path, out: Path) -> bool:
    original, result = HFCheckpointReader(source), HFCheckpointReader(out)
    if sorted(original.names()) != sorted(result.names()):
        return False
    return all(torch.equal(original.get(name), result.get(name)) for name in original.names())


def _ratio(ours: list[float], floor: list[float]) -> float:
    return round(statistics.median(ours) / statistics.median(floor), 2)


def _report(figures: dict) -> None:
    rows = [
        ("import", "from_hf_pretrained + to_megatron_model", figures["import_s"],
         "load_file + copy", figures["import_floor_s"], "import_ratio"),
        ("save", "save_hf_weights + os.sync", figures["save_s"],
         "save_file + os.sync", figures["save_floor_s"], "save_ratio"),
    ]
    print(f"checkpoint: {figures['shapes']} shapes, {figures['checkpoint_gb']} GB in {figures['files']} "
          f"file(s); {figures['cpu_threads']} CPU threads")
    for step, ours_label, ours, floor_label, floor, key in rows:
        verdict = "met" if figures[key] <= GOALS[key] else "MISSED"
        print(f"{step:>7}: {ours_label} {ours} s vs {floor_label} {floor} s -> {figures[key]}x "
              f"(goal <= {GOALS[key]}x: {verdict})")
    verdict = "met" if figures["peak_rss_ratio"] <= GOALS["peak_rss_ratio"] else "MISSED"
    print(f"peak RSS: import {figures['import_peak_rss_gb']} GB, save {figures['save_peak_rss_gb']} GB "
          f"(process before import: {figures['rss_before_import_gb']} GB) vs checkpoint "
          f"{figures['checkpoint_gb']} GB -> {figures['peak_rss_ratio']}x "
          f"(goal <= {GOALS['peak_rss_ratio']}x: {verdict})")
    print(f"round trip bitwise: {figures['round_trip_bitwise']}")
    print("FIGURES " + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
