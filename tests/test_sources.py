"""Where a bridge's HF model comes from: an HF checkpoint (folder or Hub id), a Megatron checkpoint, a config."""

from __future__ import annotations

import json

import pytest
import torch
from factories import make_checkpoint, make_hf_config
from megatron.core import parallel_state as ps
from safetensors.torch import save_file
from transformers import GenerationConfig

from lightning_bridge import AutoBridge
from lightning_bridge.dist_checkpoint import checkpoint_bridge, save_megatron_checkpoint
from lightning_bridge.sources import (
    TOKENIZER_FILES,
    ConfigOnlySource,
    HFCheckpointSource,
    HFSource,
    MegatronCheckpointSource,
)


def test_a_config_only_source_has_nothing_to_read():
    source = ConfigOnlySource()
    assert not source.has_weights and source.name is None
    assert source.weight_map() is None and source.tensor_order() is None
    assert source.tensor_dtypes() == {} and source.tensor_names() == [] and source.metadata_files() == []
    with pytest.raises(ValueError, match="made from a config alone"):
        source.reader()
    config = make_hf_config("llama")
    assert source.generation_config(config).to_json_string() == GenerationConfig.from_model_config(config).to_json_string()


def test_a_checkpoint_source_reads_order_dtypes_and_metadata_files(tmp_path):
    folder = tmp_path / "hf"
    save_file({"b": torch.zeros(2, dtype=torch.float16)}, str(make_folder(folder) / "model-00002-of-00002.safetensors"))
    save_file({"a": torch.zeros(3), "c": torch.zeros(1, dtype=torch.bfloat16)},
              str(folder / "model-00001-of-00002.safetensors"))
    weight_map = {"b": "model-00002-of-00002.safetensors", "a": "model-00001-of-00002.safetensors",
                  "c": "model-00001-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "generation_config.json").write_text(json.dumps({"max_length": 7}))
    source = HFCheckpointSource(folder)
    assert source.has_weights and source.name == str(folder) and source.folder == folder
    assert source.tensor_order() == ["a", "c", "b"]  # the first shard's tensors first
    assert source.tensor_dtypes() == {"a": torch.float32, "b": torch.float16, "c": torch.bfloat16}
    assert sorted(source.tensor_names()) == ["a", "b", "c"] and source.weight_map() == weight_map
    assert source.metadata_files() == [folder / "tokenizer.json"]
    assert source.generation_config(make_hf_config("llama")).max_length == 7
    assert source.reader() is source.reader()  # validated once


def make_folder(folder):
    folder.mkdir(parents=True)
    return folder


def test_a_hub_id_is_downloaded_once_with_snapshot_download(tmp_path, monkeypatch):
    folder = make_checkpoint("llama", tmp_path / "snapshot" / "sub")
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    source = HFCheckpointSource("org/model", revision="v1", hub_kwargs={"subfolder": "sub", "token": "t"})
    assert source.folder == folder and source.folder == folder and "model.embed_tokens.weight" in source.tensor_names()
    assert calls == [("org/model", {"revision": "v1", "allow_patterns": ["sub/*"], "token": "t"})]


def test_a_megatron_checkpoint_source_answers_from_its_saved_files(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    source = MegatronCheckpointSource(tmp_path, {"lm_head.weight": "bfloat16", "x": "float32"})
    assert not source.has_weights and source.name is None and source.tensor_order() is None
    assert source.tensor_dtypes() == {"lm_head.weight": torch.bfloat16, "x": torch.float32}
    assert sorted(source.tensor_names()) == ["lm_head.weight", "x"]
    assert source.metadata_files() == [tmp_path / "tokenizer_config.json"]
    assert MegatronCheckpointSource(None).metadata_files() == []
    assert "tokenizer_config.json" in TOKENIZER_FILES


def test_bridges_hold_their_source(tmp_path):
    folder = make_checkpoint("qwen2", tmp_path / "hf", dtype=torch.bfloat16)
    bridge = AutoBridge.from_hf_pretrained(folder)
    assert isinstance(bridge.source, HFCheckpointSource) and bridge.source.name == str(folder)
    assert bridge.checkpoint_reader() is bridge.source.reader()
    assert isinstance(AutoBridge.from_hf_config(make_hf_config("llama")).source, ConfigOnlySource)
    chunks = bridge.to_megatron_model(show_progress=False)
    try:
        path = save_megatron_checkpoint(chunks, bridge, tmp_path / "megatron")
        restored = checkpoint_bridge(path)
        assert isinstance(restored.source, MegatronCheckpointSource) and isinstance(restored.source, HFSource)
        assert restored.source.tensor_dtypes() == bridge.source.tensor_dtypes()  # every tensor bfloat16, named
        exported = dict(restored.export_hf_weights(chunks))
        assert {name: t.dtype for name, t in exported.items()} == bridge.source.tensor_dtypes()
    finally:
        ps.destroy_model_parallel()
