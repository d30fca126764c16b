"""Load an HF checkpoint, build the Megatron-Core model from it, and check its logits.

    python examples/conversion/load_and_build.py                        # the built-in tiny Llama
    python examples/conversion/load_and_build.py --model Qwen/Qwen3-0.6B
    torchrun --nproc_per_node=2 examples/conversion/load_and_build.py --tp 2

``AutoBridge.from_hf_pretrained`` reads config.json only; ``to_megatron_model`` builds this rank's
model chunks and streams the safetensors weights into them, tensor by tensor. The logits of the
Megatron model (gathered over TP, sent from the last pipeline stage) are compared with
transformers' on the same tokens, in float32: they agree to about 1e-6 relative.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import transformers

from lightning_bridge import AutoBridge, families
from lightning_bridge.builtin import tiny_llama
from lightning_bridge.verify import megatron_logits, relative_difference, transformers_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF id or local folder (default: the built-in tiny Llama)")
    parser.add_argument("--tp", type=int, default=1, help="tensor_model_parallel_size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_model_parallel_size")
    args = parser.parse_args()
    source = args.model or str(tiny_llama())

    # 1. The bridge: config.json now, weights later. float32 so the comparison is tight.
    bridge = AutoBridge.from_hf_pretrained(source, torch_dtype=torch.float32)
    config = bridge.transformer_config
    architecture = bridge.hf_config.architectures[0]
    print(f"{source}: {architecture} -> {families.family_for(architecture).__name__}, "
          f"{config.num_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads "
          f"({config.num_query_groups} KV groups), vocab {bridge.hf_config.vocab_size}")

    # 2. This rank's Megatron chunks with the HF weights loaded (starts torch.distributed if needed).
    model = bridge.to_megatron_model(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                                     show_progress=False)
    params = sum(p.numel() for chunk in model for p in chunk.parameters())
    print(f"rank {dist.get_rank()}: {len(model)} chunk(s), {params} parameters on this rank")

    # 3. Same tokens through Megatron (a collective: every rank) and through transformers (rank 0).
    input_ids = torch.randint(0, bridge.hf_config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = megatron_logits(model, input_ids)
    if dist.get_rank() == 0:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        difference = relative_difference(ours, transformers_logits(hf_model, input_ids))
        verdict = "OK" if difference <= 1e-5 else "MISMATCH"
        print(f"logits {tuple(ours.shape)}: max |megatron - transformers| / max |logit| = {difference:.2e} ({verdict})")
        if verdict != "OK":
            raise SystemExit(1)


if __name__ == "__main__":
    main()
