"""The ``lightning-bridge`` command: inspect models, check a round trip, serve a local Hub.

    lightning-bridge inspect                      # supported architectures
    lightning-bridge inspect PATH_OR_ID           # the mapping table of a checkpoint
    lightning-bridge roundtrip [PATH_OR_ID]       # HF -> Megatron -> HF check (built-in model by default)
    lightning-bridge hub serve --root DIR --port N
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-bridge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="supported models, or a checkpoint's mapping table")
    inspect.add_argument("model", nargs="?", help="HF id or local checkpoint folder")
    roundtrip = commands.add_parser("roundtrip", help="HF -> Megatron -> HF, with logits and bitwise checks")
    roundtrip.add_argument("model", nargs="?", help="HF id or local folder (default: the built-in tiny Llama)")
    roundtrip.add_argument("--output", default="outputs/roundtrip")
    hub = commands.add_parser("hub", help="a local Hugging Face Hub emulator")
    hub.add_argument("hub_args", nargs=argparse.REMAINDER, help="serve --root DIR --port N [--token T]")
    args = parser.parse_args(argv)

    if args.command == "inspect":
        return _inspect(args.model)
    if args.command == "roundtrip":
        from lightning_bridge.builtin import tiny_llama
        from lightning_bridge.verify import print_round_trip, round_trip

        report = round_trip(args.model or str(tiny_llama()), args.output)
        return 0 if report is None or print_round_trip(report) else 1
    from lightning_bridge.testing.hub_emulator import main as hub_main

    return hub_main(args.hub_args)


def _inspect(model: str | None) -> int:
    from lightning_bridge import AutoBridge

    if model is None:
        print("Supported architectures:")
        for architecture in AutoBridge.list_supported_models():
            print(f"  {architecture}")
        return 0
    bridge = AutoBridge.from_hf_pretrained(model)
    print(f"{model}: {', '.join(bridge.hf_config.architectures or [])} -> {type(bridge._model_bridge).__name__}")
    for mapping in bridge._model_bridge.mapping_registry().get_all_mappings():
        print(f"  {mapping}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
