"""ConversionContext: the sizes a conversion needs, from a Megatron config."""

from __future__ import annotations

from factories import make_hf_config

from lightning_bridge import AutoBridge
from lightning_bridge.conversion.context import ConversionContext


def test_context_from_a_grouped_query_config():
    provider = AutoBridge.from_hf_config(make_hf_config("llama", num_key_value_heads=2)).transformer_config
    context = ConversionContext.from_config(provider, provider.vocab_size, provider.padded_vocab_size)
    assert context == ConversionContext(vocab_size=96, padded_vocab_size=128, num_attention_heads=4,
                                        num_query_groups=2, kv_channels=16, hidden_size=64)


def test_context_defaults_query_groups_to_heads_and_channels_to_hidden_over_heads():
    provider = AutoBridge.from_hf_config(make_hf_config("llama")).transformer_config
    provider.num_query_groups, provider.kv_channels = None, None
    context = ConversionContext.from_config(provider, 96, 96)
    assert (context.num_query_groups, context.kv_channels) == (provider.num_attention_heads,
                                                                64 // provider.num_attention_heads)
