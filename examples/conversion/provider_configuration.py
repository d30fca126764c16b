"""Configure the Megatron model before it is built: TransformerConfig fields and parallel sizes.

    python examples/conversion/provider_configuration.py                 # the built-in tiny Llama
    python examples/conversion/provider_configuration.py --model meta-llama/Llama-3.2-1B
    torchrun --nproc_per_node=2 examples/conversion/provider_configuration.py --tp 2

``bridge.to_megatron_provider()`` returns a ``GPTModelProvider``: a Megatron ``TransformerConfig``
(same field names) filled from the HF config. Nothing is validated or built until it is called,
so any field can be changed first: parallel sizes, precision, dropout, recomputation, sequence
length. ``provider(wrap_with_ddp=False)`` then builds this rank's chunks and loads the HF weights.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from lightning_bridge import AutoBridge
from lightning_bridge.builtin import tiny_llama

SHOWN = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
         "normalization", "gated_linear_unit", "tensor_model_parallel_size", "pipeline_model_parallel_size",
         "params_dtype", "attention_dropout", "recompute_granularity", "seq_length")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF id or local folder (default: the built-in tiny Llama)")
    parser.add_argument("--tp", type=int, default=1, help="tensor_model_parallel_size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_model_parallel_size")
    args = parser.parse_args()
    bridge = AutoBridge.from_hf_pretrained(args.model or str(tiny_llama()))

    provider = bridge.to_megatron_provider(show_progress=False)
    before = {name: getattr(provider, name) for name in SHOWN}

    # Parallel layout: the world size must be a multiple of TP x PP (the rest is data parallel).
    provider.tensor_model_parallel_size = args.tp
    provider.pipeline_model_parallel_size = args.pp
    # Any TransformerConfig field: here precision, dropout, activation recomputation, context length.
    provider.params_dtype = torch.bfloat16
    provider.bf16 = True
    provider.attention_dropout = 0.1
    provider.recompute_granularity, provider.recompute_method, provider.recompute_num_layers = "full", "uniform", 1
    provider.seq_length = 128

    for name in SHOWN:
        after = getattr(provider, name)
        changed = "" if after == before[name] else f"   (was {before[name]})"
        print(f"  {name:30s} {after}{changed}")

    model = provider(wrap_with_ddp=False)  # validates the config, builds, loads the HF weights
    rank = dist.get_rank()
    for index, chunk in enumerate(model):
        params = sum(p.numel() for p in chunk.parameters())
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in chunk.parameters()})
        print(f"rank {rank} chunk {index}: {type(chunk).__name__}, {params} parameters, {dtypes}")


if __name__ == "__main__":
    main()
