"""GLM-4.5 MoE: the routing settings each matter, the dense first layers, refusals by name.

The factory's GLM-4.5 (grouped sigmoid routing, correction bias, scaling, shared expert, a dense
first layer, half rotary, q/k norm, q/k/v biases) is also checked by test_families.py and, with
expert parallelism, by test_moe_parallel.py.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from factories import make_checkpoint, make_hf_config

from lightning_bridge import AutoBridge
from lightning_bridge.families.glm4_moe import Glm4MoeBridge
from lightning_bridge.verify import megatron_logits, relative_difference, transformers_logits


def test_every_routing_setting_is_carried_over(tmp_path):
    folder = make_checkpoint("glm4-moe", tmp_path / "m")
    input_ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    reference = transformers_logits(hf_model, input_ids)
    bridge = AutoBridge.from_hf_pretrained(folder)
    provider = bridge.to_megatron_provider(show_progress=False)
    assert provider.moe_layer_freq == [0, 1, 1, 1] and provider.rotary_percent == 0.5
    assert (provider.moe_router_num_groups, provider.moe_router_group_topk) == (2, 1)
    assert relative_difference(megatron_logits(provider(), input_ids), reference) <= 1e-5
    for wrong in [{"moe_router_topk_scaling_factor": None}, {"moe_router_enable_expert_bias": False},
                  {"moe_router_num_groups": None, "moe_router_group_topk": None}]:
        provider = bridge.to_megatron_provider(show_progress=False)
        for field, value in wrong.items():
            setattr(provider, field, value)
        assert relative_difference(megatron_logits(provider(), input_ids), reference) > 1e-4, wrong

def test_multi_token_prediction_layers_are_skipped(tmp_path):
    bridge = Glm4MoeBridge(make_hf_config("glm4-moe", num_nextn_predict_layers=1))
    assert "model.layers.4.*" in bridge.ignored_hf_patterns


@pytest.mark.parametrize("overrides,message", [
    (dict(norm_topk_prob=False), r"norm_topk_prob=False is not supported"),
    (dict(num_experts_per_tok=1, n_group=1), r"num_experts_per_tok=1 and renormalised"),
    (dict(n_group=2, topk_group=2, num_experts_per_tok=2), r"n_group=2, topk_group=2 .* Use n_group=1"),
    (dict(n_shared_experts=0), r"n_shared_experts=0 is not supported"),
])
def test_refusals_name_the_setting(overrides, message):
    with pytest.raises(ValueError, match=message):
        Glm4MoeBridge(make_hf_config("glm4-moe", **overrides)).provider()
