"""Stream a Megatron model back to HF tensors in each export mode, and see what each rank gets.

    torchrun --nproc_per_node=2 examples/conversion/streaming_export.py --tp 2     # CPU or GPUs
    torchrun --nproc_per_node=4 examples/conversion/streaming_export.py --tp 2 --pp 2
    python examples/conversion/streaming_export.py                                  # one rank

``bridge.export_hf_weights(model, mode=...)`` is a generator of ``(hf_name, tensor)``: full HF
tensors (TP shards gathered, fused q/k/v and gate/up split, vocabulary padding dropped), a few at a
time, so memory stays at a tensor or two whatever the model size. It holds collectives, so EVERY
rank must drain it, even a rank that receives nothing. ``mode`` says who receives each tensor:

- ``consolidate``: global rank 0 receives every tensor (write one checkpoint from one process);
- ``replicate``: every rank receives every tensor (e.g. to feed an inference engine per rank);
- ``distribute``: each tensor goes to exactly one rank (ranks write disjoint shards in parallel).

``order="safetensors"`` (the default) yields tensors in the source checkpoint's shard order. On a
machine without CUDA this runs on the CPU runtime (gloo). Each check below is exact: the tensors
are bitwise equal to the source checkpoint's.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from lightning_bridge import AutoBridge
from lightning_bridge.builtin import tiny_llama

MODES = ("consolidate", "replicate", "distribute")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF id or local folder (default: the built-in tiny Llama)")
    parser.add_argument("--tp", type=int, default=1, help="tensor_model_parallel_size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_model_parallel_size")
    args = parser.parse_args()

    bridge = AutoBridge.from_hf_pretrained(args.model or str(tiny_llama()))
    model = bridge.to_megatron_model(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                                     show_progress=False)
    source = bridge.checkpoint_reader()  # the original safetensors, read lazily, to check against
    all_names = set(source.names())
    rank, world = dist.get_rank(), dist.get_world_size()

    for mode in MODES:
        received, nbytes = [], 0
        for name, tensor in bridge.export_hf_weights(model, mode=mode):  # every rank drains it
            assert torch.equal(tensor, source.get(name)), f"{name} differs from the source checkpoint"
            received.append(name)
            nbytes += tensor.numel() * tensor.element_size()
        per_rank: list = [None] * world
        dist.all_gather_object(per_rank, (received, nbytes))
        if rank == 0:
            print(f"mode={mode}")
            for r, (names, size) in enumerate(per_rank):
                first = f", first {names[0]}" if names else ""
                print(f"  rank {r}: {len(names):3d} of {len(all_names)} tensors, {size / 2**20:.2f} MiB{first}")
            check(mode, [set(names) for names, _ in per_rank], all_names)

    # dtype= casts on the way out (None keeps the source checkpoint's dtypes); cpu=False leaves the
    # tensors on the GPU for a consumer there.
    dtypes = {tensor.dtype for _, tensor in bridge.export_hf_weights(model, mode="replicate", dtype=torch.bfloat16)}
    if rank == 0:
        print(f"dtype=torch.bfloat16: every tensor is {', '.join(map(str, dtypes))}")

def check(mode: str, received: list[set[str]], all_names: set[str]) -> None:
    """What each mode promises: who receives which tensor."""
    if mode == "consolidate":
        ok = received[0] == all_names and not any(received[1:])
    elif mode == "replicate":
        ok = all(names == all_names for names in received)
    else:
        ok = set().union(*received) == all_names and sum(map(len, received)) == len(all_names)
    print(f"  {mode}: {'OK' if ok else 'WRONG'}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
