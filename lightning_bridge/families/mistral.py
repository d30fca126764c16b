"""Mistral: Llama's layout plus sliding-window attention (Megatron's ``window_size``)."""

from __future__ import annotations

from typing import Any

from lightning_bridge.families.llama import LlamaBridge
from lightning_bridge.families.registry import register


@register
class MistralBridge(LlamaBridge):
    architectures = ("MistralForCausalLM",)

    def computed_config(self) -> dict[str, Any]:
        window = getattr(self.hf_config, "sliding_window", None)
        # HF lets token i see keys j with i - j < sliding_window: a left window of W - 1.
        return {**super().computed_config(), "window_size": (window - 1, 0) if window else None}
