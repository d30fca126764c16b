"""Gemma 2: each of its features is in the Megatron model and changes the logits; refused settings.

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
    return make_checkpoint("gemma2", tmp_path_factory.mktemp("gemma2") / "model")


@pytest.fixture(scope="module")
def reference(checkpoint, input_ids) -> torch.Tensor:
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    return transformers_logits(hf_model, input_ids)


def test_config_carries_every_gemma2_setting(checkpoint):
    provider = AutoBridge.from_hf_pretrained(checkpoint).to_megatron_provider()
    assert provider.softmax_scale == 32 ** -0.5  # query_pre_attn_scalar, not head_dim (24)
    assert provider.window_size == (3, 0)  # sliding_window=4: the query and 3 keys before it
    assert provider.window_attn_skip_freq == [1, 0]  # sliding, full
    assert provider.layer_spec.attn_logit_softcapping == 2.0
    assert provider.model_hook.cap == 3.0


@pytest.mark.parametrize("disable", ["attn_logit_softcapping", "final_logit_softcapping", "sliding_window",
                                     "query_pre_attn_scalar"])
def test_each_feature_is_needed_to_match_transformers(checkpoint, input_ids, reference, disable):
    """With all features the logits match; without any one of them they are measurably wrong."""
    provider = AutoBridge.from_hf_pretrained(checkpoint).to_megatron_provider()
    assert relative_difference(megatron_logits(provider(), input_ids), reference) <= 1e-5
    if disable == "attn_logit_softcapping":
        provider.layer_spec = dataclasses.replace(provider.layer_spec, attn_logit_softcapping=None)
    elif disable == "final_logit_softcapping":
        provider.model_hook = None
    elif disable == "sliding_window":
        provider.window_size, provider.window_attn_skip_freq = None, None
    else:
        provider.softmax_scale = None  # head_dim ** -0.5
    assert relative_difference(megatron_logits(provider(), input_ids), reference) > 1e-3


def test_final_logits_are_soft_capped(checkpoint, input_ids, reference):
    logits = megatron_logits(AutoBridge.from_hf_pretrained(checkpoint).to_megatron_model(), input_ids)
    assert logits.abs().max() < 3.0
    assert logits.abs().max() > 2.9  # the cap is active on this model, not just an upper bound


def test_training_loss_sees_soft_capped_logits_and_backpropagates(checkpoint, input_ids):
    """The loss the strategy computes from the model's output equals transformers' loss."""
    model = AutoBridge.from_hf_pretrained(checkpoint).to_megatron_model()[0].train()
    batch = {"input_ids": input_ids}
    logits = model(input_ids, torch.arange(16).expand(2, 16), None)
    total, tokens = causal_lm_loss(logits, *next_token_targets(batch), vocab_size=96)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    expected = hf(input_ids, labels=input_ids).loss
    torch.testing.assert_close(total / tokens, expected, rtol=1e-5, atol=0)
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    missing = [name for name, grad in grads.items() if grad is None or not grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("overrides,message", [
    ({"use_bidirectional_attention": True},
     r"Gemma2Config with use_bidirectional_attention=True is not supported"),
    ({"attention_bias": True}, r"Gemma2Config with attention_bias=True is not supported"),
    ({"layer_types": ["sliding_attention", "chunked_attention"]},
     (r"Gemma2Config with layer_types \['chunked_attention'\] is not supported; supported layer types: "
      r"\['sliding_attention', 'full_attention'\]\.")),
], ids=["bidirectional", "attention-bias", "layer-types"])
def test_unsupported_settings_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        AutoBridge.from_hf_config(make_hf_config("gemma2", **overrides)).to_megatron_provider()
