"""Qwen3-MoE: routing with and without renormalisation, q/k norms, refusals of dense MLP layers.

The factory's Qwen3-MoE (norm_topk_prob=False) is also checked by test_families.py and, with
expert parallelism, by test_moe_parallel.py.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from factories import make_checkpoint, make_hf_config

from lightning_bridge import AutoBridge
from lightning_bridge.hf_io import HFCheckpointReader
from lightning_bridge.verify import megatron_logits, relative_difference, transformers_logits


@pytest.mark.parametrize("norm_topk_prob,top_k", [(True, 2), (False, 1)])  # (False, 2): test_families
def test_logits_match_with_and_without_renormalisation(tmp_path, norm_topk_prob, top_k):
    folder = make_checkpoint("qwen3-moe", tmp_path / "m", norm_topk_prob=norm_topk_prob, num_experts_per_tok=top_k)
    input_ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = transformers_logits(transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), input_ids)
    provider = AutoBridge.from_hf_pretrained(folder).to_megatron_provider(show_progress=False)
    assert provider.moe_router_pre_softmax is (not norm_topk_prob)
    assert provider.qk_layernorm and provider.moe_ffn_hidden_size == provider.ffn_hidden_size == 32
    assert relative_difference(megatron_logits(provider(), input_ids), reference) <= 1e-5
    if top_k > 1:  # the other routing is measurably wrong
        provider.moe_router_pre_softmax = norm_topk_prob
        assert relative_difference(megatron_logits(provider(), input_ids), reference) > 1e-4


def test_renormalised_model_round_trips_bitwise_and_loads_in_transformers(tmp_path):
    source = make_checkpoint("qwen3-moe", tmp_path / "source", norm_topk_prob=True)
    bridge = AutoBridge.from_hf_pretrained(source)
    saved = bridge.save_hf_pretrained(bridge.to_megatron_model(show_progress=False), tmp_path / "out",
                                      show_progress=False)
    original, result = HFCheckpointReader(source), HFCheckpointReader(saved)
    assert result.names() == original.names()
    assert all(torch.equal(result.get(name), original.get(name)) for name in original.names())
    assert any(".mlp.experts.3.down_proj." in name for name in original.names())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved)
    assert reloaded.config.norm_topk_prob is True


@pytest.mark.parametrize("overrides,message", [
    ({"decoder_sparse_step": 2},
     r"Qwen3MoeConfig with decoder_sparse_step=2 and mlp_only_layers=\[\] is not supported: only models"),
    ({"mlp_only_layers": [1]},
     r"Qwen3MoeConfig with decoder_sparse_step=1 and mlp_only_layers=\[1\] is not supported"),
    ({"num_experts_per_tok": 1, "norm_topk_prob": True},
     r"Qwen3MoeConfig with num_experts_per_tok=1 and renormalised routing weights is not supported"),
    ({"use_sliding_window": True}, r"Qwen3MoeConfig with use_sliding_window=True is not supported"),
], ids=["sparse-step", "mlp-only-layers", "top-1-renormalised", "sliding-window"])
def test_unmatched_features_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        AutoBridge.from_hf_config(make_hf_config("qwen3-moe", **overrides))
