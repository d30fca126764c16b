"""Model-only Megatron-Core distributed checkpoints (``torch_dist``), and how to convert them back to HF.

A checkpoint folder holds Megatron's sharded tensors under ``{"state_dict": {"model": ...}}`` (the
layout ``MegatronBridgeStrategy`` writes for Lightning checkpoints, optimizer left out), plus what a
conversion back to Hugging Face needs, so the folder alone is enough:

- ``hf_config/``: the source's ``config.json``, ``generation_config.json`` and tokenizer files;
- ``lightning_bridge.json``: the layout it was written with, the parameter dtype and the source's
  HF tensor names and dtypes (so the export writes the same tensors in the same dtypes).

Distributed checkpoints are layout independent: one written at TP=2 loads at TP=1 or PP=2 (Megatron
re-slices each tensor, and re-pads the vocabulary rows when the padded size differs)::

    save_megatron_checkpoint(chunks, bridge, "llama-megatron")          # every rank calls it
    chunks = load_megatron_model("llama-megatron", tensor_model_parallel_size=1)
    checkpoint_bridge("llama-megatron").save_hf_pretrained(chunks, "llama-hf")
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import shutil
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoConfig, PretrainedConfig

from lightning_bridge.bridge import AutoBridge
from lightning_bridge.conversion.parallel import unwrap
from lightning_bridge.provider import GPTModelProvider
from lightning_bridge.publish import (
    CheckpointIOError,
    broadcast,
    corrupt_checkpoint,
    error_code,
    make_staging_folder,
    publish_folder,
    rank,
    run_on_rank_zero,
    save_fault,
)
from lightning_bridge.sources import MegatronCheckpointSource

logger = logging.getLogger(__name__)

METADATA_FILE = "lightning_bridge.json"
HF_CONFIG_DIR = "hf_config"
FORMAT = "lightning-bridge/megatron-dist-checkpoint"
_MEGATRON_METADATA = "metadata.json"  # written by megatron.core.dist_checkpointing


# --- the model state ----------------------------------------------------------------------------
def sharded_model_state_dict(chunks: Sequence[torch.nn.Module], prefix: str | None = None) -> dict[str, Any]:
    """This rank's model chunks as Megatron ``ShardedTensor``s, keyed ``model`` (or ``model<i>`` per
    virtual pipeline stage), the keys ``MegatronBridgeStrategy`` uses in its checkpoints.

    With ``prefix=None`` the tensor keys are the chunks' own (Megatron's DDP wrapper adds
    ``module.``); with a string, they are the bare GPTModel's keys after ``prefix``.
    """
    state: dict[str, Any] = {}
    for index, chunk in enumerate(chunks):
        shards = chunk.sharded_state_dict() if prefix is None else unwrap(chunk).sharded_state_dict(prefix=prefix)
        state["model" if len(chunks) == 1 else f"model{index}"] = shards
    return state


def restore_model_chunks(chunks: Sequence[torch.nn.Module], loaded: dict[str, Any]) -> None:
    """Copy a loaded ``sharded_model_state_dict`` into the chunks, in place."""
    for index, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{index}"
        unwrap(chunk).load_state_dict(_strip_wrapper_prefix(loaded[key]))


def is_megatron_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Megatron-Core distributed checkpoint folder."""
    return (Path(path) / _MEGATRON_METADATA).is_file()


# --- saving -------------------------------------------------------------------------------------
def save_megatron_checkpoint(chunks: Sequence[torch.nn.Module], bridge: AutoBridge, path: str | os.PathLike,
                             *, overwrite: bool = False) -> Path:
    """Write the model chunks as a ``torch_dist`` checkpoint with the files to convert it back.

    Collective: every rank calls it. The folder is written under a temporary name and renamed when
    complete, so a crash never leaves a folder that looks like a checkpoint. An existing non-empty
    ``path`` is refused unless ``overwrite=True``.
    """
    from megatron.core import dist_checkpointing

    final = Path(broadcast(str(Path(path).absolute())))
    staging = make_staging_folder(final, check=lambda: check_output_folder(final, overwrite))

    def finish() -> None:
        write_hf_metadata(bridge, staging, _provider_of(chunks))
        publish_folder(staging, final)

    try:
        try:
            dist_checkpointing.save({"state_dict": sharded_model_state_dict(chunks, prefix="")}, str(staging))
        except BaseException as exc:  # torch's CheckpointException is not an Exception
            fault = save_fault(exc, final, f"write the Megatron checkpoint {final}", probe=staging)
            if fault is None:
                raise
            raise fault from exc
        run_on_rank_zero(finish, target=final)
    except BaseException:
        if rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Saved a Megatron distributed checkpoint to %s", final)
    return final


