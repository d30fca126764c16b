"""The ``lightning-bridge`` command: convert checkpoints, train, inspect models, serve a local Hub.

    lightning-bridge convert hf-to-megatron SRC DST [--tp 2] [--pp 1] [--dtype bfloat16]
        an HF checkpoint (folder or Hub id) -> a Megatron-Core distributed checkpoint folder
        (torch_dist, the format MegatronBridgeStrategy writes) with the HF config and tokenizer in
        DST/hf_config/, so converting back needs only the folder.
    lightning-bridge convert megatron-to-hf SRC DST [--tp 1] [--dtype bfloat16]
        a Megatron distributed checkpoint (from `convert hf-to-megatron`, or a Lightning checkpoint
        folder MegatronBridgeStrategy saved while training) -> an HF folder transformers loads.
        Distributed checkpoints do not depend on the layout: write at TP=2, read back at TP=1.
    lightning-bridge fit [--config fit.yaml] [--model_id ID] [--strategy.tensor_model_parallel_size 2]
                         [--trainer.devices 2] [--trainer.max_steps 100] [--print_config]
        Lightning's CLI (LightningCLI) over MegatronBridgeStrategy, CausalLMModule and a data module
        (default SFTDataModule: --data.dataset PATH_OR_ID; --data lightning_bridge.TextDataModule for
        plain text); with no model and no data it fine-tunes the built-in tiny Llama on the built-in chat set.
    lightning-bridge inspect [PATH_OR_ID] [--json]
        supported architectures; or a checkpoint's TransformerConfig, mapping table and shapes.
    lightning-bridge roundtrip [PATH_OR_ID]       HF -> Megatron -> HF check (built-in model by default)
    lightning-bridge hub serve --root DIR --port N

Conversions run as one process (TP=PP=1) or under torchrun at any layout:
``torchrun --nproc_per_node=4 -m lightning_bridge.cli convert hf-to-megatron SRC DST --tp 2 --pp 2``.
Outputs are written under a temporary name and renamed when complete; an existing non-empty
output is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import itertools
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16")
# Errors a user can fix from the message alone (bad path, unknown Hub id, unsupported model, layout; a
# full disk, a read-only or unwritable output, a corrupt checkpoint: a CheckpointIOError, an OSError):
# printed as one line without a traceback (--debug shows it).
_USER_ERRORS = (ValueError, OSError, TypeError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:
        return _fit(argv[1:])  # LightningCLI parses its own arguments
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            return _convert(args)
        if args.command == "inspect":
            return _inspect(args.model, as_json=args.json)
        if args.command == "roundtrip":
            return _roundtrip(args.model, args.output)
    except _USER_ERRORS as exc:
        if getattr(args, "debug", False):
            raise
        print(f"lightning-bridge {args.command}: error: {exc}", file=sys.stderr)
        return 1
    from lightning_bridge.testing.hub_emulator import main as hub_main

    return hub_main(args.hub_args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-bridge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the whole traceback of an error")

    convert = commands.add_parser("convert", help="HF <-> Megatron-Core distributed checkpoint, at any layout",
                                  description=_CONVERT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    directions = convert.add_subparsers(dest="direction", required=True)
    for direction, help_text in (("hf-to-megatron", "an HF checkpoint -> a Megatron distributed checkpoint"),
                                 ("megatron-to-hf", "a Megatron distributed checkpoint -> an HF checkpoint")):
        sub = directions.add_parser(direction, help=help_text, description=help_text, parents=[debug])
        src_help = ("HF checkpoint folder or Hub id" if direction == "hf-to-megatron"
                    else "Megatron checkpoint folder (from convert, or a MegatronBridgeStrategy .ckpt folder)")
        sub.add_argument("src", help=src_help)
        sub.add_argument("dst", help="output folder (written atomically)")
        sub.add_argument("--tensor-model-parallel-size", "--tp", type=int, default=1, dest="tp",
                         help="tensor-parallel size of the model built for the conversion (default 1)")
        sub.add_argument("--pipeline-model-parallel-size", "--pp", type=int, default=1, dest="pp",
                         help="pipeline-parallel size (default 1)")
        sub.add_argument("--expert-model-parallel-size", "--ep", type=int, default=1, dest="ep",
                         help="expert-parallel size, passed to Megatron (default 1)")
        dtype_help = ("parameter dtype of the Megatron checkpoint (default: the HF config's)"
                      if direction == "hf-to-megatron" else "dtype of the HF tensors (default: the source's)")
        sub.add_argument("--dtype", choices=_DTYPES, default=None, help=dtype_help)
        if direction == "megatron-to-hf":
            sub.add_argument("--hf-config", default=None,
                             help="HF folder or id describing the model, for a checkpoint without hf_config/")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output")
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")

    commands.add_parser("fit", help="train with LightningCLI + MegatronBridgeStrategy (see `fit --help`)",
                        add_help=False)
    inspect = commands.add_parser("inspect", help="supported models, or a checkpoint's config and mapping table",
                                  parents=[debug])
    inspect.add_argument("model", nargs="?", help="HF id or local checkpoint folder")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    roundtrip = commands.add_parser("roundtrip", help="HF -> Megatron -> HF, with logits and bitwise checks",
                                    parents=[debug])
    roundtrip.add_argument("model", nargs="?", help="HF id or local folder (default: the built-in tiny Llama)")
    roundtrip.add_argument("--output", default="outputs/roundtrip")
    hub = commands.add_parser("hub", help="a local Hugging Face Hub emulator")
    hub.add_argument("hub_args", nargs=argparse.REMAINDER, help="serve --root DIR --port N [--token T]")
    return parser


_CONVERT_HELP = """Convert between Hugging Face checkpoints and Megatron-Core distributed checkpoints.

    lightning-bridge convert hf-to-megatron ./llama ./llama-megatron [--dtype bfloat16]
    torchrun --nproc_per_node=2 -m lightning_bridge.cli convert hf-to-megatron ./llama ./llama-megatron --tp 2
    lightning-bridge convert megatron-to-hf ./llama-megatron ./llama-hf
    lightning-bridge convert megatron-to-hf "checkpoints/epoch=0-step=500.ckpt" ./step-500-hf

