"""TorchNorm: megatron-core's WrappedTorchNorm, allowed under sequence parallelism."""

from __future__ import annotations

import pytest
import torch
from factories import make_hf_config

from lightning_bridge import AutoBridge
from lightning_bridge.norms import TorchNorm, mark_sequence_parallel


def _config(**fields):
    config = AutoBridge.from_hf_config(make_hf_config("llama")).transformer_config
    for key, value in fields.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize("normalization,cls", [("RMSNorm", torch.nn.RMSNorm), ("LayerNorm", torch.nn.LayerNorm)])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_torch_norm_is_the_torch_module_marked_for_sequence_parallelism(normalization, cls, sequence_parallel):
    norm = TorchNorm(_config(normalization=normalization, sequence_parallel=sequence_parallel), 64, eps=1e-6)
    assert type(norm) is cls and norm.eps == 1e-6 and norm.weight.shape == (64,)
    assert all(param.sequence_parallel is sequence_parallel for param in norm.parameters())
    x = torch.randn(3, 64)
    assert torch.equal(norm(x), cls(64, eps=1e-6)(x))  # same numerics as a fresh torch norm


def test_torch_norm_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match=r"normalization='Other' is not supported.*'LayerNorm', 'RMSNorm'"):
        TorchNorm(_config(normalization="Other"), 64)
    with pytest.raises(ValueError, match="ZeroCenteredRMSNorm"):
        TorchNorm(_config(layernorm_zero_centered_gamma=True), 64)


def test_mark_sequence_parallel_marks_every_parameter():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    assert mark_sequence_parallel(module, _config(sequence_parallel=True)) is module
    assert [param.sequence_parallel for param in module.parameters()] == [True] * 4