def write_hf_metadata(bridge: AutoBridge, folder: str | os.PathLike,
                      provider: GPTModelProvider | None = None) -> None:
    """Write ``hf_config/`` and ``lightning_bridge.json`` into ``folder`` (one rank calls it).

    ``MegatronBridgeStrategy`` calls it for its checkpoints too, so they convert back without flags.
    """
    folder = Path(folder)
    hf_dir = folder / HF_CONFIG_DIR
    hf_dir.mkdir(parents=True, exist_ok=True)
    texts, copy_files = bridge.hf_metadata_files()  # config.json, generation_config.json; tokenizer files
    for name, text in texts.items():
        (hf_dir / name).write_text(text)
    for file in copy_files:
        shutil.copy2(file, hf_dir / file.name)
    hf_tensors = {name: str(dtype).removeprefix("torch.") for name, dtype in sorted(bridge.source.tensor_dtypes().items())}
    metadata: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "architectures": list(bridge.hf_config.architectures or []),
        "hf_source": bridge.source.name,
        "hf_tensors": hf_tensors,
    }
    if provider is not None:
        metadata["params_dtype"] = str(provider.params_dtype).removeprefix("torch.")
        metadata["written_with"] = {
            "tensor_model_parallel_size": provider.tensor_model_parallel_size,
            "pipeline_model_parallel_size": provider.pipeline_model_parallel_size,
            "virtual_pipeline_model_parallel_size": provider.virtual_pipeline_model_parallel_size,
            "expert_model_parallel_size": provider.expert_model_parallel_size,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        }
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def check_output_folder(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an existing non-empty output unless ``overwrite`` (an empty folder is fine)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"The output {path} exists and is a file. Choose another output folder.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"The output folder {path} already exists and is not empty. Pass --overwrite "
                              "(overwrite=True) to replace it, or choose another folder.")


# --- loading ------------------------------------------------------------------------------------
def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``lightning_bridge.json`` ({} for a checkpoint written without one)."""
    file = Path(path) / METADATA_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def checkpoint_bridge(path: str | os.PathLike, hf_config: str | os.PathLike | PretrainedConfig | None = None,
                      torch_dtype: torch.dtype | str | None = None) -> AutoBridge:
    """The bridge of a Megatron checkpoint, from the HF config saved in it (or ``hf_config``).

    Its ``save_hf_pretrained`` writes the saved source's tensors in their dtypes, with its
    ``generation_config.json`` and tokenizer files.
    """
    path = Path(path)
    check_megatron_checkpoint(path)
    hf_dir = path / HF_CONFIG_DIR
    if hf_config is None:
        if not (hf_dir / "config.json").is_file():
            raise ValueError(
                f"{path} is a Megatron distributed checkpoint without {HF_CONFIG_DIR}/config.json, so the HF model "
                "it holds is unknown. Pass the HF model it was trained from (--hf-config PATH_OR_ID, "
                "hf_config=...): its config.json must describe the same model."
            )
        hf_config = hf_dir
    config = hf_config if isinstance(hf_config, PretrainedConfig) else AutoConfig.from_pretrained(str(hf_config))
    files_dir = hf_dir if hf_dir.is_dir() else (Path(hf_config) if isinstance(hf_config, (str, Path)) else None)
    source = MegatronCheckpointSource(files_dir, read_metadata(path).get("hf_tensors"))
    return AutoBridge(config, source=source, torch_dtype=torch_dtype)


def check_megatron_checkpoint(path: str | os.PathLike) -> None:
    """Raise a clear error when ``path`` is missing or not a Megatron distributed checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"The checkpoint {path} does not exist. Check the path.")
    if not is_megatron_checkpoint(path):
        hint = (" It looks like a Hugging Face checkpoint: convert it with `convert hf-to-megatron`."
                if (path / "config.json").is_file() else "")
        raise ValueError(
            f"{path} is not a Megatron-Core distributed checkpoint (no {_MEGATRON_METADATA}). Pass a folder "
            f"written by `lightning-bridge convert hf-to-megatron` or by MegatronBridgeStrategy's checkpoints.{hint}"
        )


