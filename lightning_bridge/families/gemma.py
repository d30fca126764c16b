"""Gemma: Llama's weights with (1 + w) RMSNorms, embeddings scaled by sqrt(hidden_size), GeGLU.

HF stores each norm weight as an offset from 1 (Megatron's ``layernorm_zero_centered_gamma``), so
weights convert unchanged; the norms and the embedding scale live in a custom block spec
(``families.specs.gemma_block_spec``).

Not supported: ``attention_bias=True`` and ``use_bidirectional_attention=True``, refused with a
ValueError naming the setting.
"""

from __future__ import annotations

from typing import Any, ClassVar

from lightning_bridge.families.llama import LlamaBridge
from lightning_bridge.families.registry import register
from lightning_bridge.families.specs import gemma_block_spec


@register
class GemmaBridge(LlamaBridge):
    architectures = ("GemmaForCausalLM",)
    fixed_config: ClassVar[dict[str, Any]] = {
        **LlamaBridge.fixed_config, "layernorm_zero_centered_gamma": True, "layer_spec": gemma_block_spec,
    }

    def check_supported(self) -> None:
        super().check_supported()
        if getattr(self.hf_config, "use_bidirectional_attention", False):
            raise ValueError(f"{type(self.hf_config).__name__} with use_bidirectional_attention=True is not "
                             "supported: Megatron's GPT layer attends causally.")
