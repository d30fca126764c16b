"""The shared family machinery: activations, dtypes, rope parameters, and a provider from the tables."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from factories import make_hf_config

from lightning_bridge.families.base import ModelBridge, gelu_tanh, hf_activation, hf_dtype, rope_parameters
from lightning_bridge.families.llama import LlamaBridge


def test_hf_activations_and_the_tanh_gelu():
    assert hf_activation(make_hf_config("llama", hidden_act="silu")) is F.silu
    assert hf_activation(make_hf_config("llama", hidden_act="gelu_pytorch_tanh")) is gelu_tanh
    x = torch.linspace(-3, 3, 7)
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))
    with pytest.raises(ValueError, match=r"hidden_act='tanh' is not supported; supported: \["):
        hf_activation(make_hf_config("llama", hidden_act="tanh"))


def test_hf_dtype_reads_a_name_or_a_dtype_and_defaults_to_float32():
    config = make_hf_config("llama")
    config.dtype = None
    assert hf_dtype(config) == torch.float32
    config.dtype = "bfloat16"
    assert hf_dtype(config) == torch.bfloat16
    config.dtype = torch.float16
    assert hf_dtype(config) == torch.float16


def test_rope_parameters_from_either_config_style():
    config = make_hf_config("llama")
    assert rope_parameters(config)["rope_theta"] == config.rope_parameters["rope_theta"]
    config.rope_parameters = None
    config.rope_theta, config.rope_scaling = 5.0, {"rope_type": "linear", "factor": 2.0}
    assert rope_parameters(config) == {"rope_theta": 5.0, "rope_type": "linear", "factor": 2.0}


def test_a_provider_from_the_tables_with_overrides_and_the_precision_rule():
    bridge = LlamaBridge(make_hf_config("llama"))
    provider = bridge.provider(params_dtype=torch.bfloat16, num_layers=1)
    assert provider.num_layers == 1 and provider.bf16 and not provider.fp16  # bf16 params: Megatron's bf16
    assert not bridge.provider(params_dtype=torch.bfloat16, bf16=False).bf16  # an explicit flag wins
    assert not provider.bias_activation_fusion and not provider.apply_rope_fusion  # unfused kernels
    assert bridge.wildcard_ranges() == (2, 0)


def test_a_family_without_a_weight_table_says_so():
    with pytest.raises(NotImplementedError):
        ModelBridge(make_hf_config("llama")).mappings()