def load_megatron_model(path: str | os.PathLike, *, tensor_model_parallel_size: int = 1,
                        pipeline_model_parallel_size: int = 1, expert_model_parallel_size: int = 1,
                        hf_config: str | os.PathLike | PretrainedConfig | None = None,
                        torch_dtype: torch.dtype | str | None = None) -> tuple[AutoBridge, list[torch.nn.Module]]:
    """Build this rank's model chunks at the given layout and load the checkpoint's weights into them.

    Collective. ``torch_dtype`` defaults to the dtype the checkpoint was written in.
    """
    bridge = checkpoint_bridge(path, hf_config, torch_dtype=torch_dtype or read_metadata(path).get("params_dtype"))
    provider = bridge.to_megatron_provider(load_weights=False)  # params_dtype, bf16, fp16 from torch_dtype
    provider.tensor_model_parallel_size = tensor_model_parallel_size
    provider.pipeline_model_parallel_size = pipeline_model_parallel_size
    provider.expert_model_parallel_size = expert_model_parallel_size
    provider.weight_loader = lambda chunks, _: load_model_weights(chunks, path)
    return bridge, provider(wrap_with_ddp=False)


def load_model_weights(chunks: Sequence[torch.nn.Module], path: str | os.PathLike) -> None:
    """Load a checkpoint's model weights into already built chunks (any layout; optimizer ignored)."""
    from megatron.core import dist_checkpointing

    check_megatron_checkpoint(path)
    with warnings.catch_warnings(), _read_faults(path):  # megatron-core 0.16's own use of deprecated torch APIs
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*ShardedTensor.*")
        prefix = model_key_prefix(dist_checkpointing.load_tensors_metadata(str(path)))
        template = {"state_dict": sharded_model_state_dict(list(chunks), prefix=prefix)}
        loaded = dist_checkpointing.load(template, str(path))
    restore_model_chunks(list(chunks), loaded["state_dict"])


# --- helpers ------------------------------------------------------------------------------------
_CORRUPT = (EOFError, pickle.UnpicklingError, json.JSONDecodeError, UnicodeDecodeError, zipfile.BadZipFile)


def _corruption(exc: BaseException | None, depth: int = 0) -> BaseException | None:
    """The error that says a file is corrupt or truncated, in ``exc``, its causes, or the per-rank
    failures torch's ``CheckpointException`` carries; None when the fault is something else."""
    if isinstance(exc, tuple):  # torch wraps each rank's failure as (exception, stack summary)
        exc = exc[0] if exc else None
    if not isinstance(exc, BaseException) or depth > 8:
        return None
    if isinstance(exc, _CORRUPT) or "PytorchStreamReader failed" in str(exc):
        return exc
    inner = [exc.__cause__, exc.__context__, *(getattr(exc, "failures", None) or {}).values()]
    return next((found for e in inner if (found := _corruption(e, depth + 1)) is not None), None)


@contextlib.contextmanager
def _read_faults(path: Path) -> Iterator[None]:
    """Raise a corrupt or truncated checkpoint, or one this user may not read, as a CheckpointIOError."""
    try:
        yield
    except BaseException as exc:
        if (found := _corruption(exc)) is not None:
            why = f"{type(found).__name__}: {found}".rstrip(": ")
            raise corrupt_checkpoint(path, why, "Copy it again if it came from elsewhere, or write it again "
                                                "(convert hf-to-megatron, or the training run's checkpoint).") from exc
        if error_code(exc) in (errno.EACCES, errno.EPERM):
            raise CheckpointIOError(errno.EACCES, f"Could not read the checkpoint {path}: permission denied. "
                                                  "Make its files readable for this user.", path) from exc
        raise


def _strip_wrapper_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """Keys of a DDP / Float16Module state dict, as the bare GPTModel names them."""
    stripped = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module."):]
        stripped[key] = value
    return stripped


def model_key_prefix(tensors: dict[str, Any]) -> str:
    """What precedes the GPTModel's own tensor keys in a checkpoint: "" for ours, "module." for the
    strategy's (written through Megatron's DDP wrapper)."""
    prefixes = {key[: key.index(anchor)] for key in tensors if not key.startswith("optimizer")
                for anchor in ("decoder.", "embedding.") if anchor in key}
    if len(prefixes) != 1:
        raise ValueError(f"Cannot find the model's tensors in this checkpoint (key prefixes {sorted(prefixes)}). "
                         "Is it a GPT model checkpoint written by lightning-bridge or Megatron-Core?")
    return prefixes.pop()


def _provider_of(chunks: Sequence[torch.nn.Module]) -> GPTModelProvider | None:
    config = getattr(unwrap(chunks[0]), "config", None)
    return config if isinstance(config, GPTModelProvider) else None
