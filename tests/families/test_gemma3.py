"""Gemma 3 (text): per-layer-type rope, q/k norms, the sliding pattern; the multimodal model refused.

Logits, round trips and TP/PP layouts of the factory model: test_families, test_families_parallel.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from factories import make_checkpoint, make_hf_config

from lightning_bridge import AutoBridge
from lightning_bridge.module import causal_lm_loss, next_token_targets
from lightning_bridge.verify import megatron_logits, relative_difference, transformers_logits


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint("gemma3", tmp_path_factory.mktemp("gemma3") / "model")


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def reference(hf_model, input_ids) -> torch.Tensor:
    return transformers_logits(hf_model, input_ids)


def test_config_carries_each_layer_types_rope_and_window(checkpoint, hf_model):
    provider = AutoBridge.from_hf_pretrained(checkpoint).to_megatron_provider()
    rotary = hf_model.model.rotary_emb
    assert torch.equal(provider.rotary_inv_freq, rotary.full_attention_inv_freq)  # linear-scaled, base 1e6
    assert torch.equal(provider.layer_spec.local_rotary_inv_freq, rotary.sliding_attention_inv_freq)
    assert provider.window_attn_skip_freq == [1, 1, 0, 1]  # sliding_window_pattern=3
    assert provider.window_size == (3, 0)
    assert provider.qk_layernorm and provider.model_hook is None  # final_logit_softcapping=None


@pytest.mark.parametrize("disable", ["local_rope", "sliding_window", "qk_norm"])
def test_each_feature_is_needed_to_match_transformers(checkpoint, input_ids, reference, disable):
    """With all features the logits match; without any one of them they are measurably wrong."""
    provider = AutoBridge.from_hf_pretrained(checkpoint).to_megatron_provider()
    assert relative_difference(megatron_logits(provider(), input_ids), reference) <= 1e-5
    if disable == "local_rope":  # sliding layers would use the full layers' rope
        provider.layer_spec = dataclasses.replace(provider.layer_spec, local_rotary_inv_freq=None)
    elif disable == "sliding_window":
        provider.window_size, provider.window_attn_skip_freq = None, None
    else:
        model = provider()
        for name, param in model[0].named_parameters():
            if "q_layernorm" in name or "k_layernorm" in name:
                param.data.zero_()  # plain per-head RMSNorm, without the checkpoint's weights
        assert relative_difference(megatron_logits(model, input_ids), reference) > 1e-3
        return
    assert relative_difference(megatron_logits(provider(), input_ids), reference) > 1e-3


def test_final_logit_softcapping_when_set_and_attention_softcapping_ignored_as_transformers_does(
        tmp_path, input_ids):
    folder = make_checkpoint("gemma3", tmp_path / "m", final_logit_softcapping=2.0,
                             attn_logit_softcapping=0.5)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    reference = transformers_logits(hf_model, input_ids)
    logits = megatron_logits(AutoBridge.from_hf_pretrained(folder).to_megatron_model(), input_ids)
    assert relative_difference(logits, reference) <= 1e-5
    assert 1.9 < logits.abs().max() < 2.0  # capped (uncapped, they reach 6)


def test_training_loss_matches_transformers_and_backpropagates(checkpoint, input_ids):
    model = AutoBridge.from_hf_pretrained(checkpoint).to_megatron_model()[0].train()
    logits = model(input_ids, torch.arange(16).expand(2, 16), None)
    total, tokens = causal_lm_loss(logits, *next_token_targets({"input_ids": input_ids}), vocab_size=96)
    expected = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)(input_ids, labels=input_ids).loss
    torch.testing.assert_close(total / tokens, expected, rtol=1e-5, atol=0)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_multimodal_gemma3_is_refused_naming_the_text_only_model():
    config = transformers.Gemma3Config(text_config=make_hf_config("gemma3").to_dict(),
                                       architectures=["Gemma3ForConditionalGeneration"])
    message = (r"Gemma3ForConditionalGeneration \(Gemma 3 with its vision tower\) is not supported: "
               r"only the text-only Gemma3ForCausalLM")
    with pytest.raises(ValueError, match=message):
        AutoBridge.from_hf_config(config)
    assert not AutoBridge.can_handle(config)
    assert "Gemma3ForConditionalGeneration" not in AutoBridge.list_supported_models()
    assert "Gemma3ForCausalLM" in AutoBridge.list_supported_models()


@pytest.mark.parametrize("overrides,message", [
    ({"use_bidirectional_attention": True},
     r"Gemma3TextConfig with use_bidirectional_attention=True is not supported"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     r"Gemma3TextConfig with rope_type='yarn' for full_attention layers is not supported"),
], ids=["bidirectional", "yarn"])
def test_unsupported_settings_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        AutoBridge.from_hf_config(make_hf_config("gemma3", **overrides))
