"""The few model dimensions a weight conversion needs, taken from the Megatron config."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer import TransformerConfig


@dataclass(frozen=True)
class ConversionContext:
    """Sizes that decide how fused and padded tensors are laid out."""

    vocab_size: int
    padded_vocab_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    hidden_size: int

    @classmethod
    def from_config(cls, config: TransformerConfig, vocab_size: int, padded_vocab_size: int) -> ConversionContext:
        heads = config.num_attention_heads
        return cls(
            vocab_size=vocab_size,
            padded_vocab_size=padded_vocab_size,
            num_attention_heads=heads,
            num_query_groups=config.num_query_groups or heads,
            kv_channels=config.kv_channels or config.hidden_size // heads,
            hidden_size=config.hidden_size,
        )
