"""Model families: one small declarative file each. Importing this package registers them all."""

from lightning_bridge.families import (  # noqa: F401  (registration)
    gemma, gemma2, gemma3, gpt2, llama, mistral, olmo2, phi3, qwen2, qwen3,
)
from lightning_bridge.families import phi2  # noqa: F401  (registration)
from lightning_bridge.families import mixtral, qwen3_moe  # noqa: F401  (registration)
from lightning_bridge.families.base import ModelBridge
from lightning_bridge.families.registry import family_for, register, supported_architectures

__all__ = ["ModelBridge", "family_for", "register", "supported_architectures"]
