"""Llama as tables: the config fields it maps, the biases it refuses, the tensors its weight table names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from factories import make_checkpoint, make_hf_config

from lightning_bridge import AutoBridge
from lightning_bridge.families.llama import LlamaBridge
from lightning_bridge.hf_io import HFCheckpointReader


def test_the_config_table_gives_the_provider_its_fields():
    config = make_hf_config("llama", head_dim=32, initializer_range=0.05)
    provider = AutoBridge.from_hf_config(config).transformer_config
    assert isinstance(AutoBridge.from_hf_config(config).model_bridge, LlamaBridge)
    assert (provider.num_layers, provider.hidden_size, provider.ffn_hidden_size) == (2, 64, 128)
    assert (provider.num_attention_heads, provider.num_query_groups, provider.kv_channels) == (4, 2, 32)
    assert (provider.layernorm_epsilon, provider.seq_length, provider.vocab_size) == (1e-6, 128, 96)
    assert provider.init_method_std == 0.05 and provider.activation_func is F.silu
    assert (provider.normalization, provider.gated_linear_unit, provider.add_bias_linear) == ("RMSNorm", True, False)
    assert provider.position_embedding_type == "rope" and not provider.share_embeddings_and_output_weights


@pytest.mark.parametrize("flag", ["attention_bias", "mlp_bias"])
def test_biases_are_refused_by_name(flag):
    with pytest.raises(ValueError, match=rf"LlamaConfig with {flag}=True is not supported"):
        AutoBridge.from_hf_config(make_hf_config("llama", **{flag: True}))


@pytest.mark.parametrize("family", ["llama", "llama3.2"])
def test_the_weight_table_names_exactly_the_checkpoints_tensors(family, tmp_path):
    folder = make_checkpoint(family, tmp_path / family)
    bridge = AutoBridge.from_hf_pretrained(folder)
    expected = bridge.mapping_registry().expected_hf_names(bridge.model_bridge.wildcard_ranges())
    stored = set(HFCheckpointReader(folder).names())
    tied = bridge.hf_config.tie_word_embeddings
    assert expected == stored and ("lm_head.weight" in stored) is not tied  # tied: the head is the embedding
    assert bridge.mapping_registry().tied == ({"output_layer.weight": "embedding.word_embeddings.weight"} if tied else {})
    assert torch.float32 == bridge.transformer_config.params_dtype
