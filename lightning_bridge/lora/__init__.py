"""LoRA and DoRA for Megatron-Core models, in PEFT's terms (issue #17).

Users write a ``peft.LoraConfig`` naming HF modules; the adapters train on Megatron's (often fused)
tensor-parallel linear layers at any TP/PP/DP layout and come out as a PEFT adapter folder that
``PeftModel.from_pretrained`` loads, or merged into full HF weights. Through the bridge:

    bridge.apply_lora(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ...train (only adapter parameters require grad)...
    bridge.save_hf_adapter(model, "./adapter")            # adapter_config.json + adapter_model.safetensors
    bridge.load_hf_adapter(model, "./adapter")            # bitwise
    bridge.save_hf_pretrained(model, "./merged", merge_adapters=True)

Modules: :mod:`~lightning_bridge.lora.config` (LoraConfig checks, target matching),
:mod:`~lightning_bridge.lora.layers` (the adapted layer and its TP rules),
:mod:`~lightning_bridge.lora.apply` (wrapping and freezing), :mod:`~lightning_bridge.lora.adapters`
(export, import, merge). ``peft`` is imported only when a LoraConfig is checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_bridge.conversion.parallel import unwrap
from lightning_bridge.lora.adapters import (
    ADAPTER_CONFIG_NAME,
    AdapterPlan,
    adapter_config_json,
    export_adapter_weights,
    fuse_adapters,
    load_adapter_weights,
    merge_adapter,
    merged_hf_weights,
    parse_peft_name,
    peft_name,
    split_fused_adapter,
)
from lightning_bridge.lora.apply import adapter_layers, apply_lora, targeted_hf_modules
from lightning_bridge.lora.config import LoraSettings, require_peft
from lightning_bridge.lora.layers import LoraLinear, ProjectionAdapter, projection_layouts

__all__ = [
    "ADAPTER_CONFIG_NAME", "adapter_config_json", "AdapterPlan", "LoraLinear", "LoraSettings", "ProjectionAdapter", "adapter_layers", "apply_lora",
    "export_adapter_weights", "fuse_adapters", "load_adapter_weights", "lora_config_of", "merge_adapter",
    "merged_hf_weights", "parse_peft_name", "peft_name", "projection_layouts", "require_peft", "split_fused_adapter",
    "targeted_hf_modules",
]


def lora_config_of(chunks: Sequence[torch.nn.Module]) -> Any | None:
    """The ``peft.LoraConfig`` the chunks were adapted with (kept as ``lora_config`` on each model), or None."""
    for chunk in chunks:
        config = getattr(unwrap(chunk), "lora_config", None)
        if config is not None:
            return config
    return None
