"""Every family: Megatron logits equal transformers', and HF -> Megatron -> HF is bitwise exact."""

from __future__ import annotations

import pytest
import torch
import transformers
from factories import FAMILIES, make_checkpoint

from lightning_bridge import AutoBridge, CausalLMBridge
from lightning_bridge.hf_io import HFCheckpointReader
from lightning_bridge.verify import megatron_logits, relative_difference, transformers_logits


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, tmp_path, input_ids):
    folder = make_checkpoint(family, tmp_path / family)
    model = AutoBridge.from_hf_pretrained(folder).to_megatron_model()
    reference = transformers_logits(transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), input_ids)
    assert relative_difference(megatron_logits(model, input_ids), reference) <= 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_is_bitwise_and_loads_in_transformers(family, tmp_path):
    source = make_checkpoint(family, tmp_path / "source")
    bridge = AutoBridge.from_hf_pretrained(source)
    model = bridge.to_megatron_model()
    saved = bridge.save_hf_pretrained(model, tmp_path / "out", show_progress=False)

    original, result = HFCheckpointReader(source), HFCheckpointReader(saved)
    assert result.names() == original.names()
    for name in original.names():
        assert torch.equal(result.get(name), original.get(name)), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved)
    expected = transformers.AutoModelForCausalLM.from_pretrained(source)
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(a, b), name


def test_every_supported_architecture_has_a_tested_tiny_model():
    """list_supported_models() is exactly what FAMILIES covers: an untested registration fails here."""
    tested = sorted({model_cls.__name__ for _, model_cls, _ in FAMILIES.values()})
    assert CausalLMBridge.list_supported_models() == tested


def test_bf16_checkpoint_round_trips_in_bf16(tmp_path):
    source = make_checkpoint("llama", tmp_path / "source", dtype=torch.bfloat16)
    bridge = AutoBridge.from_hf_pretrained(source, torch_dtype=torch.float32)
    model = bridge.to_megatron_model()
    exported = dict(bridge.export_hf_weights(model))
    original = HFCheckpointReader(source)
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, original.get(n)) for n, t in exported.items())


def test_sharded_source_keeps_its_shards(tmp_path):
    source = make_checkpoint("llama", tmp_path / "source", max_shard_size="20KB")
    original = HFCheckpointReader(source)
    assert original.has_index and len(set(original.weight_map.values())) > 1
    bridge = AutoBridge.from_hf_pretrained(source)
    saved = bridge.save_hf_weights(bridge.to_megatron_model(), tmp_path / "out", show_progress=False)
    assert HFCheckpointReader(saved).weight_map == original.weight_map


def test_llama31_rope_scaling_is_applied(tmp_path, input_ids):
    """The llama3 frequencies are carried over: without them the logits would differ."""
    folder = make_checkpoint("llama3.1", tmp_path / "m")
    provider = AutoBridge.from_hf_pretrained(folder).to_megatron_provider()
    assert provider.rotary_inv_freq is not None
    plain = AutoBridge.from_hf_pretrained(folder).to_megatron_provider()
    plain.rotary_inv_freq = None
    reference = transformers_logits(transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), input_ids)
    assert relative_difference(megatron_logits(provider(), input_ids), reference) <= 1e-5
    # the same weights without the scaled frequencies are measurably wrong
    from megatron.core import parallel_state as ps  # noqa: F401
    assert relative_difference(megatron_logits(plain(), input_ids), reference) > 1e-4
