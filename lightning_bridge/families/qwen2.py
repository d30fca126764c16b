"""Qwen2 and Qwen2.5: Llama's layout with biases on q, k and v."""

from __future__ import annotations

from lightning_bridge.conversion.mappings import QKV, WeightMapping
from lightning_bridge.families.llama import LlamaBridge
from lightning_bridge.families.registry import register


@register
class Qwen2Bridge(LlamaBridge):
    architectures = ("Qwen2ForCausalLM",)
    fixed_config = {**LlamaBridge.fixed_config, "add_qkv_bias": True}

    def check_supported(self) -> None:
        if getattr(self.hf_config, "use_sliding_window", False):
            raise ValueError(
                f"{type(self.hf_config).__name__} with use_sliding_window=True is not supported "
                "(its per-layer windows are not reproduced); set use_sliding_window=False."
            )

    def mappings(self) -> list[WeightMapping]:
        return super().mappings() + [
            QKV("decoder.layers.*.self_attention.linear_qkv.bias", (
                "model.layers.*.self_attn.q_proj.bias",
                "model.layers.*.self_attn.k_proj.bias",
                "model.layers.*.self_attn.v_proj.bias",
            )),
        ]
