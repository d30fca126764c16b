"""Load an HF model into Megatron-Core, check it, and bring it back to HF bit for bit.

    python examples/models/2_way_hf_binding.py                      # the built-in tiny Llama
    python examples/models/2_way_hf_binding.py --model path/or/hub-id
    torchrun --nproc_per_node=2 examples/models/2_way_hf_binding.py --tp 2

Prints a short report: Megatron vs transformers logits, and whether the exported checkpoint is
bitwise identical to the source.
"""

from __future__ import annotations

import argparse

from lightning_bridge.builtin import tiny_llama
from lightning_bridge.verify import print_round_trip, round_trip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF id or local folder (default: the built-in tiny Llama)")
    parser.add_argument("--tp", type=int, default=1, help="tensor_model_parallel_size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_model_parallel_size")
    parser.add_argument("--output", default="outputs/2_way_hf_binding", help="where the HF checkpoint goes")
    args = parser.parse_args()
    report = round_trip(args.model or str(tiny_llama()), args.output, tensor_model_parallel_size=args.tp,
                        pipeline_model_parallel_size=args.pp)
    if report is not None and not print_round_trip(report):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