The layout (--tp/--pp) is how the model is built for the conversion; the checkpoint itself does not
depend on it. Run a single process for TP=PP=1, or torchrun with a multiple of TP x PP processes.
"""


# --- convert ------------------------------------------------------------------------------------
def _convert(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from lightning_bridge import dist_checkpoint

    started = time.perf_counter()
    if not args.debug:  # its write failures (a full disk) end in our one-line error; it would log them first
        logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async").setLevel(logging.CRITICAL)
    src, dst = Path(args.src), Path(args.dst)
    dist_checkpoint.check_output_folder(dst, args.overwrite)
    if args.direction == "megatron-to-hf":
        dist_checkpoint.check_megatron_checkpoint(src)
    elif _looks_local(args.src) and not src.exists():
        raise FileNotFoundError(f"The HF checkpoint {args.src} does not exist. Check the path (or pass a Hub id).")
    elif dist_checkpoint.is_megatron_checkpoint(src):
        raise ValueError(f"{src} is a Megatron distributed checkpoint, not an HF one: use "
                         "`lightning-bridge convert megatron-to-hf` to convert it.")
    owns_process_group, rank = not dist.is_initialized(), 0
    try:
        if args.direction == "hf-to-megatron":
            _hf_to_megatron(args)
        else:
            _megatron_to_hf(args)
    finally:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        if owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(f"converted {src} -> {dst} ({args.direction}, TP={args.tp} PP={args.pp} EP={args.ep}) "
              f"in {time.perf_counter() - started:.1f} s")
    return 0


def _hf_to_megatron(args: argparse.Namespace) -> None:
    from lightning_bridge import AutoBridge, dist_checkpoint
    from lightning_bridge.distributed import initialize_model_parallel

    bridge = AutoBridge.from_hf_pretrained(args.src, torch_dtype=args.dtype)
    initialize_model_parallel(args.tp, args.pp, expert_model_parallel_size=args.ep)  # checks the world size
    provider = bridge.to_megatron_provider(load_weights=True, show_progress=not args.no_progress)
    _set_layout(provider, args)
    chunks = provider(wrap_with_ddp=False)
    dist_checkpoint.save_megatron_checkpoint(chunks, bridge, args.dst, overwrite=args.overwrite)


def _megatron_to_hf(args: argparse.Namespace) -> None:
    import torch

    from lightning_bridge import dist_checkpoint
    from lightning_bridge.distributed import initialize_model_parallel

    initialize_model_parallel(args.tp, args.pp, expert_model_parallel_size=args.ep)  # checks the world size
    bridge, chunks = dist_checkpoint.load_megatron_model(
        args.src, tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        expert_model_parallel_size=args.ep, hf_config=args.hf_config,
    )
    dst = Path(args.dst)
    bridge.save_hf_pretrained(chunks, dst, show_progress=not args.no_progress,
                              dtype=getattr(torch, args.dtype) if args.dtype else None,
                              overwrite=dst.exists())  # check_output_folder has refused a non-empty one


def _set_layout(provider: Any, args: argparse.Namespace) -> None:
    provider.tensor_model_parallel_size = args.tp
    provider.pipeline_model_parallel_size = args.pp
    provider.expert_model_parallel_size = args.ep


def _looks_local(source: str) -> bool:
    """Whether ``source`` names a local path rather than a Hub id ("org/name" or "name")."""
    return Path(source).is_absolute() or source.startswith((".", "~")) or source.count("/") > 1


def _roundtrip(model: str | None, output: str) -> int:
    from lightning_bridge.builtin import tiny_llama
    from lightning_bridge.verify import print_round_trip, round_trip

    report = round_trip(model or str(tiny_llama()), output)
    return 0 if report is None or print_round_trip(report) else 1


# --- fit ----------------------------------------------------------------------------------------
def _fit(argv: list[str]) -> int:
    """``lightning-bridge fit``: LightningCLI with the strategy's arguments under ``--strategy.*``."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.cli import LightningCLI

    from lightning_bridge.module import CausalLMModule
    from lightning_bridge.progress import StepProgressBar
    from lightning_bridge.strategies import MegatronBridgeStrategy

    class BridgeCLI(LightningCLI):
        """LightningCLI whose Trainer always runs MegatronBridgeStrategy, configured by ``--strategy.*``."""

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_argument("--model_id", type=str | None, default=None,
                                help="HF id or folder to train (default: the built-in tiny Llama)")
            parser.add_class_arguments(
                MegatronBridgeStrategy, "strategy", instantiate=True, fail_untyped=False,
                skip={"model", "accelerator", "parallel_devices", "cluster_environment", "ddp_config", "timeout"},
            )
            parser.set_defaults({"data": {"class_path": "lightning_bridge.SFTDataModule"}})  # --data.dataset ...
            parser.link_arguments("model_id", "model.hf_model", compute_fn=_resolve_model)
            parser.link_arguments("model_id", "data.init_args.tokenizer", compute_fn=_resolve_model)

        def parse_arguments(self, parser: Any, args: Any) -> None:
            self.config = parser.parse_args(args)  # args always come from main(): no "args and argv" warning

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            chosen = self._get(self.config, "trainer", default={}).get("strategy", "auto")
            if chosen not in (None, "auto"):
                raise ValueError(f"--trainer.strategy={chosen!r} is not used by `lightning-bridge fit`, which "
                                 "always trains with MegatronBridgeStrategy: set --strategy.* flags instead "
                                 "(e.g. --strategy.tensor_model_parallel_size 2).")
            trainer = super().instantiate_trainer(strategy=self._get(self.config_init, "strategy"), **kwargs)
            bar = trainer.progress_bar_callback
            if type(bar) in (TQDMProgressBar, RichProgressBar):  # Lightning's default, not the user's choice
                trainer.callbacks[trainer.callbacks.index(bar)] = StepProgressBar()
            return trainer

    try:
        BridgeCLI(CausalLMModule, pl.LightningDataModule, subclass_mode_data=True, args=["fit", *argv],
                  auto_configure_optimizers=False,
                  save_config_kwargs={"overwrite": True},
                  parser_kwargs={"prog": "lightning-bridge", "description": _FIT_HELP})
    except SystemExit as exc:  # --help, --print_config and argument errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    return 0


