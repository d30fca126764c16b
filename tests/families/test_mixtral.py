"""Mixtral: config and routing carried over exactly, experts as Megatron's SequentialMLP, refusals.

Logits against transformers and the bitwise round trip of the factory's Mixtral run in
test_families.py; expert parallelism in test_moe_parallel.py.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from factories import make_checkpoint, make_hf_config

from lightning_bridge import AutoBridge
from lightning_bridge.conversion.parallel import global_named_parameters
from lightning_bridge.verify import megatron_logits, relative_difference, transformers_logits


def test_config_maps_experts_router_and_aux_loss():
    provider = AutoBridge.from_hf_config(make_hf_config("mixtral", router_aux_loss_coef=0.02)).to_megatron_provider()
    assert (provider.num_moe_experts, provider.moe_router_topk, provider.moe_ffn_hidden_size) == (4, 2, 32)
    assert provider.moe_router_score_function == "softmax" and provider.moe_router_pre_softmax is False
    assert provider.moe_router_topk_scaling_factor is None and provider.moe_aux_loss_coeff == 0.02
    assert provider.moe_token_dispatcher_type == "allgather" and provider.moe_grouped_gemm is False


def test_experts_are_sequential_mlps_with_gated_fc1():
    (model,) = AutoBridge.from_hf_config(make_hf_config("mixtral")).to_megatron_model()
    shapes = {name: tuple(p.shape) for name, p in global_named_parameters(model) if "layers.0.mlp" in name}
    expected = {"decoder.layers.0.mlp.router.weight": (4, 64)}
    for expert in range(4):
        expected[f"decoder.layers.0.mlp.experts.local_experts.{expert}.linear_fc1.weight"] = (64, 64)  # [gate; up]
        expected[f"decoder.layers.0.mlp.experts.local_experts.{expert}.linear_fc2.weight"] = (64, 32)
    assert shapes == expected


def test_renormalised_top_k_routing_is_what_makes_logits_match(tmp_path):
    """Softmax after the top-k (renormalised weights) matches; softmax before it measurably does not."""
    folder = make_checkpoint("mixtral", tmp_path / "m")
    input_ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = transformers_logits(transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), input_ids)
    provider = AutoBridge.from_hf_pretrained(folder).to_megatron_provider(show_progress=False)
    assert relative_difference(megatron_logits(provider(), input_ids), reference) <= 1e-5
    provider.moe_router_pre_softmax = True
    assert relative_difference(megatron_logits(provider(), input_ids), reference) > 1e-4


@pytest.mark.parametrize("overrides,message", [
    ({"router_jitter_noise": 0.1},
     r"MixtralConfig with router_jitter_noise=0.1 is not supported: .* Load it with router_jitter_noise=0.0"),
    ({"num_experts_per_tok": 1},
     r"MixtralConfig with num_experts_per_tok=1 and renormalised routing weights is not supported"),
], ids=["jitter", "top-1"])
def test_unmatched_moe_features_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        AutoBridge.from_hf_config(make_hf_config("mixtral", **overrides))


def test_jitter_can_be_turned_off_when_loading(tmp_path):
    folder = make_checkpoint("mixtral", tmp_path / "m", router_jitter_noise=0.1)
    bridge = AutoBridge.from_hf_pretrained(folder, router_jitter_noise=0.0)
    assert bridge.hf_config.router_jitter_noise == 0.0
