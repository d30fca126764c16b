"""Norms for megatron-core's local (no Transformer Engine) layer spec that allow sequence parallelism.

megatron-core 0.16's local spec builds its norms with ``WrappedTorchNorm``, which refuses
``sequence_parallel=True``. Under sequence parallelism each tensor-parallel rank normalises its
own part of the sequence, so each rank's norm-weight gradient covers only its tokens; Megatron sums
those gradients over the tensor-parallel group for every parameter marked ``sequence_parallel``
(``finalize_model_grads``). :class:`TorchNorm` builds the same torch module as ``WrappedTorchNorm``
(same parameters, same state-dict names, same numerics) and marks its parameters so.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig

NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


def mark_sequence_parallel(module: torch.nn.Module, config: TransformerConfig) -> torch.nn.Module:
    """Mark ``module``'s parameters for Megatron's sum over TP ranks under sequence parallelism."""
    for param in module.parameters():
        param.sequence_parallel = config.sequence_parallel
    return module


class TorchNorm:
    """``torch.nn.LayerNorm`` or ``RMSNorm`` per ``config.normalization``, sequence-parallel aware.

    A drop-in for megatron-core's ``WrappedTorchNorm`` in layer specs (same constructor).
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                **unused: object) -> torch.nn.Module:
        if config.normalization not in NORMS:
            raise ValueError(f"normalization={config.normalization!r} is not supported by the local layer "
                             f"spec; use one of {sorted(NORMS)}.")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma needs a (1 + w) norm in the layer spec "
                             "(families.specs.ZeroCenteredRMSNorm), not TorchNorm.")
        return mark_sequence_parallel(NORMS[config.normalization](hidden_size, eps=eps), config)