_FIT_HELP = """Train a Hugging Face model with MegatronBridgeStrategy from Lightning's CLI.

    lightning-bridge fit --trainer.max_steps 3 --trainer.devices 2      # built-in tiny Llama and chat set, CPU
    lightning-bridge fit --config examples/configs/sft_tiny_llama.yaml
    lightning-bridge fit --config examples/configs/fit_tiny_llama.yaml  # plain text (TextDataModule)
    lightning-bridge fit --model_id meta-llama/Llama-3.2-1B-Instruct --strategy.tensor_model_parallel_size 2 \\
        --trainer.devices 8 --data.dataset train.jsonl --data.packing true \\
        --trainer.callbacks+=lightning_bridge.HFCheckpoint --trainer.callbacks.dirpath hf-checkpoints
    lightning-bridge fit --config fit.yaml --print_config                       # the full, resolved config
"""


def _resolve_model(model_id: str | None) -> str:
    """The model to train: ``model_id``, or the built-in tiny Llama (built once, no network)."""
    if model_id:
        return model_id
    from lightning_bridge.builtin import tiny_llama

    return str(tiny_llama())


# --- inspect ------------------------------------------------------------------------------------
def _inspect(model: str | None, as_json: bool = False) -> int:
    from lightning_bridge import AutoBridge

    if model is None:
        supported = {"supported_architectures": AutoBridge.list_supported_models(),
                     "bridges": AutoBridge.get_supported_bridges()}
        if as_json:
            print(json.dumps(supported, indent=2))
            return 0
        print("Supported architectures:")
        for architecture in supported["supported_architectures"]:
            print(f"  {architecture}")
        return 0
    report = inspect_checkpoint(model)
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{model}: {', '.join(report['architectures'])} -> {report['bridge']}")
    if report["megatron_checkpoint"]:
        saved = report["megatron_checkpoint"]
        layout = saved.get("written_with") or {}
        written = (f"TP={layout.get('tensor_model_parallel_size')} PP={layout.get('pipeline_model_parallel_size')} "
                   f"EP={layout.get('expert_model_parallel_size')} on {layout.get('world_size')} process(es)"
                   if layout else "an unknown layout")
        print(f"Megatron distributed checkpoint: {saved.get('params_dtype', '?')} parameters, written at {written}")
    print("\nTransformerConfig (fields the bridge sets, TP=PP=1):")
    for key, value in report["transformer_config"].items():
        print(f"  {key} = {value}")
    print("\nWeight mappings (Megatron <- HF; full shapes at TP=1):")
    for row in report["mappings"]:
        print(f"  {row['mapping']}")
        if row["count"]:
            hf = ", ".join(str(s) for s in row["hf_shapes"]) if row["hf_shapes"] else "not in the checkpoint"
            note = f"  tied to {row['tied_to']}" if row.get("tied_to") else ""
            print(f"      x{row['count']}  megatron {row['megatron_shape']}  hf {hf}  "
                  f"params {row['parameters']:,}{note}")
    if report["parameters"] is not None:
        print(f"\nParameters in the HF checkpoint: {report['parameters']:,}")
    return 0


