"""Tests for lightning_bridge.conversion.loading: checkpoint name checks and tensor-by-tensor loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import make_checkpoint
from safetensors.torch import load_file, save_file

from lightning_bridge import AutoBridge
from lightning_bridge.conversion.context import ConversionContext
from lightning_bridge.conversion.loading import check_checkpoint_names, load_hf_weights
from lightning_bridge.conversion.parallel import global_named_parameters, global_named_weights
from lightning_bridge.conversion.registry import MappingRegistry
from lightning_bridge.hf_io import HFCheckpointReader


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_checkpoint("llama", tmp_path_factory.mktemp("loading") / "llama")


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    return make_checkpoint("llama3.2", tmp_path_factory.mktemp("loading") / "tied")


def with_tensors(folder: Path, tmp_path: Path, change) -> HFCheckpointReader:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    (tmp_path / "ckpt").mkdir()
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors")
    return HFCheckpointReader(tmp_path / "ckpt")


def check(folder_or_reader, bridge: AutoBridge) -> None:
    reader = folder_or_reader
    if not isinstance(reader, HFCheckpointReader):
        reader = HFCheckpointReader(reader)
    model_bridge = bridge.model_bridge
    registry = model_bridge.mapping_registry()
    check_checkpoint_names(reader, registry, registry.expected_hf_names(model_bridge.wildcard_ranges()),
                           model_bridge.ignored_hf_patterns)


# --- check_checkpoint_names -----------------------------------------------------------------------------
def test_a_matching_checkpoint_passes(llama, tied):
    check(llama, AutoBridge.from_hf_pretrained(llama))
    check(tied, AutoBridge.from_hf_pretrained(tied))


def test_rotary_caches_are_ignored(llama, tmp_path):
    cache = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    reader = with_tensors(llama, tmp_path, lambda t: t.update(cache))
    check(reader, AutoBridge.from_hf_pretrained(llama))


def test_tied_checkpoint_may_store_lm_head_too(tied, tmp_path):
    def add_lm_head(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()

    reader = with_tensors(tied, tmp_path, add_lm_head)
    check(reader, AutoBridge.from_hf_pretrained(tied))


def test_untied_checkpoint_without_lm_head_is_missing_it(llama, tmp_path):
    reader = with_tensors(llama, tmp_path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \[lm_head\.weight\] \(1 in all\).*"
                                         r"tie_word_embeddings"):
        check(reader, AutoBridge.from_hf_pretrained(llama))


def test_missing_and_unexpected_are_reported_together(llama, tmp_path):
    def change(tensors):
        tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
        del tensors["model.norm.weight"]

    reader = with_tensors(llama, tmp_path, change)
    with pytest.raises(ValueError, match=r"missing tensors \[model\.norm\.weight\] \(1 in all\); "
                                         r"unexpected tensors \[model\.layers\.0\.self_attn\.q_proj\.bias\] "
                                         r"\(1 in all\).*attention_bias"):
        check(reader, AutoBridge.from_hf_pretrained(llama))


def test_long_name_lists_are_shortened(llama, tmp_path):
    def drop_layer_1(tensors):
        for name in [n for n in tensors if n.startswith("model.layers.1.")]:
            del tensors[name]

    reader = with_tensors(llama, tmp_path, drop_layer_1)
    layer_1 = r"model\.layers\.1\.[\w.]+"
    shortened = rf"missing tensors \[({layer_1}, ){{7}}{layer_1}, \.\.\.\] \(9 in all\)"  # 8 shown
    with pytest.raises(ValueError, match=shortened):
        check(reader, AutoBridge.from_hf_pretrained(llama))


# --- load_hf_weights --------------------------------------------------------------------------------------
def test_loads_every_parameter_and_only_reads_what_it_needs(llama):
    bridge = AutoBridge.from_hf_pretrained(llama)
    provider = bridge.to_megatron_provider()
    chunks = provider(load_weights=False)
    reader = HFCheckpointReader(llama)
    read = []

    class Recording:  # the real reader, remembering which names were read
        def names(self):
            return reader.names()

        def __contains__(self, name):
            return name in reader

        def shape(self, name):
            return reader.shape(name)

        def get(self, name, device="cpu"):
            read.append(name)
            return reader.get(name, device)

    ctx = ConversionContext.from_config(provider, provider.vocab_size, provider.padded_vocab_size)
    load_hf_weights(chunks, Recording(), bridge.mapping_registry(), ctx)
    assert sorted(read) == sorted(reader.names()) and len(read) == len(set(read))
    assert torch.equal(dict(global_named_parameters(chunks[0]))["embedding.word_embeddings.weight"][:96],
                       reader.get("model.embed_tokens.weight"))

    class WrongShape(Recording):  # the header disagrees with the config: nothing is read at all
        def shape(self, name):
            return (7, 7) if name == "model.layers.1.mlp.down_proj.weight" else reader.shape(name)

    read.clear()
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.weight: checkpoint \(7, 7\)"):
        load_hf_weights(chunks, WrongShape(), bridge.mapping_registry(), ctx)
    assert read == []
    params = dict(global_named_parameters(chunks[0]))
    assert torch.equal(params["decoder.final_layernorm.weight"], reader.get("model.norm.weight"))


def test_tied_output_layer_is_loaded_from_the_embedding(tied):
    chunks = AutoBridge.from_hf_pretrained(tied).to_megatron_model()
    model = chunks[0]
    assert model.share_embeddings_and_output_weights
    embedding = HFCheckpointReader(tied).get("model.embed_tokens.weight")
    assert torch.equal(model.shared_embedding_or_output_weight()[:96], embedding)


def test_a_parameter_without_mapping_is_reported(llama):
    bridge = AutoBridge.from_hf_pretrained(llama)
    provider = bridge.to_megatron_provider()
    chunks = provider(load_weights=False)
    partial = MappingRegistry([m for m in bridge.mapping_registry().get_all_mappings()
                               if m.megatron != "decoder.final_layernorm.weight"])
    ctx = ConversionContext.from_config(provider, provider.vocab_size, provider.padded_vocab_size)
    with pytest.raises(ValueError, match=r"No weight mapping for Megatron parameter "
                                         r"'decoder\.final_layernorm\.weight'.*Please report it"):
        load_hf_weights(chunks, HFCheckpointReader(llama), partial, ctx)


def test_a_mapping_that_converts_to_another_shape_is_refused_not_broadcast(llama):
    from lightning_bridge.conversion.mappings import Replicated

    class OneValue(Replicated):  # copy_ would broadcast its one value over the whole parameter
        def to_megatron(self, hf_tensors, ctx):
            return hf_tensors[0][:1]

    bridge = AutoBridge.from_hf_pretrained(llama)
    provider = bridge.to_megatron_provider()
    chunks = provider(load_weights=False)
    norm = "decoder.final_layernorm.weight"
    broken = MappingRegistry([OneValue(m.megatron, m.hf) if m.megatron == norm else m
                              for m in bridge.mapping_registry().get_all_mappings()])
    ctx = ConversionContext.from_config(provider, provider.vocab_size, provider.padded_vocab_size)
    with pytest.raises(ValueError, match=r"Loading Megatron parameter 'decoder\.final_layernorm\.weight' "
                                         r"from model\.norm\.weight: the converted tensor has shape \(1,\) "
                                         r"but the Megatron parameter has \(64,\).*Please report it"):
        load_hf_weights(chunks, HFCheckpointReader(llama), broken, ctx)


def test_every_tensor_read_is_released_once_copied(llama):
    bridge = AutoBridge.from_hf_pretrained(llama)
    provider = bridge.to_megatron_provider()
    chunks = provider(load_weights=False)
    reader = HFCheckpointReader(llama)
    events = []

    class Releasing(HFCheckpointReader):  # the real reader, remembering reads and releases in order
        def get(self, name, device="cpu"):
            events.append(("read", name))
            return super().get(name, device)

        def release(self, name):
            events.append(("released", name))
            super().release(name)

    ctx = ConversionContext.from_config(provider, provider.vocab_size, provider.padded_vocab_size)
    load_hf_weights(chunks, Releasing(llama), bridge.mapping_registry(), ctx)
    read = [name for event, name in events if event == "read"]
    released = [name for event, name in events if event == "released"]
    assert sorted(read) == sorted(released) == sorted(reader.names())
    # each released after it was read (and copied)
    assert all(events.index(("read", name)) < events.index(("released", name)) for name in read)


def test_persistent_buffers_are_weights_and_named_globally(tmp_path):
    """A router's expert bias is a buffer Megatron saves: conversion loads and exports it like a parameter."""
    source = make_checkpoint("glm4-moe", tmp_path / "glm")
    (chunk,) = AutoBridge.from_hf_pretrained(source).to_megatron_model(show_progress=False)
    weights = dict(global_named_weights(chunk))
    parameters = dict(global_named_parameters(chunk))
    expert_biases = [f"decoder.layers.{i}.mlp.router.expert_bias" for i in (1, 2, 3)]
    assert sorted(set(weights) - set(parameters)) == expert_biases
    assert torch.equal(weights["decoder.layers.1.mlp.router.expert_bias"],
                       HFCheckpointReader(source).get("model.layers.1.mlp.gate.e_score_correction_bias"))
