"""Tests for lightning_bridge.conversion.registry: lookups by either name, TE aliases, expected names."""

from __future__ import annotations

import pytest
import transformers
from factories import make_hf_config

from lightning_bridge.conversion.mappings import QKV, GatedMLP, Replicated, RowParallel, VocabParallel
from lightning_bridge.conversion.registry import MappingRegistry, canonical_megatron_name
from lightning_bridge.families.llama import LlamaBridge
from lightning_bridge.families.qwen2 import Qwen2Bridge


@pytest.fixture(scope="module")
def llama() -> MappingRegistry:
    return LlamaBridge(make_hf_config("llama")).mapping_registry()


def test_megatron_to_hf_lookup(llama):
    mapping, wildcards = llama.megatron_to_hf_lookup("decoder.layers.1.self_attention.linear_qkv.weight")
    assert isinstance(mapping, QKV) and wildcards == ("1",)
    assert mapping.hf_names(wildcards) == [
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
    ]
    mapping, wildcards = llama.megatron_to_hf_lookup("output_layer.weight")
    assert isinstance(mapping, VocabParallel) and wildcards == ()
    assert mapping.hf_names(()) == ["lm_head.weight"]


def test_hf_to_megatron_lookup(llama):
    mapping, wildcards = llama.hf_to_megatron_lookup("model.layers.0.mlp.up_proj.weight")
    assert isinstance(mapping, GatedMLP)
    assert mapping.megatron_name(wildcards) == "decoder.layers.0.mlp.linear_fc1.weight"
    mapping, wildcards = llama.hf_to_megatron_lookup("model.layers.1.self_attn.o_proj.weight")
    assert isinstance(mapping, RowParallel)
    assert mapping.megatron_name(wildcards) == "decoder.layers.1.self_attention.linear_proj.weight"
    mapping, wildcards = llama.hf_to_megatron_lookup("model.norm.weight")
    assert isinstance(mapping, Replicated)
    assert mapping.megatron_name(wildcards) == "decoder.final_layernorm.weight"


@pytest.mark.parametrize("lookup,name", [
    ("megatron_to_hf_lookup", "decoder.layers.0.self_attention.linear_qkv.bias"),  # llama has no qkv bias
    ("megatron_to_hf_lookup", "decoder.layers.0.self_attention.linear_qkv.weight.extra"),
    ("hf_to_megatron_lookup", "model.layers.0.self_attn.q_proj.bias"),
    ("hf_to_megatron_lookup", "model.rotary_emb.inv_freq"),
])
def test_unknown_names_give_none(llama, lookup, name):
    assert getattr(llama, lookup)(name) is None


def test_qwen2_adds_qkv_bias_lookups():
    registry = Qwen2Bridge(make_hf_config("qwen2")).mapping_registry()
    mapping, wildcards = registry.hf_to_megatron_lookup("model.layers.1.self_attn.k_proj.bias")
    assert mapping.megatron_name(wildcards) == "decoder.layers.1.self_attention.linear_qkv.bias"


@pytest.mark.parametrize("te_name,local_name", [
    ("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight",
     "decoder.layers.3.input_layernorm.weight"),
    ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "decoder.layers.0.pre_mlp_layernorm.weight"),
    ("decoder.layers.2.mlp.linear_fc1.layer_norm_bias", "decoder.layers.2.pre_mlp_layernorm.bias"),
    ("decoder.layers.2.mlp.linear_fc1.weight", "decoder.layers.2.mlp.linear_fc1.weight"),  # unchanged
])
def test_transformer_engine_names_are_translated(te_name, local_name):
    assert canonical_megatron_name(te_name) == local_name


def test_transformer_engine_layernorm_resolves_to_input_layernorm(llama):
    te_name = "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    mapping, wildcards = llama.megatron_to_hf_lookup(te_name)
    assert mapping.megatron == "decoder.layers.*.input_layernorm.weight" and wildcards == ("3",)
    assert mapping.hf_names(wildcards) == ["model.layers.3.input_layernorm.weight"]


def test_expected_hf_names_for_two_layers_are_the_transformers_state_dict(llama):
    config = make_hf_config("llama")
    model_names = set(transformers.LlamaForCausalLM(config).state_dict())
    expected = llama.expected_hf_names((2, 0))
    assert expected == model_names
    assert len(expected) == 2 + 9 * 2 + 1  # embeddings + lm_head, 9 per layer, final norm
    assert "model.layers.1.mlp.down_proj.weight" in expected
    assert "model.layers.2.mlp.down_proj.weight" not in expected


def test_expected_hf_names_skip_tied_output_layer():
    registry = LlamaBridge(make_hf_config("llama3.2")).mapping_registry()
    assert registry.tied == {"output_layer.weight": "embedding.word_embeddings.weight"}
    expected = registry.expected_hf_names((2, 0))
    assert "lm_head.weight" not in expected and "model.embed_tokens.weight" in expected
    assert len(expected) == 20


def test_get_all_mappings_is_a_copy_in_family_order(llama):
    mappings = llama.get_all_mappings()
    assert mappings[0].megatron == "embedding.word_embeddings.weight"
    assert mappings[-1].megatron == "output_layer.weight"
    mappings.clear()
    assert len(llama.get_all_mappings()) == 9


def test_repr_lists_every_mapping(llama):
    text = repr(llama)
    assert text.startswith("MappingRegistry(") and text.count(" <- ") == 9
    assert ("qkv: decoder.layers.*.self_attention.linear_qkv.weight <- "
            "model.layers.*.self_attn.q_proj.weight") in text


def test_expected_hf_names_follow_the_layers_of_each_mapping():
    registry = MappingRegistry([
        Replicated("decoder.layers.*.mlp.a", "model.layers.*.mlp.a", layers=frozenset({0})),
        Replicated("decoder.layers.*.mlp.experts.*.b", "model.layers.*.mlp.experts.*.b",
                   layers=frozenset({1, 2})),
    ])
    assert registry.expected_hf_names((3, 2)) == {
        "model.layers.0.mlp.a", "model.layers.1.mlp.experts.0.b", "model.layers.1.mlp.experts.1.b",
        "model.layers.2.mlp.experts.0.b", "model.layers.2.mlp.experts.1.b"}
