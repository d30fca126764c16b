"""DeepSeek-V3: multi-latent attention settings each matter, positions restart, refusals by name.

The factory's DeepSeek-V3 models (q compressed with YaRN; one q projection with plain rope) are also
checked by test_families.py (logits, bitwise round trip) and, at TP=2 / PP=2 / EP=2, by
test_moe_parallel.py.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from factories import make_checkpoint, make_hf_config
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_config import MLATransformerConfig

from lightning_bridge import AutoBridge
from lightning_bridge.dist_checkpoint import load_megatron_model, save_megatron_checkpoint
from lightning_bridge.families.deepseek_v3 import DeepseekV3Bridge
from lightning_bridge.hf_io import HFCheckpointReader
from lightning_bridge.verify import megatron_logits, relative_difference, transformers_logits

INPUT_IDS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


def test_every_attention_setting_is_carried_over(tmp_path):
    folder = make_checkpoint("deepseek-v3", tmp_path / "m")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    reference = transformers_logits(hf_model, INPUT_IDS)
    bridge = AutoBridge.from_hf_pretrained(folder)
    provider = bridge.to_megatron_provider(show_progress=False)
    assert isinstance(provider, MLATransformerConfig) and provider.multi_latent_attention
    assert (provider.q_lora_rank, provider.kv_lora_rank, provider.qk_head_dim, provider.qk_pos_emb_head_dim,
            provider.v_head_dim) == (48, 32, 16, 8, 16)
    assert (provider.rope_type, provider.rotary_scaling_factor, provider.mscale, provider.mscale_all_dim) == (
        "yarn", 4.0, 1.0, 1.0)
    assert provider.moe_layer_freq == [0, 1, 1, 1]
    assert relative_difference(megatron_logits(provider(), INPUT_IDS), reference) <= 1e-5
    for wrong in [{"rope_type": "rope"}, {"mscale_all_dim": 0.0}, {"mscale": 2.0}]:
        provider = bridge.to_megatron_provider(show_progress=False)
        for field, value in wrong.items():
            setattr(provider, field, value)
        assert relative_difference(megatron_logits(provider(), INPUT_IDS), reference) > 1e-4, wrong


def test_without_q_compression_one_q_projection(tmp_path):
    folder = make_checkpoint("deepseek-v3-q", tmp_path / "m")
    (chunk,) = AutoBridge.from_hf_pretrained(folder).to_megatron_model(show_progress=False)
    attention = chunk.decoder.layers[0].self_attention
    assert attention.linear_q_proj.weight.shape == (4 * 24, 64)
    assert not hasattr(attention, "linear_q_down_proj")


def test_packed_positions_restart_in_every_layers_rotary_embedding(tmp_path):
    """Two examples packed in one row, each numbered from 0: position_ids reach MLA's YaRN rope."""
    folder = make_checkpoint("deepseek-v3", tmp_path / "m")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    (chunk,) = AutoBridge.from_hf_pretrained(folder).to_megatron_model(show_progress=False)
    chunk.eval()
    positions = torch.cat([torch.arange(6), torch.arange(10)]).expand(2, 16)
    with torch.no_grad():
        ours = chunk(INPUT_IDS, positions, None)[..., :96]
        # an all-ones mask: transformers would otherwise make the packed examples block-diagonal
        reference = hf_model(INPUT_IDS, attention_mask=torch.ones_like(INPUT_IDS),
                             position_ids=positions).logits
        unpacked = chunk(INPUT_IDS, torch.arange(16).expand(2, 16), None)[..., :96]
    assert relative_difference(ours, reference) <= 1e-5
    assert relative_difference(unpacked, reference) > 1e-4


def test_multi_token_prediction_layers_are_skipped():
    bridge = DeepseekV3Bridge(make_hf_config("deepseek-v3", num_nextn_predict_layers=1))
    assert "model.layers.4.*" in bridge.ignored_hf_patterns


def test_tensor_parallelism_must_divide_the_compressed_query():
    provider = DeepseekV3Bridge(make_hf_config("deepseek-v3", q_lora_rank=47)).provider()
    provider.tensor_model_parallel_size = 2
    with pytest.raises(ValueError, match=r"does not divide q_lora_rank=47"):
        provider()


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize("overrides,message", [
    (dict(rope_interleave=False), r"rope_interleave=False is not supported"),
    (dict(attention_bias=True), r"attention_bias=True is not supported"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
     r"rope_type='linear' is not supported"),
    (dict(rope_parameters={**YARN, "attention_factor": 1.2}), r"YaRN attention_factor is not supported"),
    (dict(rope_parameters={**YARN, "truncate": False}), r"YaRN truncate=False is not supported"),
    (dict(rope_parameters={**YARN, "mscale_all_dim": 1.0}), r"mscale_all_dim without mscale"),
    (dict(norm_topk_prob=False), r"norm_topk_prob=False is not supported"),
])
def test_refusals_name_the_setting(overrides, message):
    with pytest.raises(ValueError, match=message):
        DeepseekV3Bridge(make_hf_config("deepseek-v3", **overrides)).provider()


def test_megatron_checkpoint_round_trip_is_bitwise(tmp_path):
    """A Megatron distributed checkpoint of the MLA model (the replicated kv down projection among its
    shards) loads back into an MLA provider, and exports the source bitwise."""
    source = make_checkpoint("deepseek-v3", tmp_path / "hf")
    bridge = AutoBridge.from_hf_pretrained(source)
    chunks = bridge.to_megatron_model(show_progress=False)
    path = save_megatron_checkpoint(chunks, bridge, tmp_path / "megatron")
    ps.destroy_model_parallel()
    bridge, chunks = load_megatron_model(path)
    try:
        exported = dict(bridge.export_hf_weights(chunks))
    finally:
        ps.destroy_model_parallel()
    reader = HFCheckpointReader(source)
    assert sorted(exported) == sorted(reader.names())
    assert all(torch.equal(tensor, reader.get(name)) for name, tensor in exported.items())
