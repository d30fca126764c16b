"""lightning-bridge: train Hugging Face models with Megatron-Core parallelism from Lightning."""

import logging
import warnings

# Megatron-Core warns at import that Transformer Engine / Apex are missing; the bridge uses
# megatron-core's local (pure PyTorch) layers on purpose, so these say nothing to our users.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed.*")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")

from lightning_bridge.bridge import AutoBridge, CausalLMBridge
from lightning_bridge.callbacks import HFCheckpoint, PushToHub
from lightning_bridge.data import TextDataModule
from lightning_bridge.module import CausalLMModule
from lightning_bridge.progress import StepProgressBar
from lightning_bridge.provider import GPTModelProvider
from lightning_bridge.sft_data import SFTDataModule
from lightning_bridge.strategies import MegatronBridgeStrategy

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AutoBridge", "CausalLMBridge", "CausalLMModule", "GPTModelProvider", "HFCheckpoint", "MegatronBridgeStrategy",
    "PushToHub", "SFTDataModule", "StepProgressBar", "TextDataModule",
]
__version__ = "0.1.0"