def inspect_checkpoint(model: str) -> dict[str, Any]:
    """What ``inspect MODEL`` shows: the derived TransformerConfig, and per mapping its shapes and counts.

    Shapes and parameter counts come from the safetensors headers of a local checkpoint (no
    weights are read; a Hub id reports the config and mappings only). For a Megatron distributed
    checkpoint, the HF config saved in it and the layout it was written with.
    """
    from lightning_bridge import AutoBridge, dist_checkpoint
    from lightning_bridge.conversion.context import ConversionContext

    megatron = None
    if dist_checkpoint.is_megatron_checkpoint(model):
        bridge = dist_checkpoint.checkpoint_bridge(model)
        megatron = {k: v for k, v in dist_checkpoint.read_metadata(model).items() if k != "hf_tensors"}
    else:
        bridge = AutoBridge.from_hf_pretrained(model)
    provider = bridge.transformer_config
    reader = _local_reader(bridge) if Path(model).is_dir() else None
    registry = bridge.mapping_registry()
    ctx = ConversionContext.from_config(provider, provider.vocab_size, provider.padded_vocab_size)
    rows = []
    for mapping in registry.get_all_mappings():
        count = mapping.megatron.count("*")
        instances = [[str(v) for v in values] for values in
                     itertools.product(*(range(n) for n in bridge.model_bridge.wildcard_ranges()[:count]))]
        names = [mapping.hf_names(values) for values in instances]
        row: dict[str, Any] = {"mapping": str(mapping), "kind": mapping.kind, "megatron": mapping.megatron,
                               "hf": list(mapping.hf_patterns), "count": len(instances),
                               "hf_shapes": None, "megatron_shape": None, "parameters": 0}
        if mapping.megatron in registry.tied:
            row["tied_to"] = registry.tied[mapping.megatron]
        if reader is not None and names and all(n in reader for n in names[0]):
            shapes = [tuple(reader.shape(n)) for n in names[0]]
            row["hf_shapes"] = [list(s) for s in shapes]
            row["megatron_shape"] = _megatron_shape(mapping, shapes, ctx)
            row["parameters"] = sum(_numel(reader.shape(n)) for group in names for n in group if n in reader)
        rows.append(row)
    total = sum(_numel(reader.shape(n)) for n in reader.names()) if reader is not None else None
    return {
        "model": model,
        "architectures": list(bridge.hf_config.architectures or []),
        "bridge": type(bridge.model_bridge).__name__,
        "transformer_config": _changed_fields(provider),
        "mappings": rows,
        "parameters": total,
        "megatron_checkpoint": megatron,
    }


