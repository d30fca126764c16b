"""The layer-spec modules of ``families.specs``: exact alone, and on 2 gloo ranks under tensor parallelism."""

from __future__ import annotations

import pytest
import torch
from processes import launch

HEADS, HEAD_DIM, EPS = 4, 8, 1e-6


def full_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [seq, batch, heads, head_dim], the norm weight, and an upstream gradient for x's shape."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, HEADS, HEAD_DIM, generator=generator)
    weight = 1 + 0.1 * torch.randn(HEADS * HEAD_DIM, generator=generator)
    return x, weight, torch.randn(3, 2, HEADS, HEAD_DIM, generator=generator)


def projection_norm_on_this_rank() -> dict[str, torch.Tensor]:
    """This rank's output and gradients of a ProjectionRMSNorm over its half of the heads."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    from lightning_bridge.distributed import initialize_model_parallel
    from lightning_bridge.families.specs import ProjectionRMSNorm

    initialize_model_parallel(tensor_model_parallel_size=2)
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               tensor_model_parallel_size=2, use_cpu_initialization=True)
    norm = ProjectionRMSNorm(config, hidden_size=HEAD_DIM, eps=EPS, heads="num_attention_heads")
    x, weight, upstream = full_inputs()
    rank = ps.get_tensor_model_parallel_rank()
    mine = slice(rank * HEADS // 2, (rank + 1) * HEADS // 2)
    with torch.no_grad():
        norm.weight.copy_(weight)  # whole on every rank
    local_x = x[:, :, mine].clone().requires_grad_()
    out = norm(local_x)
    (out * upstream[:, :, mine]).sum().backward()
    return {"out": out.detach(), "x_grad": local_x.grad, "weight_grad": norm.weight.grad,
            "tensor_model_parallel": getattr(norm.weight, "tensor_model_parallel", False)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, torch.Tensor]]:
    return launch(projection_norm_on_this_rank, 2)


def reference() -> dict[str, torch.Tensor]:
    """OLMo 2's q_norm on the whole projection, as transformers computes it."""
    x, weight, upstream = full_inputs()
    x = x.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    flat = x.reshape(3, 2, -1)
    out = weight * (flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + EPS))
    (out.view_as(x) * upstream).sum().backward()
    return {"out": out.detach().view_as(x), "x_grad": x.grad, "weight_grad": weight.grad}


def test_projection_rms_norm_is_the_whole_projections_norm_on_two_ranks(two_ranks):
    expected = reference()
    out = torch.cat([r["out"] for r in two_ranks], dim=2)
    x_grad = torch.cat([r["x_grad"] for r in two_ranks], dim=2)
    # each rank's weight gradient covers its heads only; Megatron sums q/k-norm gradients over TP
    half = HEADS * HEAD_DIM // 2
    assert not two_ranks[0]["weight_grad"][half:].any() and not two_ranks[1]["weight_grad"][:half].any()
    weight_grad = two_ranks[0]["weight_grad"] + two_ranks[1]["weight_grad"]
    torch.testing.assert_close(out, expected["out"])
    torch.testing.assert_close(x_grad, expected["x_grad"])  # gradients cross ranks through the sum
    torch.testing.assert_close(weight_grad, expected["weight_grad"])
    assert not any(r["tensor_model_parallel"] for r in two_ranks)  # replicated: counted once in grad norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_centered_rms_norm_is_gemmas_norm_bitwise(dtype):
    from megatron.core.transformer import TransformerConfig
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    from lightning_bridge.families.specs import ZeroCenteredRMSNorm

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, params_dtype=dtype)
    ours, theirs = ZeroCenteredRMSNorm(config, hidden_size=32, eps=EPS), GemmaRMSNorm(32, eps=EPS).to(dtype)
    x, weight, _ = full_inputs()
    with torch.no_grad():
        ours.weight.copy_(weight - 1)
        theirs.weight.copy_(weight - 1)
    x = x.reshape(3, 2, 32).to(dtype)
    assert torch.equal(ours(x), theirs(x))
