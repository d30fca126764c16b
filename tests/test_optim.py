"""Megatron's optimizer with torch's fused AdamW where its parameters are on CUDA."""

from __future__ import annotations

import pytest
import torch

from lightning_bridge.optim import step_tensor, use_fused_adam


def test_cpu_parameters_keep_the_default_adam():
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.AdamW(params)
    assert not use_fused_adam(optimizer)
    assert optimizer.defaults["fused"] is None
    assert step_tensor(3, optimizer, params[0]).device.type == "cpu"


def test_an_optimizer_with_state_is_left_alone():
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones(3)
    optimizer.step()
    assert not use_fused_adam(optimizer)


@pytest.mark.gpu
def test_cuda_parameters_get_the_fused_kernel_with_the_same_update():
    torch.manual_seed(0)
    start, grad = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    results = []
    for fused in (False, True):
        param = torch.nn.Parameter(start.clone())
        optimizer = torch.optim.AdamW([param], lr=1e-2)
        assert use_fused_adam(optimizer) if fused else True
        for _ in range(3):
            param.grad = grad.clone()
            optimizer.step()
        results.append(param.detach())
        if fused:
            assert optimizer.param_groups[0]["fused"]
            assert step_tensor(3, optimizer, param).device.type == "cuda"
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)
