"""Rotary embeddings at each token's own position, so that packed examples restart at position 0.

megatron-core 0.16's ``GPTModel`` ignores ``position_ids`` for rotary embeddings: it rotates token
``t`` by position ``t`` of the sequence. Packed training (several examples in one sequence, each
numbered from 0 as transformers numbers them) needs each token rotated by its own position.
:func:`use_position_ids` wraps every ``RotaryEmbedding`` of a built model in
:class:`PositionIdsRotary` and has the model hand its ``position_ids`` argument to them before
each forward. With ``position_ids = arange(seq)`` the angles, and so the outputs, are bitwise the
same as Megatron's own.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding


class PositionIdsRotary(torch.nn.Module):
    """A ``RotaryEmbedding`` that answers with angles at ``position_ids``: [seq, batch, 1, dim]."""

    def __init__(self, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.rotary = rotary
        self.position_ids: torch.Tensor | None = None

    def forward(self, max_seq_len: int, *args: Any,
                **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, float]:
        angles = self.rotary(max_seq_len, *args, **kwargs)  # [seq, 1, 1, dim], Megatron's own
        if isinstance(angles, tuple):  # YaRN (multi-latent attention): (angles, its attention factor)
            return (self._at_positions(angles[0]), *angles[1:])
        return self._at_positions(angles)

    def _at_positions(self, angles: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids
        if positions is None or positions.shape[-1] != angles.shape[0]:
            return angles
        return angles[positions.t(), 0]  # [seq, batch, 1, dim]: each token's own angle

    def __getattr__(self, name: str) -> Any:  # get_rotary_seq_len, inv_freq, ... of the wrapped module
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.rotary, name)


def use_position_ids(model: torch.nn.Module) -> None:
    """Rotate by ``position_ids`` in every rotary embedding of ``model`` (a GPTModel)."""
    wrappers = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RotaryEmbedding):
                wrapper = PositionIdsRotary(child)
                setattr(parent, name, wrapper)
                wrappers.append(wrapper)
    if not wrappers:
        return

    def remember_position_ids(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        for wrapper in wrappers:
            wrapper.position_ids = positions

    model.register_forward_pre_hook(remember_position_ids, with_kwargs=True)
