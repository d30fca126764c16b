"""Qwen3: Llama's tables with a norm on each query and key head."""

from __future__ import annotations

import pytest
from factories import make_checkpoint, make_hf_config

from lightning_bridge import AutoBridge
from lightning_bridge.hf_io import HFCheckpointReader


def test_q_and_k_norms_are_on_and_mapped(tmp_path):
    folder = make_checkpoint("qwen3", tmp_path / "qwen3")
    bridge = AutoBridge.from_hf_pretrained(folder)
    assert bridge.transformer_config.qk_layernorm and not bridge.transformer_config.add_qkv_bias
    expected = bridge.mapping_registry().expected_hf_names(bridge.model_bridge.wildcard_ranges())
    assert expected == set(HFCheckpointReader(folder).names())
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= expected


def test_sliding_windows_are_refused_as_for_qwen2():
    with pytest.raises(ValueError, match="Qwen3Config with use_sliding_window=True is not supported"):
        AutoBridge.from_hf_config(make_hf_config("qwen3", use_sliding_window=True))
