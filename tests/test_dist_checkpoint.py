"""Model-only Megatron distributed checkpoints: atomic writes, the saved HF files, clear errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from factories import make_checkpoint
from megatron.core import parallel_state as ps

from lightning_bridge import AutoBridge, dist_checkpoint
from lightning_bridge.dist_checkpoint import (
    checkpoint_bridge,
    is_megatron_checkpoint,
    load_megatron_model,
    read_metadata,
    save_megatron_checkpoint,
)
from lightning_bridge.hf_io import HFCheckpointReader
from lightning_bridge.publish import CheckpointIOError


@pytest.fixture
def saved(tmp_path):
    """A tiny bfloat16 Qwen2 (q/k/v biases) saved as a Megatron checkpoint from one process."""
    source = make_checkpoint("qwen2", tmp_path / "hf", dtype=torch.bfloat16)
    bridge = AutoBridge.from_hf_pretrained(source)
    chunks = bridge.to_megatron_model(show_progress=False)
    path = save_megatron_checkpoint(chunks, bridge, tmp_path / "megatron")
    ps.destroy_model_parallel()
    return source, path


def test_save_writes_shards_config_and_metadata_then_loads_back_bitwise(saved, tmp_path):
    source, path = saved
    assert is_megatron_checkpoint(path) and (path / "hf_config" / "config.json").is_file()
    metadata = read_metadata(path)
    assert metadata["params_dtype"] == "bfloat16" and metadata["architectures"] == ["Qwen2ForCausalLM"]
    assert metadata["written_with"]["tensor_model_parallel_size"] == 1
    assert set(metadata["hf_tensors"].values()) == {"bfloat16"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    bridge, chunks = load_megatron_model(path)
    try:
        exported = dict(bridge.export_hf_weights(chunks))
    finally:
        ps.destroy_model_parallel()
    reader = HFCheckpointReader(source)
    assert sorted(exported) == sorted(reader.names())
    assert all(torch.equal(tensor, reader.get(name)) for name, tensor in exported.items())


def test_a_failed_save_leaves_neither_output_nor_temporary_folder(tmp_path, monkeypatch):
    source = make_checkpoint("llama", tmp_path / "hf")
    bridge = AutoBridge.from_hf_pretrained(source)
    chunks = bridge.to_megatron_model(show_progress=False)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(dist_checkpoint, "write_hf_metadata", disk_full)
    try:
        with pytest.raises(RuntimeError, match="Saving the Megatron checkpoint failed: OSError: No space left"):
            save_megatron_checkpoint(chunks, bridge, tmp_path / "out")
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        with pytest.raises(RuntimeError, match="already exists and is not empty. Pass --overwrite"):
            save_megatron_checkpoint(chunks, bridge, tmp_path / "full")
    finally:
        ps.destroy_model_parallel()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "hf"]


def test_a_checkpoint_without_hf_config_needs_one_and_accepts_it(saved):
    source, path = saved
    shutil.rmtree(path / "hf_config")
    with pytest.raises(ValueError, match=r"without hf_config/config.json, so the HF model it holds is unknown. "
                                         r"Pass the HF model it was trained from \(--hf-config"):
        checkpoint_bridge(path)
    bridge = checkpoint_bridge(path, hf_config=source)
    assert bridge.hf_config.architectures == ["Qwen2ForCausalLM"]


def test_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint_bridge(tmp_path / "missing")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a Megatron-Core distributed checkpoint .* It looks like a "
                                         "Hugging Face checkpoint"):
        checkpoint_bridge(tmp_path / "hf")


def test_model_key_prefix_reads_ours_and_the_strategys():
    ours = {"embedding.word_embeddings.weight": 0, "decoder.final_layernorm.weight": 0}
    strategy = {"module.embedding.word_embeddings.weight": 0, "module.decoder.layers.mlp.linear_fc1.weight": 0,
                "optimizer.distributed.dp_group_idx_0.param": 0}
    assert dist_checkpoint.model_key_prefix(ours) == ""
    assert dist_checkpoint.model_key_prefix(strategy) == "module."
    with pytest.raises(ValueError, match="Cannot find the model's tensors"):
        dist_checkpoint.model_key_prefix({"something.else": 0})


def test_torch_dtype_sets_the_built_models_dtype_and_the_export_keeps_the_sources(saved):
    """A bfloat16 checkpoint loaded in float32: float32 parameters (bf16 off); the HF export is still
    the source's bfloat16 tensors, bitwise."""
    source, path = saved
    bridge, chunks = load_megatron_model(path, torch_dtype=torch.float32)
    try:
        config = chunks[0].config
        assert (config.params_dtype, config.bf16, config.fp16) == (torch.float32, False, False)
        assert {p.dtype for p in chunks[0].parameters()} == {torch.float32}
        exported = dict(bridge.export_hf_weights(chunks))
    finally:
        ps.destroy_model_parallel()
    reader = HFCheckpointReader(source)
    assert all(tensor.dtype == torch.bfloat16 and torch.equal(tensor, reader.get(name))
               for name, tensor in exported.items())


@pytest.mark.parametrize("damage, why", [("truncate_shard", r"\(EOFError\)"),
                                         ("truncate_metadata", r"\(UnpicklingError: pickle data was truncated\)"),
                                         ("garble_megatron_metadata", r"\(JSONDecodeError: ")])
def test_a_corrupt_or_truncated_checkpoint_is_a_checkpoint_io_error(saved, damage, why):
    _, path = saved
    if damage == "truncate_shard":
        shard = sorted(path.glob("*.distcp"))[0]
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "truncate_metadata":
        (path / ".metadata").write_bytes((path / ".metadata").read_bytes()[:500])
    else:
        (path / "metadata.json").write_text("{garbage")
    try:
        with pytest.raises(CheckpointIOError, match=rf"The checkpoint {path} is corrupt or truncated {why}.*"
                                                    r"Copy it again .* or write it again"):
            load_megatron_model(path)
    finally:
        ps.destroy_model_parallel()


def test_a_full_disk_while_writing_shards_is_a_checkpoint_io_error(tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    source = make_checkpoint("llama", tmp_path / "hf")
    bridge = AutoBridge.from_hf_pretrained(source)
    chunks = bridge.to_megatron_model(show_progress=False)

    def worker_failure(*args, **kwargs):  # how torch's writer reports it, errno in the text
        raise RuntimeError("Worker failure: [Errno 28] No space left on device")

    monkeypatch.setattr(dist_checkpointing, "save", worker_failure)
    try:
        with pytest.raises(CheckpointIOError, match=rf"Could not write the Megatron checkpoint {tmp_path / 'out'}: "
                                                    r"no space left on device\. .*free disk space") as raised:
            save_megatron_checkpoint(chunks, bridge, tmp_path / "out")
    finally:
        ps.destroy_model_parallel()
    assert raised.value.errno == 28 and raised.value.path == str(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
