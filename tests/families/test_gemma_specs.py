"""The Gemma 2/3 spec pieces of ``families.gemma_specs``, against transformers' own functions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

SEQ, BATCH, HEADS, GROUPS, HEAD_DIM, WINDOW, CAP = 16, 2, 4, 2, 24, 4, 2.0


def hf_mask(window: int | None) -> torch.Tensor:
    """transformers' additive mask: causal, and for sliding layers q - k < window."""
    q, k = torch.arange(SEQ)[:, None], torch.arange(SEQ)[None, :]
    allowed = (k <= q) & ((q - k < window) if window else True)
    mask = torch.zeros(SEQ, SEQ).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return mask.expand(BATCH, 1, SEQ, SEQ)


@pytest.mark.parametrize("layer_number,window", [(1, WINDOW), (2, None)], ids=["sliding", "full"])
def test_softcapped_attention_is_transformers_eager_attention(layer_number, window):
    """Scale query_pre_attn_scalar ** -0.5, soft-capped scores, the window on layer 1 only (GQA)."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from lightning_bridge.distributed import initialize_model_parallel
    from lightning_bridge.families.gemma_specs import SoftcappedDotProductAttention

    initialize_model_parallel()
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, kv_channels=HEAD_DIM, softmax_scale=32 ** -0.5,
                               window_size=(WINDOW - 1, 0), window_attn_skip_freq=[1, 0],
                               masked_softmax_fusion=False, attention_dropout=0.0,
                               use_cpu_initialization=True)
    attention = SoftcappedDotProductAttention(config, layer_number=layer_number,
                                              attn_mask_type=AttnMaskType.causal, attention_type="self",
                                              softmax_scale=config.softmax_scale, softcap=CAP)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (3 * torch.randn(SEQ, BATCH, heads, HEAD_DIM, generator=generator)
               for heads in (HEADS, GROUPS, GROUPS))
    ours = attention(q, k, v, None)
    module = SimpleNamespace(num_key_value_groups=HEADS // GROUPS, training=False, head_dim=HEAD_DIM)
    heads_first = [t.permute(1, 2, 0, 3) for t in (q, k, v)]  # transformers' [batch, heads, seq, dim]
    theirs, _ = eager_attention_forward(module, *heads_first, hf_mask(window), scaling=32 ** -0.5,
                                        softcap=CAP)
    torch.testing.assert_close(ours, theirs.transpose(0, 1).reshape(SEQ, BATCH, -1), rtol=1e-6, atol=1e-6)
    uncapped, _ = eager_attention_forward(module, *heads_first, hf_mask(window), scaling=32 ** -0.5,
                                          softcap=None)
    assert not torch.allclose(theirs, uncapped, atol=1e-3)  # the cap is active at these score sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_is_transformers_final_logit_softcapping_bitwise(dtype):
    from lightning_bridge.families.gemma_specs import softcap

    logits = (10 * torch.randn(4, 96, generator=torch.Generator().manual_seed(0))).to(dtype)
    expected = torch.tanh(logits / 3.0) * 3.0  # Gemma2ForCausalLM.forward
    assert torch.equal(softcap(logits, 3.0), expected)
