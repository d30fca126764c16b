"""Rotary embeddings at each token's position_ids: bitwise Megatron's own at arange, restarting for packed examples."""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from lightning_bridge.rotary import PositionIdsRotary, use_position_ids
from lightning_bridge.runtime import cpu as cpu_runtime

cpu_runtime.activate()  # megatron-core's rotary embedding asks for the current CUDA device; no effect on GPUs


class Model(torch.nn.Module):
    """A stand-in GPTModel: forward(input_ids, position_ids) asks its rotary embedding for the angles."""

    def __init__(self) -> None:
        super().__init__()
        self.rotary_pos_emb = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.rotary_pos_emb(input_ids.shape[1])


def test_angles_at_arange_are_megatrons_own_and_packed_examples_restart_at_zero():
    model = Model()
    own = model.rotary_pos_emb(6)  # [seq, 1, 1, dim]
    use_position_ids(model)
    assert isinstance(model.rotary_pos_emb, PositionIdsRotary)
    assert model.rotary_pos_emb.inv_freq is model.rotary_pos_emb.rotary.inv_freq  # the wrapped module's attributes
    ids = torch.zeros(2, 6, dtype=torch.long)
    angles = model(ids, torch.arange(6).expand(2, 6))
    assert angles.shape == (6, 2, 1, 8) and torch.equal(angles[:, 0], own[:, 0]) and torch.equal(angles[:, 1], own[:, 0])
    packed = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    angles = model(ids, packed)
    assert torch.equal(angles[3:, 0], own[:3, 0]) and torch.equal(angles[:, 1], own[:, 0])


def test_without_matching_position_ids_the_angles_are_megatrons():
    rotary = PositionIdsRotary(RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True))
    assert torch.equal(rotary(4), rotary.rotary(4))
    rotary.position_ids = torch.arange(3).expand(1, 3)  # another length: not for this sequence
    assert torch.equal(rotary(4), rotary.rotary(4))


def test_a_model_without_rotary_embeddings_is_left_alone():
    model = torch.nn.Linear(2, 2)
    use_position_ids(model)
    assert not model._forward_pre_hooks
