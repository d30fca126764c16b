"""Qwen2: Llama's tables with q/k/v biases; per-layer sliding windows refused."""

from __future__ import annotations

import pytest
from factories import make_checkpoint, make_hf_config

from lightning_bridge import AutoBridge
from lightning_bridge.hf_io import HFCheckpointReader


def test_qkv_biases_are_on_and_mapped(tmp_path):
    folder = make_checkpoint("qwen2", tmp_path / "qwen2")
    bridge = AutoBridge.from_hf_pretrained(folder)
    provider = bridge.transformer_config
    assert provider.add_qkv_bias and not provider.add_bias_linear
    expected = bridge.mapping_registry().expected_hf_names(bridge.model_bridge.wildcard_ranges())
    assert expected == set(HFCheckpointReader(folder).names())
    assert {f"model.layers.1.self_attn.{p}_proj.bias" for p in "qkv"} <= expected


def test_use_sliding_window_is_refused_by_name():
    with pytest.raises(ValueError, match="Qwen2Config with use_sliding_window=True is not supported"):
        AutoBridge.from_hf_config(make_hf_config("qwen2", use_sliding_window=True))
