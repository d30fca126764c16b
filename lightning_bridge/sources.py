"""Where a bridge's Hugging Face model comes from: an HF checkpoint, a saved Megatron checkpoint, or a config alone.

A source answers what an export back to HF needs to know about the original checkpoint, so a saved
model mirrors it: its tensors (read lazily), their order and per-name dtypes, which tied tensors it
stores anyway, its shard map, and the files written back beside the weights (generation config,
tokenizer files)::

    source = HFCheckpointSource("meta-llama/Llama-3.2-1B")   # a folder or a Hub id
    source.tensor_order()[:2], source.tensor_dtypes()["lm_head.weight"]

``AutoBridge`` holds one as ``bridge.source``: ``from_hf_pretrained`` makes an
:class:`HFCheckpointSource`, ``from_hf_config`` a :class:`ConfigOnlySource`, and
``dist_checkpoint.checkpoint_bridge`` a :class:`MegatronCheckpointSource`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PretrainedConfig

from lightning_bridge.hf_io import HFCheckpointReader

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


class HFSource:
    """What a bridge knows about its HF model's original checkpoint (the base: nothing beyond the config)."""

    name: str | None = None  # the HF folder or Hub id the weights come from; None when none

    @property
    def has_weights(self) -> bool:
        """Whether the source holds HF weights a model can be loaded from."""
        return False

    def reader(self) -> HFCheckpointReader:
        """The validated safetensors reader of the source's weights."""
        raise ValueError("This bridge was made from a config alone: it has no HF weights to read.")

    def weight_map(self) -> dict[str, str] | None:
        """The source's tensor -> file map (saves mirror its sharding); None without weights."""
        return None

    def tensor_order(self) -> list[str] | None:
        """The source's tensor names shard by shard (each shard completes in turn); None when unknown."""
        return None

    def tensor_dtypes(self) -> dict[str, torch.dtype]:
        """The dtype of each tensor the source stores ({} when unknown)."""
        return {}

    def tensor_names(self) -> list[str]:
        """The names of the tensors the source stores (what tied parameters it keeps is read from it)."""
        return sorted(self.tensor_dtypes())

    def generation_config(self, hf_config: PretrainedConfig) -> GenerationConfig | None:
        """The source's ``generation_config.json``, else the one transformers derives from ``hf_config``."""
        return GenerationConfig.from_model_config(hf_config)

    def metadata_files(self) -> list[Path]:
        """Files written back beside the weights as they are (the tokenizer's)."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ConfigOnlySource(HFSource):
    """No checkpoint: a bridge made from a config alone (models it builds are randomly initialised)."""


class HFCheckpointSource(HFSource):
    """A local HF checkpoint folder or a Hub id (downloaded with ``huggingface_hub.snapshot_download``
    the first time its files are needed)."""

    def __init__(self, path_or_id: str | os.PathLike, *, revision: str | None = None, allow_pickle: bool = False,
                 hub_kwargs: Mapping[str, Any] | None = None):
        self.name = str(path_or_id)
        self.revision = revision
        self.allow_pickle = allow_pickle
        self.hub_kwargs = dict(hub_kwargs or {})
        self._folder: Path | None = None
        self._reader: HFCheckpointReader | None = None

    @property
    def has_weights(self) -> bool:
        return True

    @property
    def folder(self) -> Path:
        """The local folder of the checkpoint (downloaded once when a Hub id)."""
        if self._folder is None:
            hub_kwargs = dict(self.hub_kwargs)
            subfolder = hub_kwargs.pop("subfolder", None) or ""
            if Path(self.name).is_dir():
                self._folder = Path(self.name) / subfolder
            else:
                from huggingface_hub import snapshot_download

                patterns = [f"{subfolder}/*"] if subfolder else None
                self._folder = Path(snapshot_download(self.name, revision=self.revision, allow_patterns=patterns,
                                                      **hub_kwargs)) / subfolder
        return self._folder

    def reader(self) -> HFCheckpointReader:
        if self._reader is None:
            self._reader = HFCheckpointReader(self.folder, allow_pickle=self.allow_pickle)
        return self._reader

    def weight_map(self) -> dict[str, str] | None:
        return self.reader().weight_map

    def tensor_order(self) -> list[str] | None:
        reader = self.reader()
        files = sorted(set(reader.weight_map.values()))
        return sorted(reader.names(), key=lambda name: files.index(reader.weight_map[name]))

    def tensor_dtypes(self) -> dict[str, torch.dtype]:
        reader = self.reader()
        return {name: reader.dtype(name) for name in reader.names()}

    def tensor_names(self) -> list[str]:
        return list(self.reader().names())

    def generation_config(self, hf_config: PretrainedConfig) -> GenerationConfig | None:
        try:
            return GenerationConfig.from_pretrained(self.folder)
        except OSError:
            return super().generation_config(hf_config)

    def metadata_files(self) -> list[Path]:
        return [self.folder / name for name in TOKENIZER_FILES if (self.folder / name).is_file()]


class MegatronCheckpointSource(HFSource):
    """A saved Megatron distributed checkpoint: the HF files saved in it (``hf_config/``) and the
    original checkpoint's tensor names and dtypes (its ``lightning_bridge.json``), no HF weights."""

    def __init__(self, files_dir: str | os.PathLike | None, hf_tensors: Mapping[str, str] | None = None):
        self.files_dir = Path(files_dir) if files_dir is not None else None
        self.hf_tensors: dict[str, str] = dict(hf_tensors or {})  # HF name -> dtype name ("bfloat16")

    def tensor_dtypes(self) -> dict[str, torch.dtype]:
        return {name: getattr(torch, value) for name, value in self.hf_tensors.items()}

    def tensor_names(self) -> list[str]:
        return list(self.hf_tensors)

    def generation_config(self, hf_config: PretrainedConfig) -> GenerationConfig | None:
        if self.files_dir is not None and (self.files_dir / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(self.files_dir)
        return super().generation_config(hf_config)

    def metadata_files(self) -> list[Path]:
        if self.files_dir is None:
            return []
        return [self.files_dir / name for name in TOKENIZER_FILES if (self.files_dir / name).is_file()]

    def __repr__(self) -> str:
        return f"MegatronCheckpointSource({str(self.files_dir) if self.files_dir else None!r})"