def _local_reader(bridge: Any) -> Any:
    """The checkpoint's safetensors reader, or None when it has no weights (a config-only folder)."""
    try:
        return bridge.checkpoint_reader()
    except (OSError, ValueError):
        return None


def _megatron_shape(mapping: Any, hf_shapes: list[tuple[int, ...]], ctx: Any) -> list[int] | None:
    import torch

    try:
        meta = [torch.empty(shape, device="meta") for shape in hf_shapes]
        return list(mapping.to_megatron(meta, ctx).shape)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):  # needs real values
        return None


def _numel(shape: Sequence[int]) -> int:
    return functools.reduce(lambda a, b: a * b, shape, 1)


def _changed_fields(provider: Any) -> dict[str, Any]:
    """The provider's fields that differ from TransformerConfig's defaults, JSON-friendly."""
    skip = {"layer_spec", "weight_loader", "model_hook", "init_method", "output_layer_init_method"}
    changed = {}
    for field in dataclasses.fields(provider):
        if field.name in skip or field.name.startswith("_"):
            continue
        value = getattr(provider, field.name)
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        try:
            same = value is default or (type(value) is type(default) and bool(value == default))
        except (RuntimeError, TypeError, ValueError):  # tensors and other values without a plain ==
            same = False
        if not same:
            changed[field.name] = _jsonable(value)
    return changed


def _jsonable(value: Any) -> Any:
    import torch

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, functools.partial):
        return getattr(value.func, "__name__", repr(value.func))
    if callable(value):
        return getattr(value, "__name__", type(value).__name__)
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
