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


class FixedMask(torch.nn.Module):
    """A dropout stand-in with one fixed mask, so two implementations drop the same elements."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def test_dora_while_training_with_dropout_matches_peft(tmp_path, monkeypatch):
    """DoRA's training path (base result recomputed on the dropped-out input) against PEFT's
    ``lora.Linear``, for a column-parallel part of ``linear_qkv`` and the row-parallel ``linear_proj``."""
    import peft
    from factories import make_checkpoint
    from megatron.core import parallel_state as ps

    from lightning_bridge import AutoBridge

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bridge = AutoBridge.from_hf_pretrained(make_checkpoint("llama", tmp_path / "llama"), torch_dtype=torch.float32)
    model = bridge.to_megatron_model(show_progress=False)
    bridge.apply_lora(model, peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, use_dora=True,
                                             target_modules=["k_proj", "o_proj"], init_lora_weights=False))
    attention = model[0].decoder.layers[0].self_attention
    generator = torch.Generator().manual_seed(0)
    for layer, name in ((attention.linear_qkv, "k_proj"), (attention.linear_proj, "o_proj")):
        adapter = layer.adapters[name]
        rows, positions = adapter.rows, adapter.positions
        base = torch.nn.Linear(adapter.in_features, adapter.out_features, bias=False)
        with torch.no_grad():
            base.weight[rows] = layer.base_layer.weight[positions]
        holder = torch.nn.Module()
        holder.proj = base
        reference = peft.get_peft_model(holder, peft.LoraConfig(
            r=2, lora_alpha=4, lora_dropout=0.5, use_dora=True, target_modules=["proj"])).base_model.model.proj
        with torch.no_grad():
            reference.lora_A["default"].weight.copy_(adapter.lora_A)
            reference.lora_B["default"].weight[rows] = adapter.lora_B
            reference.lora_magnitude_vector["default"].weight[rows] = adapter.lora_magnitude_vector
        mask = (torch.rand(5, 2, adapter.in_features, generator=generator) > 0.5).float() * 2
        adapter.dropout = reference.lora_dropout["default"] = FixedMask(mask)
        layer.train()
        reference.train()
        x = torch.randn(5, 2, adapter.in_features, generator=generator)
        ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = layer(ours_x)[0][..., positions]
        theirs = reference(theirs_x)[..., rows]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        weights = torch.randn(ours.shape, generator=generator)
        (ours * weights).sum().backward()
        (theirs * weights).sum().backward()
        torch.testing.assert_close(ours_x.grad, theirs_x.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(adapter.lora_A.grad, reference.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(adapter.lora_B.grad, reference.lora_B["default"].weight.grad[rows],
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(adapter.lora_magnitude_vector.grad,
                                   reference.lora_magnitude_vector["default"].weight.grad[rows], rtol=1e-5, atol=1e-6)
    ps.destroy_model_parallel()
