"""Mistral: Llama's tables plus the sliding window, as Megatron's left window of W - 1."""

from __future__ import annotations

from factories import make_hf_config

from lightning_bridge import AutoBridge
from lightning_bridge.families.llama import LlamaBridge
from lightning_bridge.families.mistral import MistralBridge


def test_sliding_window_becomes_megatrons_window_size():
    bridge = AutoBridge.from_hf_config(make_hf_config("mistral", sliding_window=16))
    assert isinstance(bridge.model_bridge, MistralBridge) and isinstance(bridge.model_bridge, LlamaBridge)
    assert bridge.transformer_config.window_size == (15, 0)  # token i sees keys i-15 .. i: 16 of them


def test_no_sliding_window_is_full_causal_attention():
    assert AutoBridge.from_hf_config(make_hf_config("mistral", sliding_window=None)).transformer_config.window_size is None


def test_the_weight_table_is_llamas():
    llama = AutoBridge.from_hf_config(make_hf_config("llama")).mapping_registry().get_all_mappings()
    mistral = AutoBridge.from_hf_config(make_hf_config("mistral")).mapping_registry().get_all_mappings()
    assert [str(m) for m in mistral] == [str(m) for m in llama]
