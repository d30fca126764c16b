"""Tests for lightning_bridge.conversion.mappings: each mapping kind's layout, shards and round trips.

Hand-made tensors whose values name their rows, so the exact fused layout can be read off.
"""

from __future__ import annotations

import pytest
import torch

from lightning_bridge.conversion.context import ConversionContext
from lightning_bridge.conversion.mappings import (
    QKV,
    ColumnParallel,
    GatedMLP,
    Replicated,
    RowParallel,
    VocabParallel,
    WeightMapping,
)

QKV_WEIGHT = QKV("decoder.layers.*.self_attention.linear_qkv.weight", (
    "model.layers.*.self_attn.q_proj.weight",
    "model.layers.*.self_attn.k_proj.weight",
    "model.layers.*.self_attn.v_proj.weight",
))
QKV_BIAS = QKV("decoder.layers.*.self_attention.linear_qkv.bias", (
    "model.layers.*.self_attn.q_proj.bias",
    "model.layers.*.self_attn.k_proj.bias",
    "model.layers.*.self_attn.v_proj.bias",
))
GATED = GatedMLP("decoder.layers.*.mlp.linear_fc1.weight",
                 ("model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight"))
ROW = RowParallel("decoder.layers.*.mlp.linear_fc2.weight", "model.layers.*.mlp.down_proj.weight")
COLUMN = ColumnParallel("decoder.layers.*.x.weight", "model.layers.*.x.weight")
VOCAB = VocabParallel("embedding.word_embeddings.weight", "model.embed_tokens.weight")
NORM = Replicated("decoder.final_layernorm.weight", "model.norm.weight")


def ctx(heads: int = 4, groups: int = 2, head_dim: int = 2, vocab: int = 10,
        padded: int = 16) -> ConversionContext:
    return ConversionContext(vocab_size=vocab, padded_vocab_size=padded, num_attention_heads=heads,
                             num_query_groups=groups, kv_channels=head_dim, hidden_size=heads * head_dim)


def labelled_rows(values: list[int]) -> torch.Tensor:
    """A [rows, 2] weight whose row i is (values[i], -values[i]): rows are recognisable after moves."""
    column = torch.tensor(values, dtype=torch.float32)
    return torch.stack([column, -column], dim=1)


def head_rows(base: int, heads: int, head_dim: int) -> list[int]:
    """Row labels base + 10*h + r for head h, row r within the head."""
    return [base + 10 * h + r for h in range(heads) for r in range(head_dim)]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- QKV: the grouped layout -------------------------------------------------------------------------
@pytest.mark.parametrize("heads,groups,expected", [
    # GQA: per group g, the q heads of g, then k_g, then v_g
    (4, 2, [0, 1, 10, 11, 100, 101, 200, 201, 20, 21, 30, 31, 110, 111, 210, 211]),
    # MHA: one q head per group
    (2, 2, [0, 1, 100, 101, 200, 201, 10, 11, 110, 111, 210, 211]),
    # MQA: every q head, then the one k and v
    (3, 1, [0, 1, 10, 11, 20, 21, 100, 101, 200, 201]),
], ids=["gqa", "mha", "mqa"])
def test_qkv_fused_row_order(heads, groups, expected):
    q, k, v = (head_rows(0, heads, 2), head_rows(100, groups, 2), head_rows(200, groups, 2))
    fused = QKV_WEIGHT.to_megatron([labelled_rows(q), labelled_rows(k), labelled_rows(v)], ctx(heads, groups))
    assert fused.shape == (len(expected), 2)
    assert fused[:, 0].tolist() == expected
    assert torch.equal(fused[:, 1], -fused[:, 0])  # whole rows moved, columns untouched


