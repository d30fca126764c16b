"""Tests for lightning_bridge.experts: grouped-GEMM experts with SequentialMLP's parameters.

On the CPU the experts run one after another (the grouped kernel is CUDA-only): the family tests
check their logits; ``tests/test_gpu.py`` compares the grouped path with the sequential one on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from factories import make_checkpoint

from lightning_bridge import AutoBridge
from lightning_bridge.experts import GroupedExperts


def test_moe_layers_get_grouped_experts_with_sequential_parameter_names(tmp_path):
    source = make_checkpoint("mixtral", tmp_path / "mixtral")
    model = AutoBridge.from_hf_pretrained(source).to_megatron_model(show_progress=False)[0]
    experts = model.decoder.layers[0].mlp.experts
    assert isinstance(experts, GroupedExperts)
    assert [n for n, _ in experts.named_parameters()][:2] == ["local_experts.0.linear_fc1.weight",
                                                              "local_experts.0.linear_fc2.weight"]


def test_cpu_experts_run_one_after_another_whatever_the_backend(tmp_path):
    source = make_checkpoint("mixtral", tmp_path / "mixtral")
    model = AutoBridge.from_hf_pretrained(source).to_megatron_model(show_progress=False)[0]
    experts = model.decoder.layers[0].mlp.experts
    counts = torch.tensor([3, 0, 2, 4][:experts.num_local_experts])
    hidden, probs = torch.randn(int(counts.sum()), experts.config.hidden_size), torch.rand(int(counts.sum()))
    outputs = []
    for backend in ("grouped", "sequential"):
        experts.config.expert_backend = backend
        outputs.append(experts(hidden, counts, probs)[0])
    assert torch.equal(outputs[0], outputs[1])


def test_an_unknown_expert_backend_is_refused_by_name(tmp_path):
    provider = AutoBridge.from_hf_pretrained(make_checkpoint("mixtral", tmp_path / "m")).to_megatron_provider(
        load_weights=False)
    provider.expert_backend = "triton"
    with pytest.raises(ValueError, match=r"expert_backend='triton' is not one of .*Use 'auto'"):
        provider(wrap_with_ddp=False)
