"""Phi-2: the output-layer bias, partial rotary, the parallel attention + MLP layer, and refusals."""

from __future__ import annotations

import pytest
import torch
import transformers
from factories import make_checkpoint, make_hf_config

from lightning_bridge import AutoBridge
from lightning_bridge.conversion.parallel import global_named_parameters, unwrap
from lightning_bridge.families.phi2 import ParallelAttentionMLPLayer
from lightning_bridge.hf_io import HFCheckpointReader
from lightning_bridge.verify import megatron_logits, relative_difference, transformers_logits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint("phi2", tmp_path_factory.mktemp("phi2") / "m")


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(checkpoint, input_ids) -> torch.Tensor:
    return transformers_logits(transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval(), input_ids)


def test_output_layer_bias_is_loaded_padded_with_zeros_and_exported(checkpoint, input_ids, reference):
    bridge = AutoBridge.from_hf_pretrained(checkpoint)
    (model,) = bridge.to_megatron_model()
    hf_bias = HFCheckpointReader(checkpoint).get("lm_head.bias")
    bias = dict(global_named_parameters(model))["output_layer.bias"]
    assert bias.shape == (128,) and getattr(bias, "tensor_model_parallel", False)  # padded to 128
    assert torch.equal(bias[:96], hf_bias) and not bias[96:].any()
    assert "output_layer.bias" in unwrap(model).sharded_state_dict()  # distributed checkpoints keep it
    exported = dict(bridge.export_hf_weights([model]))
    assert torch.equal(exported["lm_head.bias"], hf_bias)
    assert relative_difference(megatron_logits(model, input_ids), reference) <= 1e-5
    with torch.no_grad():
        bias.zero_()  # the bias is really added: without it the logits differ
    assert relative_difference(megatron_logits(model, input_ids), reference) > 1e-4


def test_tied_embeddings_keep_their_own_output_bias(tmp_path, input_ids):
    source = make_checkpoint("phi2", tmp_path / "source", tie_word_embeddings=True)
    bridge = AutoBridge.from_hf_pretrained(source)
    (model,) = bridge.to_megatron_model()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    assert relative_difference(megatron_logits(model, input_ids), transformers_logits(hf_model, input_ids)) <= 1e-5
    original, exported = HFCheckpointReader(source), dict(bridge.export_hf_weights([model]))
    assert sorted(exported) == original.names()  # lm_head.bias, no lm_head.weight
    assert all(torch.equal(tensor, original.get(name)) for name, tensor in exported.items())


def test_partial_rotary_rounds_down_like_transformers(checkpoint, input_ids, reference):
    """head_dim 16 x partial_rotary_factor 0.4 = 6.4: both rotate 6 dimensions with the same frequencies."""
    provider = AutoBridge.from_hf_pretrained(checkpoint).to_megatron_provider()
    assert provider.rotary_percent == 0.4
    (model,) = provider()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    assert hf_model.model.layers[0].self_attn.rotary_ndims == 6
    assert torch.equal(unwrap(model).rotary_pos_emb.inv_freq, hf_model.model.rotary_emb.inv_freq)
    provider.rotary_percent = 1.0
    assert relative_difference(megatron_logits(provider(), input_ids), reference) > 1e-4


def test_layers_run_attention_and_mlp_in_parallel_from_one_norm(checkpoint):
    provider = AutoBridge.from_hf_pretrained(checkpoint).to_megatron_provider(load_weights=False)
    provider.hidden_dropout = 0.0
    (model,) = provider()
    layer = unwrap(model).decoder.layers[0]
    assert isinstance(layer, ParallelAttentionMLPLayer)
    assert not any("pre_mlp_layernorm" in name for name, _ in layer.named_parameters())
    # one layer's output is x + attention(norm(x)) + mlp(norm(x))
    x = torch.randn(16, 2, 64)
    layer.eval()
    with torch.no_grad():
        rotary = unwrap(model).rotary_pos_emb(16)
        output, _ = layer(x, attention_mask=None, rotary_pos_emb=rotary)
        normed = layer.input_layernorm(x)
        attention, attention_bias = layer.self_attention(normed, attention_mask=None, rotary_pos_emb=rotary)
        mlp, mlp_bias = layer.mlp(normed)
    torch.testing.assert_close(output, attention + attention_bias + mlp + mlp_bias + x, rtol=0, atol=1e-6)


def test_dropouts_follow_the_hf_config():
    config = make_hf_config("phi2", resid_pdrop=0.1, embd_pdrop=0.05, attention_dropout=0.02)
    provider = AutoBridge.from_hf_config(config).to_megatron_provider()
    assert (provider.hidden_dropout, provider.attention_dropout) == (0.1, 0.02)
    (model,) = provider()
    assert unwrap(model).embedding.embedding_dropout.p == 0.05  # embd_pdrop, not resid_pdrop


@pytest.mark.parametrize("overrides,message", [
    ({"qk_layernorm": True}, r"PhiConfig with qk_layernorm=True is not supported"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0,
                          "partial_rotary_factor": 0.4}},
     r"PhiConfig with rope_type='linear' is not supported"),
])
def test_unsupported_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        AutoBridge.from_hf_config(make_hf_config("phi2", **overrides)).to_megatron_provider()