def test_qkv_bias_is_fused_like_the_weight_rows():
    q, k, v = (torch.tensor(head_rows(b, n, 2), dtype=torch.float32) for b, n in ((0, 4), (100, 2), (200, 2)))
    fused = QKV_BIAS.to_megatron([q, k, v], ctx(4, 2))
    assert fused.tolist() == [0, 1, 10, 11, 100, 101, 200, 201, 20, 21, 30, 31, 110, 111, 210, 211]
    assert [t.tolist() for t in QKV_BIAS.to_hf(fused, ctx(4, 2))] == [q.tolist(), k.tolist(), v.tolist()]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_shard_holds_whole_query_groups(tp):
    """Rank r's slice is exactly the fused q/k/v of its own groups (what Megatron's TP layer expects)."""
    heads, groups, head_dim, hidden = 8, 4, 3, 5
    q, k, v = randn(heads * head_dim, hidden, seed=1), randn(groups * head_dim, hidden, seed=2), \
        randn(groups * head_dim, hidden, seed=3)
    full = QKV_WEIGHT.to_megatron([q, k, v], ctx(heads, groups, head_dim))
    local_ctx = ctx(heads // tp, groups // tp, head_dim)
    for rank in range(tp):
        mine = [t.chunk(tp)[rank] for t in (q, k, v)]
        assert torch.equal(QKV_WEIGHT.shard(full, rank, tp), QKV_WEIGHT.to_megatron(mine, local_ctx))


# --- GatedMLP ------------------------------------------------------------------------------------
def test_gated_mlp_is_gate_then_up():
    gate, up = labelled_rows([0, 1, 2, 3]), labelled_rows([10, 11, 12, 13])
    full = GATED.to_megatron([gate, up], ctx())
    assert full[:, 0].tolist() == [0, 1, 2, 3, 10, 11, 12, 13]


@pytest.mark.parametrize("tp,expected", [
    (2, [[0, 1, 10, 11], [2, 3, 12, 13]]),
    (4, [[0, 10], [1, 11], [2, 12], [3, 13]]),
])
def test_gated_mlp_shard_is_gate_i_then_up_i(tp, expected):
    full = GATED.to_megatron([labelled_rows([0, 1, 2, 3]), labelled_rows([10, 11, 12, 13])], ctx())
    shards = [GATED.shard(full, rank, tp) for rank in range(tp)]
    assert [s[:, 0].tolist() for s in shards] == expected
    assert torch.equal(GATED.gather(shards), full)


# --- Row / Column / Replicated ---------------------------------------------------------------------
def test_row_parallel_splits_columns_and_column_parallel_splits_rows():
    weight = torch.arange(24.0).reshape(4, 6)
    assert [s.tolist() for s in (ROW.shard(weight, r, 2) for r in range(2))] == \
        [weight[:, :3].tolist(), weight[:, 3:].tolist()]
    assert [s.tolist() for s in (COLUMN.shard(weight, r, 2) for r in range(2))] == \
        [weight[:2].tolist(), weight[2:].tolist()]


def test_replicated_is_the_same_on_every_rank():
    weight = randn(8)
    assert all(NORM.shard(weight, rank, 4) is weight for rank in range(4))
    assert NORM.gather([weight]) is weight


@pytest.mark.parametrize("mapping", [ROW, COLUMN, GATED, QKV_WEIGHT, VOCAB, NORM], ids=lambda m: m.kind)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_then_gather_is_identity(mapping, tp):
    full = randn(16, 8, seed=tp)
    shards = [mapping.shard(full, rank, tp) for rank in range(tp)]
    if mapping.tp_dim is not None:
        assert all(s.shape[mapping.tp_dim] == full.shape[mapping.tp_dim] // tp for s in shards)
        assert torch.equal(mapping.gather(shards), full)
    else:
        assert torch.equal(mapping.gather(shards[:1]), full)


# --- VocabParallel ---------------------------------------------------------------------------------
def test_vocab_is_padded_with_zero_rows_and_unpadded_on_export():
    embedding = randn(10, 4)
    padded = VOCAB.to_megatron([embedding], ctx(vocab=10, padded=16))
    assert padded.shape == (16, 4)
    assert torch.equal(padded[:10], embedding) and not padded[10:].any()
    (back,) = VOCAB.to_hf(padded, ctx(vocab=10, padded=16))
    assert torch.equal(back, embedding)


def test_vocab_padding_splits_evenly_over_tp():
    padded = VOCAB.to_megatron([randn(10, 4)], ctx(vocab=10, padded=16))
    shards = [VOCAB.shard(padded, rank, 2) for rank in range(2)]
    assert [tuple(s.shape) for s in shards] == [(8, 4), (8, 4)]
    assert torch.equal(shards[0], padded[:8]) and torch.equal(shards[1], padded[8:])


def test_vocab_already_padded_is_unchanged():
    embedding = randn(16, 4)
    assert VOCAB.to_megatron([embedding], ctx(vocab=16, padded=16)) is embedding


def test_vocab_with_more_rows_than_the_padded_vocab_names_the_tensor():
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight has 20 rows.*vocab_size=10.*fix"):
        VOCAB.to_megatron([randn(20, 4)], ctx(vocab=10, padded=16))


# --- round trips ---------------------------------------------------------------------------------
def hf_tensors(mapping: WeightMapping, c: ConversionContext) -> list[torch.Tensor]:
    hidden = c.hidden_size
    if mapping is QKV_WEIGHT:
        return [randn(c.num_attention_heads * c.kv_channels, hidden, seed=1),
                randn(c.num_query_groups * c.kv_channels, hidden, seed=2),
                randn(c.num_query_groups * c.kv_channels, hidden, seed=3)]
    if mapping is QKV_BIAS:
        return [randn(c.num_attention_heads * c.kv_channels, seed=1),
                randn(c.num_query_groups * c.kv_channels, seed=2),
                randn(c.num_query_groups * c.kv_channels, seed=3)]
    if mapping is GATED:
        return [randn(12, hidden, seed=1), randn(12, hidden, seed=2)]
    if mapping is VOCAB:
        return [randn(c.vocab_size, hidden)]
    return [randn(6, hidden)]


@pytest.mark.parametrize("mapping", [QKV_WEIGHT, QKV_BIAS, GATED, ROW, COLUMN, VOCAB, NORM],
                         ids=["qkv", "qkv-bias", "gated", "row", "column", "vocab", "replicated"])
@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 4), (4, 1)], ids=["gqa", "mha", "mqa"])
def test_round_trip_is_bitwise(mapping, heads, groups):
    c = ctx(heads, groups, head_dim=3, vocab=10, padded=16)
    tensors = [t.to(torch.bfloat16) for t in hf_tensors(mapping, c)]
    back = mapping.to_hf(mapping.to_megatron(tensors, c), c)
    assert len(back) == len(tensors)
    for original, result in zip(tensors, back, strict=True):
        assert result.dtype == original.dtype and torch.equal(result, original)


