"""Lightning strategies."""

from lightning_bridge.strategies.megatron import MegatronBridgeStrategy

__all__ = ["MegatronBridgeStrategy"]
