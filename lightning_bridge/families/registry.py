"""Which family handles which HF architecture."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_bridge.families.base import ModelBridge

_FAMILIES: dict[str, type[ModelBridge]] = {}
_REFUSED: dict[str, str] = {}  # architecture -> why it is refused and what to use instead


def register(cls: type[ModelBridge]) -> type[ModelBridge]:
    """Class decorator: make a family's architectures known to AutoBridge."""
    for architecture in cls.architectures:
        _FAMILIES[architecture] = cls
    return cls


def refuse(architecture: str, reason: str) -> None:
    """Make AutoBridge refuse ``architecture`` with ``reason`` (say what to use instead).

    A refused architecture is not listed as supported.
    """
    _REFUSED[architecture] = reason


def family_for(architecture: str) -> type[ModelBridge] | None:
    if architecture in _REFUSED:
        raise ValueError(_REFUSED[architecture])
    return _FAMILIES.get(architecture)


def supported_architectures() -> list[str]:
    return sorted(_FAMILIES)