@pytest.mark.parametrize("mapping", [QKV_WEIGHT, GATED, ROW], ids=["qkv", "gated", "row"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_hf_to_shards_and_back_is_bitwise(mapping, tp):
    """The whole load/export path for one tensor: HF -> full -> TP shards -> full -> HF."""
    c = ctx(8, 4, head_dim=2)
    tensors = hf_tensors(mapping, c)
    full = mapping.to_megatron(tensors, c)
    gathered = mapping.gather([mapping.shard(full, rank, tp) for rank in range(tp)])
    assert all(torch.equal(a, b) for a, b in zip(mapping.to_hf(gathered, c), tensors, strict=True))


# --- names -----------------------------------------------------------------------------------------
def test_names_fill_and_match_wildcards():
    assert QKV_WEIGHT.match("decoder.layers.12.self_attention.linear_qkv.weight") == ("12",)
    assert QKV_WEIGHT.match("decoder.layers.x.self_attention.linear_qkv.weight") is None
    assert QKV_WEIGHT.match("decoder.layers.1.self_attention.linear_qkv.weight.extra") is None
    assert QKV_WEIGHT.match_hf("model.layers.3.self_attn.v_proj.weight") == ("3",)
    assert QKV_WEIGHT.hf_names(["7"]) == ["model.layers.7.self_attn.q_proj.weight",
                                          "model.layers.7.self_attn.k_proj.weight",
                                          "model.layers.7.self_attn.v_proj.weight"]
    assert ROW.megatron_name(["0"]) == "decoder.layers.0.mlp.linear_fc2.weight"
    with pytest.raises(ValueError, match=r"needs 1 values, got \[\]"):
        ROW.hf_names([])


def test_str_shows_kind_and_both_names():
    assert str(GATED) == (" gated-mlp: decoder.layers.*.mlp.linear_fc1.weight <- "
                          "model.layers.*.mlp.gate_proj.weight, model.layers.*.mlp.up_proj.weight")
    assert str(VOCAB).split() == [
        "vocab:", "embedding.word_embeddings.weight", "<-", "model.embed_tokens.weight"]


# --- load_shard: the loader's in-place path ------------------------------------------------------
def every_kind() -> list[WeightMapping]:
    """One mapping of every kind, HF names made up."""
    from lightning_bridge.conversion import mappings as m

    return [
        m.WeightMapping("a.weight", "b.weight"), NORM, COLUMN, ROW, VOCAB, QKV_WEIGHT, QKV_BIAS, GATED,
        m.FusedQKV("linear_qkv.weight", "qkv_proj.weight"),
        m.FusedGatedMLP("linear_fc1.weight", "gate_up_proj.weight"),
        m.TransposedColumnParallel("linear_fc1.weight", "c_fc.weight"),
        m.TransposedRowParallel("linear_fc2.weight", "c_proj.weight"),
        m.TransposedFusedQKV("linear_qkv.weight", "c_attn.weight"),
    ]


def all_subclasses(cls: type) -> set[type]:
    return {sub for child in cls.__subclasses__() for sub in {child, *all_subclasses(child)}}


def full_megatron_shape(mapping: WeightMapping, c: ConversionContext) -> tuple[int, ...]:
    if isinstance(mapping, QKV):
        rows = (c.num_attention_heads + 2 * c.num_query_groups) * c.kv_channels
        return (rows,) if mapping is QKV_BIAS else (rows, c.hidden_size)
    if isinstance(mapping, VocabParallel):
        return (c.padded_vocab_size, c.hidden_size)
    return (16, c.hidden_size)


def test_every_kind_is_checked_by_the_load_shard_test():
    from lightning_bridge.conversion import mappings as m

    kinds = {cls for cls in all_subclasses(WeightMapping) if cls.__module__ == m.__name__}
    assert kinds | {WeightMapping} == {type(mapping) for mapping in every_kind()}


@pytest.mark.parametrize("mapping", every_kind(), ids=lambda m: m.kind)
@pytest.mark.parametrize("heads,groups", [(8, 4), (8, 2), (8, 1)], ids=["gqa", "gqa2", "mqa"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_load_shard_writes_exactly_the_shard_of_the_converted_tensor(mapping, heads, groups, tp):
    """Whatever path a kind takes (in place, or the full tensor when its split is uneven), every
    element of the parameter is written, with the values of ``shard(to_megatron(...))``."""
    c = ctx(heads, groups, head_dim=2, vocab=10, padded=16)
    hf = mapping.to_hf(randn(*full_megatron_shape(mapping, c), seed=tp), c)
    full = mapping.to_megatron(hf, c)
    for rank in range(tp):
        expected = mapping.shard(full, rank, tp)
        param = torch.full(expected.shape, float("nan"))
        mapping.load_shard(param, hf, c, rank, tp)
        assert torch.equal(param, expected), (mapping.kind, rank)


@pytest.mark.parametrize("mapping", [ROW, GATED, QKV_WEIGHT, VOCAB], ids=lambda m: m.kind)
def test_load_shard_refuses_a_parameter_of_another_shape_instead_of_broadcasting(mapping):
    c = ctx(8, 4, head_dim=2, vocab=10, padded=16)
    hf = mapping.to_hf(randn(*full_megatron_shape(mapping, c)), c)
    shape = list(mapping.to_megatron(hf, c).shape)
    shape[0] *= 2
    with pytest.raises(ValueError, match=r"converted tensor has shape .* but the Megatron parameter has .*"
                                         r"Please report it"):
        mapping.load_shard(torch.empty(shape), hf, c, 0, 1)


def test_a_mapping_restricted_to_layers_matches_only_them():
    """A model whose layers differ (dense first layers of a MoE model) restricts each table row."""
    dense = GatedMLP("decoder.layers.*.mlp.linear_fc1.weight",
                     ("model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight"),
                     layers=frozenset({0}))
    assert dense.match("decoder.layers.0.mlp.linear_fc1.weight") == ("0",)
    assert dense.match("decoder.layers.1.mlp.linear_fc1.weight") is None
    assert dense.match_hf("model.layers.0.mlp.up_proj.weight") == ("0",)
    assert dense.match_hf("model.layers.1.mlp.up_proj.weight") is None
    assert GatedMLP(dense.megatron, dense.hf).match("decoder.layers.1.mlp.linear_fc1.weight") == ("1",)
