"""Model families: one small declarative file each. Importing this package registers them all."""

from lightning_bridge.families import (  # noqa: F401  (importing a family registers it)
    deepseek_v3,
    gemma,
    gemma2,
    gemma3,
    glm4_moe,
    gpt2,
    llama,
    mistral,
    mixtral,
    olmo2,
    phi2,
    phi3,
    qwen2,
    qwen3,
    qwen3_moe,
)
from lightning_bridge.families.base import ModelBridge
from lightning_bridge.families.registry import family_for, register, supported_architectures

__all__ = ["ModelBridge", "family_for", "register", "supported_architectures"]
