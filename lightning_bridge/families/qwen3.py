"""Qwen3: Llama's layout with RMSNorm on each query and key head (q/k norm)."""

from __future__ import annotations

from lightning_bridge.conversion.mappings import Replicated, WeightMapping
from lightning_bridge.families.llama import LlamaBridge
from lightning_bridge.families.qwen2 import Qwen2Bridge
from lightning_bridge.families.registry import register


@register
class Qwen3Bridge(LlamaBridge):
    architectures = ("Qwen3ForCausalLM",)
    fixed_config = {**LlamaBridge.fixed_config, "qk_layernorm": True}
    check_supported = Qwen2Bridge.check_supported

    def mappings(self) -> list[WeightMapping]:
        return super().mappings() + [
            Replicated("decoder.layers.*.self_attention.q_layernorm.weight", "model.layers.*.self_attn.q_norm.weight"),
            Replicated("decoder.layers.*.self_attention.k_layernorm.weight", "model.layers.*.self_attn.k_norm.weight"),
        ]
