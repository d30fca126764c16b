"""The mapping kinds for fused (Phi-3) and transposed (GPT-2 ``Conv1D``) HF tensors.

Each is checked against the separate-tensor kind it generalises, and for a bitwise round trip.
"""

from __future__ import annotations

import pytest
import torch

from lightning_bridge.conversion.context import ConversionContext
from lightning_bridge.conversion.mappings import (
    QKV,
    ColumnParallel,
    FusedGatedMLP,
    FusedQKV,
    GatedMLP,
    RowParallel,
    TransposedColumnParallel,
    TransposedFusedQKV,
    TransposedRowParallel,
)

SEPARATE_QKV = QKV("linear_qkv.weight", ("q.weight", "k.weight", "v.weight"))
FUSED_QKV = FusedQKV("linear_qkv.weight", "qkv_proj.weight")
CONV1D_QKV = TransposedFusedQKV("linear_qkv.weight", "c_attn.weight")
SEPARATE_GATED = GatedMLP("linear_fc1.weight", ("gate_proj.weight", "up_proj.weight"))
FUSED_GATED = FusedGatedMLP("linear_fc1.weight", "gate_up_proj.weight")


def ctx(heads: int, groups: int, head_dim: int = 3) -> ConversionContext:
    return ConversionContext(vocab_size=10, padded_vocab_size=16, num_attention_heads=heads,
                             num_query_groups=groups, kv_channels=head_dim, hidden_size=heads * head_dim)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def qkv_rows(c: ConversionContext) -> list[int]:
    kv = c.num_query_groups * c.kv_channels
    return [c.num_attention_heads * c.kv_channels, kv, kv]


@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 4), (4, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("shape", [(5,), ()], ids=["weight", "bias"])
def test_fused_qkv_is_qkv_of_its_three_parts_and_round_trips(heads, groups, shape):
    c = ctx(heads, groups)
    fused = randn(sum(qkv_rows(c)), *shape)
    megatron = FUSED_QKV.to_megatron([fused], c)
    assert torch.equal(megatron, SEPARATE_QKV.to_megatron(list(fused.split(qkv_rows(c))), c))
    (back,) = FUSED_QKV.to_hf(megatron, c)
    assert back.dtype == fused.dtype and torch.equal(back, fused)


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_gated_mlp_is_gate_then_up_split_per_rank_like_gated_mlp(tp):
    gate, up = randn(8, 5, seed=1), randn(8, 5, seed=2)
    fused = torch.cat([gate, up])
    megatron = FUSED_GATED.to_megatron([fused], ctx(4, 2))
    assert torch.equal(megatron, SEPARATE_GATED.to_megatron([gate, up], ctx(4, 2)))
    shards = [FUSED_GATED.shard(megatron, rank, tp) for rank in range(tp)]
    assert all(torch.equal(s, SEPARATE_GATED.shard(megatron, r, tp)) for r, s in enumerate(shards))
    (back,) = FUSED_GATED.to_hf(FUSED_GATED.gather(shards), ctx(4, 2))
    assert torch.equal(back, fused)


@pytest.mark.parametrize("transposed,plain", [
    (TransposedColumnParallel("fc1.weight", "c_fc.weight"), ColumnParallel("fc1.weight", "fc.weight")),
    (TransposedRowParallel("fc2.weight", "c_proj.weight"), RowParallel("fc2.weight", "proj.weight")),
    (CONV1D_QKV, FUSED_QKV),
], ids=["column", "row", "fused-qkv"])
def test_transposed_kind_is_the_plain_kind_of_the_transpose_and_round_trips(transposed, plain):
    c = ctx(4, 4)
    conv1d = randn(c.hidden_size, sum(qkv_rows(c)))  # [in, out], as HF's Conv1D stores it
    megatron = transposed.to_megatron([conv1d], c)
    assert torch.equal(megatron, plain.to_megatron([conv1d.t()], c))
    assert transposed.tp_dim == plain.tp_dim
    (back,) = transposed.to_hf(megatron, c)
    assert back.shape == conv1d.shape and torch.equal(back, conv1d)


def test_transposed_shapes_are_what_loading_checks_against():
    """Loading compares checkpoint shapes with ``to_hf`` of a meta tensor: it must give [in, out]."""
    c = ctx(4, 4)
    (expected,) = CONV1D_QKV.to_hf(torch.empty(3 * c.hidden_size, c.hidden_size, device="meta"), c)
    assert tuple(expected.shape) == (c.hidden_size, 3 * c.hidden_size)
