"""Phi-3 (and Phi-4-mini): Mistral's layout with q/k/v and gate/up each fused in one HF tensor.

``qkv_proj`` is [q; k; v] (grouped-query capable) and ``gate_up_proj`` is [gate; up]; partial
rotary embeddings (``partial_rotary_factor``) map to Megatron's ``rotary_percent``.

Not supported: ``longrope`` rope scaling (the 128k-context checkpoints), refused with a ValueError
naming the rope type.
"""

from __future__ import annotations

from typing import Any

from lightning_bridge.conversion.mappings import FusedGatedMLP, FusedQKV, WeightMapping
from lightning_bridge.families.base import rope_parameters
from lightning_bridge.families.mistral import MistralBridge
from lightning_bridge.families.registry import register

FUSED = {
    "decoder.layers.*.self_attention.linear_qkv.weight": FusedQKV(
        "decoder.layers.*.self_attention.linear_qkv.weight", "model.layers.*.self_attn.qkv_proj.weight"),
    "decoder.layers.*.mlp.linear_fc1.weight": FusedGatedMLP(
        "decoder.layers.*.mlp.linear_fc1.weight", "model.layers.*.mlp.gate_up_proj.weight"),
}


@register
class Phi3Bridge(MistralBridge):
    architectures = ("Phi3ForCausalLM",)

    def computed_config(self) -> dict[str, Any]:
        rotary_percent = rope_parameters(self.hf_config).get(
            "partial_rotary_factor", getattr(self.hf_config, "partial_rotary_factor", 1.0))
        return {**super().computed_config(), "rotary_percent": rotary_percent}

    def mappings(self) -> list[WeightMapping]:
        """Llama's table, with the fused q/k/v and gate/up tensors."""
        return [FUSED.get(mapping.megatron, mapping) for mapping in super().mappings()]
