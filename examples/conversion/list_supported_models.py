"""Which Hugging Face models the bridge converts, and how a given checkpoint maps onto Megatron.

    python examples/conversion/list_supported_models.py                 # + the built-in tiny Llama's table
    python examples/conversion/list_supported_models.py --model Qwen/Qwen2.5-0.5B

Reads config.json files only: nothing is built, no weights are read, no process group is started.
"""

from __future__ import annotations

import argparse

from lightning_bridge import AutoBridge, families
from lightning_bridge.builtin import tiny_llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF id or local folder (default: the built-in tiny Llama)")
    args = parser.parse_args()

    print("Supported HF architectures:")
    for architecture in AutoBridge.list_supported_models():
        print(f"  {architecture}")
    print(f"Model family bridges: {', '.join(AutoBridge.get_supported_bridges())}")

    source = args.model or str(tiny_llama())
    if not AutoBridge.can_handle(source):
        print(f"{source}: not supported (AutoBridge.from_hf_pretrained says why)")
        raise SystemExit(1)
    bridge = AutoBridge.from_hf_pretrained(source)
    mappings = bridge.mapping_registry().get_all_mappings()
    architecture = bridge.hf_config.architectures[0]
    print(f"{source}: {architecture} -> {families.family_for(architecture).__name__}, "
          f"{len(mappings)} weight mappings (Megatron parameter <- HF tensors, kind):")
    for mapping in mappings:
        print(f"  {mapping}")


if __name__ == "__main__":
    main()
