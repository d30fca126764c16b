"""A ``peft.LoraConfig`` -> what the Megatron adapters need, and which Megatron layers it targets.

``target_modules`` names HF modules (``q_proj``, GPT-2's ``c_attn``, Phi-3's ``qkv_proj``, or
``"all-linear"``), matched as PEFT matches them: a list entry matches a module whose name is the
entry or ends with ``.<entry>``; a string is a regular expression the whole name must match. The
HF module names come from the family's weight-mapping table (an HF weight ``<module>.weight``),
so a Megatron layer that fuses several HF projections (``linear_qkv`` = q, k, v) can be targeted
in part. Nothing here knows a family by name.

Refused, each by name with what to use instead: LoraConfig fields other than ``r``,
``lora_alpha``, ``lora_dropout``, ``target_modules``, ``use_rslora``, ``use_dora``,
``init_lora_weights`` (True, ``"gaussian"`` or False), ``bias="none"`` and bookkeeping fields
(``task_type``, ``base_model_name_or_path``, ``revision``, ``inference_mode``, ``fan_in_fan_out``,
which is derived from the weight layout); targets in the embeddings or the output layer; and
MoE expert layers (attention and dense MLP layers only).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

ALL_LINEAR = "all-linear"
# LoraConfig fields the Megatron adapters reproduce, or that carry no behaviour.
SUPPORTED_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora",
                    "init_lora_weights", "bias", "task_type", "base_model_name_or_path", "revision",
                    "inference_mode", "fan_in_fan_out", "peft_type", "peft_version", "auto_mapping",
                    "megatron_config", "megatron_core")
INIT_LORA_WEIGHTS = (True, False, "gaussian")
# What to do instead, for the refused fields users set most.
INSTEAD = {
    "modules_to_save": "train those modules in full with a separate optimizer group, or leave them frozen",
    "rank_pattern": "use one r for every target",
    "alpha_pattern": "use one lora_alpha for every target",
    "layers_to_transform": "target every layer (list module names in target_modules)",
    "layers_pattern": "target every layer (list module names in target_modules)",
    "exclude_modules": "list the modules to adapt in target_modules instead",
    "lora_bias": "leave lora_bias=False",
    "target_parameters": "target modules (target_modules), not parameters",
    "trainable_token_indices": "leave the embeddings frozen",
    "layer_replication": "leave layer_replication unset",
    "use_qalora": "quantized LoRA is not supported; train in bf16",
}


def require_peft():
    """The ``peft`` package, or an ImportError saying how to install it."""
    try:
        import peft
    except ImportError as exc:
        raise ImportError("LoRA needs the peft package: pip install 'lightning-bridge[peft]' "
                          "(or pip install 'peft>=0.17').") from exc
    return peft


@dataclass(frozen=True)
class LoraSettings:
    """What the Megatron adapters take from a ``LoraConfig``."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    use_dora: bool
    init_lora_weights: bool | str
    target_modules: Any  # PEFT's: a set of names, a regex string, or "all-linear"

    @property
    def scaling(self) -> float:
        """PEFT's: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``."""
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r

    @classmethod
    def from_lora_config(cls, config: Any) -> LoraSettings:
        """Validate a ``peft.LoraConfig``; a field the adapters cannot reproduce raises ValueError."""
        peft = require_peft()
        if not isinstance(config, peft.LoraConfig):
            raise TypeError(f"Expected a peft.LoraConfig, got {type(config).__name__}.")
        defaults = peft.LoraConfig()
        refused = []
        for name, value in vars(config).items():
            if name in SUPPORTED_FIELDS or name.startswith("_"):
                continue
            default = getattr(defaults, name, None)
            if value == default or (not value and not default):
                continue
            how = INSTEAD.get(name, f"leave it at its default ({default!r})")
            refused.append(f"{name}={value!r} ({how})")
        if config.bias != "none":
            refused.append(f"bias={config.bias!r} (use bias='none': biases stay frozen)")
        if config.init_lora_weights not in INIT_LORA_WEIGHTS:
            refused.append(f"init_lora_weights={config.init_lora_weights!r} (use True, 'gaussian' or False)")
        if not config.target_modules:
            refused.append("target_modules=None (name the HF modules to adapt, e.g. ['q_proj', 'v_proj'], "
                           "or 'all-linear')")
        if refused:
            raise ValueError("LoraConfig settings not supported by the Megatron LoRA adapters: "
                             + "; ".join(refused) + ".")
        if config.r <= 0:
            raise ValueError(f"LoraConfig r={config.r} must be positive.")
        return cls(r=int(config.r), lora_alpha=config.lora_alpha, lora_dropout=float(config.lora_dropout),
                   use_rslora=bool(config.use_rslora), use_dora=bool(config.use_dora),
                   init_lora_weights=config.init_lora_weights, target_modules=config.target_modules)

    def matches(self, hf_module: str) -> bool:
        """Whether an HF module name is targeted (PEFT's rule; ``all-linear`` matches every one)."""
        return any(True for _ in self.matching_entries(hf_module))

    def matching_entries(self, hf_module: str) -> Iterable[str]:
        """The ``target_modules`` entries that select ``hf_module``."""
        targets = self.target_modules
        if targets == ALL_LINEAR:
            yield ALL_LINEAR
        elif isinstance(targets, str):
            if re.fullmatch(targets, hf_module):
                yield targets
        else:
            for key in targets:
                if hf_module == key or hf_module.endswith("." + key):
                    yield key

    def entries(self) -> list[str]:
        """The ``target_modules`` entries (one for a regex or ``all-linear``)."""
        targets = self.target_modules
        return [targets] if isinstance(targets, str) else sorted(targets)
