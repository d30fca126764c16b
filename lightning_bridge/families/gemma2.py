"""Gemma 2: Gemma with sandwich norms, soft-capped attention and logits, and sliding-window layers.

On top of Gemma's (1 + w) RMSNorms, GeGLU and sqrt(hidden_size)-scaled embeddings:

- four norms per layer: ``input_layernorm`` and ``pre_feedforward_layernorm`` before attention and
  the MLP, ``post_attention_layernorm`` and ``post_feedforward_layernorm`` on their outputs before
  the residual add (held as ``post_layernorm`` of Megatron's output projections);
- softmax scale ``query_pre_attn_scalar ** -0.5`` (Megatron's ``softmax_scale``);
- ``attn_logit_softcapping``: the scaled attention scores soft-capped before the mask and softmax;
- ``final_logit_softcapping``: the logits soft-capped inside the model (a hook on its output layer),
  so training losses use them as transformers' do;
- ``layer_types``: "sliding_attention" layers see the last ``sliding_window`` tokens (Megatron's
  ``window_size`` = (sliding_window - 1, 0), as transformers' mask ``q - k < sliding_window``),
  "full_attention" layers everything; chosen per global layer number, so any pipeline layout works.

The layer spec is ``families.gemma_specs.GemmaSandwichBlockSpec``. Limits: under
``attention_backend="local"`` megatron-core's unfused attention applies the sliding window as a
causal window only (a padding ``attention_mask`` is not combined with it, as for Mistral); the
default fused core attention (``lightning_bridge.attention``) combines them. Not supported, refused with a ValueError naming the setting:
``attention_bias=True``, ``use_bidirectional_attention=True``, layer types other than
"sliding_attention" / "full_attention".
"""

from __future__ import annotations

from typing import Any

from lightning_bridge.conversion.mappings import Replicated, WeightMapping
from lightning_bridge.families.base import hf_activation
from lightning_bridge.families.gemma import GemmaBridge
from lightning_bridge.families.gemma_specs import FinalLogitSoftcapping, GemmaSandwichBlockSpec
from lightning_bridge.families.registry import register

LAYER_TYPES = ("sliding_attention", "full_attention")
SANDWICH_NORMS = {  # Megatron name -> HF name, for the norms Llama's table does not have
    "decoder.layers.*.pre_mlp_layernorm.weight": "model.layers.*.pre_feedforward_layernorm.weight",
    "decoder.layers.*.self_attention.linear_proj.post_layernorm.weight":
        "model.layers.*.post_attention_layernorm.weight",
    "decoder.layers.*.mlp.linear_fc2.post_layernorm.weight":
        "model.layers.*.post_feedforward_layernorm.weight",
}


@register
class Gemma2Bridge(GemmaBridge):
    architectures = ("Gemma2ForCausalLM",)

    def check_supported(self) -> None:
        super().check_supported()
        unknown = sorted(set(self.hf_config.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"{type(self.hf_config).__name__} with layer_types {unknown} is not supported; "
                             f"supported layer types: {list(LAYER_TYPES)}.")

    def computed_config(self) -> dict[str, Any]:
        cfg = self.hf_config
        sliding = [layer_type == "sliding_attention" for layer_type in cfg.layer_types]
        window = cfg.sliding_window if any(sliding) else None
        cap = cfg.final_logit_softcapping
        return {
            **super().computed_config(),
            "activation_func": hf_activation(cfg, "hidden_activation"),
            "softmax_scale": cfg.query_pre_attn_scalar ** -0.5,
            # HF lets token i see keys j with i - j < sliding_window: a left window of W - 1.
            "window_size": (window - 1, 0) if window else None,
            "window_attn_skip_freq": [int(s) for s in sliding] if window else None,  # 1: this layer slides
            "layer_spec": self.layer_spec(),
            "model_hook": FinalLogitSoftcapping(cap) if cap else None,
        }

    def layer_spec(self) -> GemmaSandwichBlockSpec:
        return GemmaSandwichBlockSpec(attn_logit_softcapping=self.hf_config.attn_logit_softcapping)

    def mappings(self) -> list[WeightMapping]:
        """Llama's table with the pre-MLP norm renamed, plus the two post-norms."""
        table = [m for m in super().mappings() if m.megatron not in SANDWICH_NORMS]
        return table + [Replicated(megatron, hf) for megatron, hf in SANDWICH_NORMS.items()]
