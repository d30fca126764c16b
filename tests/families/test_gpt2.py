"""GPT-2: the settings it supports beyond the defaults, the ones it refuses, and old checkpoints."""

from __future__ import annotations

import pytest
import torch
import transformers
from factories import make_checkpoint, make_hf_config
from safetensors.torch import load_file, save_file

from lightning_bridge import AutoBridge
from lightning_bridge.verify import megatron_logits, relative_difference, transformers_logits

INPUT_IDS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


def logits_difference(folder) -> float:
    model = AutoBridge.from_hf_pretrained(folder).to_megatron_model(show_progress=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return relative_difference(megatron_logits(model, INPUT_IDS), transformers_logits(reference, INPUT_IDS))


@pytest.mark.parametrize("overrides", [
    dict(scale_attn_weights=False),
    dict(activation_function="relu", n_inner=96),
    dict(tie_word_embeddings=False),
], ids=["unscaled-attention", "relu-n_inner", "untied-head"])
def test_logits_match_transformers_with(overrides, tmp_path):
    assert logits_difference(make_checkpoint("gpt2", tmp_path / "m", **overrides)) <= 1e-5


def test_causal_mask_buffers_of_old_checkpoints_are_ignored(tmp_path):
    folder = make_checkpoint("gpt2", tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert logits_difference(folder) <= 1e-5


@pytest.mark.parametrize("overrides,message", [
    (dict(scale_attn_by_inverse_layer_idx=True),
     r"GPT2Config with scale_attn_by_inverse_layer_idx=True is not supported"),
    (dict(add_cross_attention=True), r"GPT2Config with add_cross_attention=True is not supported"),
    (dict(activation_function="gelu_fast"), r"activation_function='gelu_fast' is not supported"),
], ids=["inverse-layer-idx-scaling", "cross-attention", "activation"])
def test_unsupported_settings_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        AutoBridge.from_hf_config(make_hf_config("gpt2", **overrides))
