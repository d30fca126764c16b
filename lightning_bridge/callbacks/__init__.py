"""Lightning callbacks of lightning-bridge."""

from lightning_bridge.callbacks.hf_checkpoint import HFCheckpoint
from lightning_bridge.callbacks.push_to_hub import PushToHub

__all__ = ["HFCheckpoint", "PushToHub"]
