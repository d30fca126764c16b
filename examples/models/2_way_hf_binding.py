"""Load an HF model into Megatron-Core, check it, and bring it back to HF bit for bit.

    python examples/models/2_way_hf_binding.py                      # the built-in tiny Llama
    python examples/models/2_way_hf_binding.py --model path/or/hub-id
    torchrun --nproc_per_node=2 examples/models/2_way_hf_binding.py --tp 2

Prints a short report: Megatron vs transformers logits, and whether the exported checkpoint is
bitwise identical to the source.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from lightning_bridge import AutoBridge
from lightning_bridge.builtin import tiny_llama
from lightning_bridge.hf_io import HFCheckpointReader
from lightning_bridge.verify import megatron_logits, relative_difference, transformers_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF id or local folder (default: the built-in tiny Llama)")
    parser.add_argument("--tp", type=int, default=1, help="tensor_model_parallel_size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_model_parallel_size")
    parser.add_argument("--output", default="outputs/2_way_hf_binding", help="where the HF checkpoint goes")
    args = parser.parse_args()

    source = args.model or str(tiny_llama())
    started = time.perf_counter()
    bridge = AutoBridge.from_hf_pretrained(source, torch_dtype=torch.float32)
    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size = args.tp
    provider.pipeline_model_parallel_size = args.pp
    model = provider(wrap_with_ddp=False)
    built = time.perf_counter() - started

    input_ids = torch.randint(0, bridge.hf_config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ours = megatron_logits(model, input_ids)

    started = time.perf_counter()
    saved = bridge.save_hf_pretrained(model, args.output, show_progress=False)
    exported = time.perf_counter() - started

    if dist.get_rank() == 0:
        reference_model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        difference = relative_difference(ours, transformers_logits(reference_model, input_ids))
        original, result = HFCheckpointReader(bridge.checkpoint_reader().folder), HFCheckpointReader(saved)
        same_names = sorted(original.names()) == sorted(result.names())
        bitwise = same_names and all(torch.equal(original.get(n), result.get(n)) for n in original.names())
        transformers.AutoModelForCausalLM.from_pretrained(saved)  # transformers loads the result
        print(f"model                 {source} ({bridge.hf_config.architectures[0]})")
        print(f"layout                TP={args.tp} PP={args.pp} on {dist.get_world_size()} process(es)")
        print(f"HF -> Megatron        {built:.2f} s")
        print(f"logits vs transformers max |diff| / max |logit| = {difference:.2e}  ({'OK' if difference <= 1e-5 else 'MISMATCH'})")
        print(f"Megatron -> HF        {exported:.2f} s -> {Path(saved).resolve()}")
        print(f"round trip            {'bitwise identical' if bitwise else 'DIFFERENT'} ({len(original.names())} tensors)")
        if difference > 1e-5 or not bitwise:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
