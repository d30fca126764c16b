"""Test helpers for code built on lightning_bridge: a local Hugging Face Hub emulator.

See :mod:`lightning_bridge.testing.hub_emulator` for the client settings it needs
(``HF_HUB_DISABLE_XET=1``) and what it does not emulate.
"""

from lightning_bridge.testing.hub_emulator import HubEmulator, RequestRecord

__all__ = ["HubEmulator", "RequestRecord"]
