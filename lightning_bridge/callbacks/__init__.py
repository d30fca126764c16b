"""Lightning callbacks of lightning-bridge."""

from lightning_bridge.callbacks.hf_checkpoint import HFCheckpoint

__all__ = ["HFCheckpoint"]
