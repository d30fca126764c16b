"""Tests for lightning_bridge.lora.layers: where each HF projection sits in a fused, split Megatron
layer (found by pushing row numbers through the weight mappings), checked against the layouts the
mappings document."""

from __future__ import annotations

import torch

from lightning_bridge.conversion.context import ConversionContext
from lightning_bridge.conversion.mappings import (
    QKV,
    FusedGatedMLP,
    GatedMLP,
    RowParallel,
    TransposedFusedQKV,
    TransposedRowParallel,
)
from lightning_bridge.lora import projection_layouts

# 4 query heads in 2 groups, head_dim 3: q 12 rows, k 6, v 6 -> linear_qkv 24 rows
CTX = ConversionContext(vocab_size=10, padded_vocab_size=10, num_attention_heads=4, num_query_groups=2,
                        kv_channels=3, hidden_size=5)


def test_qkv_rows_per_query_group_and_tensor_parallel_rank():
    mapping = QKV("l.*.qkv.weight", ("q.*.weight", "k.*.weight", "v.*.weight"))
    q, k, v = projection_layouts(mapping, ["q", "k", "v"], CTX, (24, 5), tp_rank=1, tp_size=2)
    # rank 1 holds query group 1: [q rows 6..11; k rows 3..5; v rows 3..5] at local 0..11
    assert q.rows.tolist() == list(range(6, 12)) and q.positions.tolist() == list(range(0, 6))
    assert k.rows.tolist() == [3, 4, 5] and k.positions.tolist() == [6, 7, 8]
    assert v.rows.tolist() == [3, 4, 5] and v.positions.tolist() == [9, 10, 11]
    assert q.columns is None and not q.fan_in_fan_out and (q.out_features, k.out_features) == (12, 6)


def test_gated_mlp_gate_and_up_split_separately():
    gate, up = projection_layouts(GatedMLP("fc1", ("gate", "up")), ["gate", "up"], CTX, (8, 5), 0, 2)
    assert gate.rows.tolist() == [0, 1] and gate.positions.tolist() == [0, 1]
    assert up.rows.tolist() == [0, 1] and up.positions.tolist() == [2, 3]
    (fused,) = projection_layouts(FusedGatedMLP("fc1", "gate_up"), ["gate_up"], CTX, (8, 5), 1, 2)
    assert fused.rows.tolist() == [2, 3, 6, 7] and fused.positions.tolist() == [0, 1, 2, 3]


def test_conv1d_fused_qkv_is_found_transposed():
    (c_attn,) = projection_layouts(TransposedFusedQKV("qkv", "c_attn"), ["c_attn"], CTX, (24, 5), 0, 2)
    assert c_attn.fan_in_fan_out and c_attn.out_features == 24
    # rank 0 holds group 0: HF q rows 0..5, k rows 12..14, v rows 18..20 of [q; k; v]
    assert c_attn.rows.tolist() == [0, 1, 2, 3, 4, 5, 12, 13, 14, 18, 19, 20]
    assert c_attn.positions.tolist() == list(range(12))


def test_row_parallel_splits_the_input_columns():
    (o,) = projection_layouts(RowParallel("proj", "o"), ["o"], CTX, (5, 12), 1, 2)
    assert o.rows.tolist() == list(range(5)) and o.positions.tolist() == list(range(5))
    assert o.columns.tolist() == list(range(6, 12)) and not o.fan_in_fan_out
    (c_proj,) = projection_layouts(TransposedRowParallel("proj", "c_proj"), ["c_proj"], CTX, (5, 12), 0, 2)
    assert c_proj.columns.tolist() == list(range(6)) and c_proj.fan_in_fan_out


def test_distributed_checkpoint_keeps_base_keys_and_round_trips_adapters(tmp_path, monkeypatch):
    """A LoRA model's torch_dist checkpoint: base tensors under the un-adapted model's keys, adapters
    beside them; loading it into a model with other adapters restores them bitwise."""
    import peft
    from factories import make_checkpoint
    from megatron.core import parallel_state as ps

    from lightning_bridge import AutoBridge
    from lightning_bridge.dist_checkpoint import load_model_weights, save_megatron_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bridge = AutoBridge.from_hf_pretrained(make_checkpoint("llama", tmp_path / "llama"), torch_dtype=torch.float32)
    plain = bridge.to_megatron_model(show_progress=False)
    plain_keys = set(plain[0].sharded_state_dict())
    config = peft.LoraConfig(r=2, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    bridge.apply_lora(plain, config, seed=1)
    keys = set(plain[0].sharded_state_dict())
    assert plain_keys <= keys
    assert "decoder.layers.0.self_attention.linear_qkv.adapters.q_proj.lora_A" in keys
    assert {k for k in plain[0].state_dict() if not k.endswith("_extra_state")} == \
        {k for k in keys if not k.endswith("_extra_state")}  # state_dict() names them alike
    saved = dict(bridge.export_adapter_weights(plain))
    save_megatron_checkpoint(plain, bridge, tmp_path / "megatron")
    ps.destroy_model_parallel()

    other = bridge.to_megatron_model(show_progress=False)
    bridge.apply_lora(other, config, seed=2)
    assert not all(torch.equal(t, saved[n]) for n, t in bridge.export_adapter_weights(other))
    load_model_weights(other, tmp_path / "megatron")
    restored = dict(bridge.export_adapter_weights(other))
    assert sorted(restored) == sorted(saved) and all(torch.equal(restored[n], saved[n]) for n in saved)
    ps.destroy_model_parallel()
