"""Gemma: the settings it refuses (its logits and round trips: test_families, the parallel tests)."""

from __future__ import annotations

import pytest
from factories import make_hf_config

from lightning_bridge import AutoBridge


@pytest.mark.parametrize("overrides,message", [
    ({"use_bidirectional_attention": True},
     r"GemmaConfig with use_bidirectional_attention=True is not supported"),
    ({"attention_bias": True}, r"GemmaConfig with attention_bias=True is not supported"),
], ids=["bidirectional", "attention-bias"])
def test_unsupported_settings_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        AutoBridge.from_hf_config(make_hf_config("gemma", **overrides)).to_megatron_provider()
