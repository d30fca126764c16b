"""OLMo 2: the Megatron model has its post-norms and whole-projection q/k norms, not pre-norms."""

from __future__ import annotations

import pytest
from factories import make_hf_config

from lightning_bridge import AutoBridge
from lightning_bridge.conversion.parallel import global_named_parameters


def test_layer_has_post_norms_and_projection_qk_norms():
    (model,) = AutoBridge.from_hf_config(make_hf_config("olmo2")).to_megatron_model()
    shapes = {name: tuple(p.shape) for name, p in global_named_parameters(model) if "layers.0." in name}
    assert shapes["decoder.layers.0.self_attention.q_layernorm.weight"] == (64,)  # 4 heads x 16
    assert shapes["decoder.layers.0.self_attention.k_layernorm.weight"] == (32,)  # 2 KV heads x 16
    assert shapes["decoder.layers.0.self_attention.linear_proj.post_layernorm.weight"] == (64,)
    assert shapes["decoder.layers.0.mlp.linear_fc2.post_layernorm.weight"] == (64,)
    assert not any("input_layernorm" in name or "pre_mlp_layernorm" in name for name in shapes)


def test_attention_bias_is_refused():
    with pytest.raises(ValueError, match=r"Olmo2Config with attention_bias=True is not supported"):
        AutoBridge.from_hf_config(make_hf_config("olmo2", attention_bias=True)).to_megatron_provider()
