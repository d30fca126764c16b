"""Gemma 3 (text): Gemma 2's layer with (1 + w) q/k norms and a local rope in sliding-window layers.

Handles ``Gemma3ForCausalLM`` (``Gemma3TextConfig``: the 1B model, or any text-only checkpoint).
What differs from Gemma 2 (``families.gemma2``):

- ``q_norm`` / ``k_norm``: (1 + w) RMSNorm over each head, before rope (Megatron's q/k layernorm
  slot, the weight replicated over tensor-parallel ranks);
- rope per layer type (``rope_parameters["full_attention"]`` / ``["sliding_attention"]``, by
  default bases 1e6 and 1e4; ``linear`` scaling of the full-attention rope is carried as
  frequencies): full-attention layers use the model's rotary embedding, sliding-window layers
  their own (``gemma_specs.GemmaTransformerLayer``);
- ``sliding_window_pattern`` / ``layer_types``: by default 5 sliding layers, then 1 full;
- ``final_logit_softcapping`` is honoured when set (None by default). ``attn_logit_softcapping``
  is *ignored*, as transformers' Gemma 3 attention ignores it (it never passes it on), so the
  logits match transformers'.

Not supported: ``Gemma3ForConditionalGeneration`` (the multimodal checkpoints: vision tower and
projector), refused with an error naming ``Gemma3ForCausalLM``; ``attention_bias=True``,
``use_bidirectional_attention=True`` and rope types other than default / linear / llama3, refused
with a ValueError naming the setting.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch

from lightning_bridge.conversion.mappings import Replicated, WeightMapping
from lightning_bridge.families.base import FREQUENCY_ONLY_ROPE
from lightning_bridge.families.gemma2 import Gemma2Bridge
from lightning_bridge.families.gemma_specs import GemmaSandwichBlockSpec
from lightning_bridge.families.registry import refuse, register

logger = logging.getLogger(__name__)

refuse("Gemma3ForConditionalGeneration",
       "Gemma3ForConditionalGeneration (Gemma 3 with its vision tower) is not supported: only the text-only "
       "Gemma3ForCausalLM (Gemma3TextConfig) is. Use a text-only Gemma 3 checkpoint (such as "
       "google/gemma-3-1b-pt), or save the language model of this one as Gemma3ForCausalLM first.")


@register
class Gemma3Bridge(Gemma2Bridge):
    architectures = ("Gemma3ForCausalLM",)
    fixed_config: ClassVar[dict[str, Any]] = {**Gemma2Bridge.fixed_config, "qk_layernorm": True}

    def check_supported(self) -> None:
        super().check_supported()
        for layer_type in set(self.hf_config.layer_types):
            rope_inv_freq(self.hf_config, layer_type)  # refuses rope types it cannot reproduce
        if getattr(self.hf_config, "attn_logit_softcapping", None) is not None:
            logger.info("attn_logit_softcapping=%s is ignored, as transformers' Gemma 3 ignores it.",
                        self.hf_config.attn_logit_softcapping)

    def computed_config(self) -> dict[str, Any]:
        params = self.hf_config.rope_parameters["full_attention"]
        return {**super().computed_config(), "rotary_base": params["rope_theta"],
                "rotary_inv_freq": rope_inv_freq(self.hf_config, "full_attention")}

    def layer_spec(self) -> GemmaSandwichBlockSpec:
        local = (rope_inv_freq(self.hf_config, "sliding_attention")
                 if "sliding_attention" in self.hf_config.layer_types else None)
        return GemmaSandwichBlockSpec(attn_logit_softcapping=None, local_rotary_inv_freq=local)

    def mappings(self) -> list[WeightMapping]:
        """Gemma 2's table plus the per-head q/k norms (the same weight on every TP rank)."""
        return super().mappings() + [
            Replicated("decoder.layers.*.self_attention.q_layernorm.weight",
                       "model.layers.*.self_attn.q_norm.weight"),
            Replicated("decoder.layers.*.self_attention.k_layernorm.weight",
                       "model.layers.*.self_attn.k_norm.weight"),
        ]


def rope_inv_freq(cfg, layer_type: str) -> torch.Tensor:
    """The rope frequencies transformers uses for ``layer_type`` layers, float32."""
    params = cfg.rope_parameters[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = cfg.head_dim
        return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if rope_type not in FREQUENCY_ONLY_ROPE:
        raise ValueError(f"Gemma3TextConfig with rope_type={rope_type!r} for {layer_type} layers is not "
                         f"supported: Megatron's rotary embedding cannot reproduce it exactly. "
                         f"Supported rope types: {list(FREQUENCY_ONLY_ROPE)}.")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    init = ROPE_INIT_FUNCTIONS[rope_type]
    inv_freq, attention_factor = init(cfg, torch.device("cpu"), layer_type=layer_type)
    if attention_factor != 1.0:
        raise ValueError(f"rope_type={rope_type!r} with attention scaling {attention_factor} is not "
                         "supported.")
    return inv_freq.float()
