"""Phi-3: partial rotary embeddings and the sliding window are carried over; longrope is refused."""

from __future__ import annotations

import pytest
import torch
import transformers
from factories import make_checkpoint, make_hf_config

from lightning_bridge import AutoBridge
from lightning_bridge.verify import megatron_logits, relative_difference, transformers_logits


@pytest.mark.parametrize("field,plain", [("rotary_percent", 1.0), ("window_size", None)])
def test_partial_rotary_and_sliding_window_are_applied(tmp_path, field, plain):
    """The factory's Phi-3 rotates half of each head and sees 5 tokens: without either the logits differ."""
    folder = make_checkpoint("phi3", tmp_path / "m")
    input_ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    reference = transformers_logits(hf_model, input_ids)
    provider = AutoBridge.from_hf_pretrained(folder).to_megatron_provider(show_progress=False)
    assert provider.rotary_percent == 0.5 and provider.window_size == (4, 0)
    assert relative_difference(megatron_logits(provider(), input_ids), reference) <= 1e-5
    setattr(provider, field, plain)
    assert relative_difference(megatron_logits(provider(), input_ids), reference) > 1e-4


def test_longrope_is_refused():
    config = make_hf_config("phi3", rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
        "original_max_position_embeddings": 64, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match=r"rope_type='longrope' is not supported"):
        AutoBridge.from_hf_config(config)
