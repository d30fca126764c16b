"""OLMo 2: Llama's weights with the norms moved, in a custom layer spec (``families.specs``).

No norm before attention or the MLP; RMSNorm on their outputs before the residual add
(``post_attention_layernorm``, ``post_feedforward_layernorm``), which Megatron holds as
``post_layernorm`` of the output projections; RMSNorm over the whole query and key projections
(``q_norm``, ``k_norm``), normalised with the sum of squares of all tensor-parallel ranks, each
rank scaling its heads by its slice of the whole weight, so every TP/PP layout is exact.

Not supported: ``attention_bias=True``, refused with a ValueError.
"""

from __future__ import annotations

from lightning_bridge.conversion.mappings import Replicated, WeightMapping
from lightning_bridge.families.llama import LlamaBridge
from lightning_bridge.families.registry import register
from lightning_bridge.families.specs import olmo2_layer_spec

PRE_NORMS = ("decoder.layers.*.input_layernorm.weight", "decoder.layers.*.pre_mlp_layernorm.weight")


@register
class Olmo2Bridge(LlamaBridge):
    architectures = ("Olmo2ForCausalLM",)
    fixed_config = {**LlamaBridge.fixed_config, "qk_layernorm": True, "layer_spec": olmo2_layer_spec}

    def mappings(self) -> list[WeightMapping]:
        """Llama's table without the pre-norms, plus the post-norms and q/k norms."""
        return [mapping for mapping in super().mappings() if mapping.megatron not in PRE_NORMS] + [
            Replicated("decoder.layers.*.self_attention.q_layernorm.weight",
                       "model.layers.*.self_attn.q_norm.weight"),
            Replicated("decoder.layers.*.self_attention.k_layernorm.weight",
                       "model.layers.*.self_attn.k_norm.weight"),
            Replicated("decoder.layers.*.self_attention.linear_proj.post_layernorm.weight",
                       "model.layers.*.post_attention_layernorm.weight"),
            Replicated("decoder.layers.*.mlp.linear_fc2.post_layernorm.weight",
                       "model.layers.*.post_feedforward_layernorm.weight"),
        ]
