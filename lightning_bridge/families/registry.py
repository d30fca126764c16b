"""Which family handles which HF architecture."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_bridge.families.base import ModelBridge

_FAMILIES: dict[str, type[ModelBridge]] = {}


def register(cls: type[ModelBridge]) -> type[ModelBridge]:
    """Class decorator: make a family's architectures known to AutoBridge."""
    for architecture in cls.architectures:
        _FAMILIES[architecture] = cls
    return cls


def family_for(architecture: str) -> type[ModelBridge] | None:
    return _FAMILIES.get(architecture)


def supported_architectures() -> list[str]:
    return sorted(_FAMILIES)
