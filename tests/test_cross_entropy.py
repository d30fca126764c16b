"""Tests for lightning_bridge.cross_entropy: the sliced vocabulary-parallel cross-entropy.

Its losses and gradients equal torch's cross-entropy over the real vocabulary (padding columns
excluded), whatever the slicing, the logits' dtype or the TP split.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from processes import launch

from lightning_bridge import cross_entropy
from lightning_bridge.cross_entropy import vocab_parallel_cross_entropy

VOCAB, PADDED = 45, 48  # Megatron pads the vocabulary; columns 45..47 are not tokens


def reference(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's cross-entropy over the real vocabulary, per token, and its gradient (zero on padding)."""
    leaf = logits.detach().float().requires_grad_()
    losses = F.cross_entropy(leaf[..., :VOCAB].reshape(-1, VOCAB), target.reshape(-1), reduction="none")
    weights = torch.linspace(0.5, 1.5, losses.numel())
    (losses * weights).sum().backward()
    return losses.view(target.shape).detach(), leaf.grad


def ours(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.detach().clone().requires_grad_()
    losses = vocab_parallel_cross_entropy(leaf, target, VOCAB)
    weights = torch.linspace(0.5, 1.5, losses.numel()).view(losses.shape)
    (losses * weights).sum().backward()
    return losses.detach(), leaf.grad


def example(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, PADDED, generator=generator) * 4).to(dtype)
    target = torch.randint(0, VOCAB, (3, 7), generator=generator)
    return logits, target


@pytest.mark.parametrize("slice_elements", [1 << 26, PADDED * 2, 1])  # one slice, several, a row each
def test_equals_torch_cross_entropy_over_the_real_vocabulary(monkeypatch, slice_elements):
    monkeypatch.setattr(cross_entropy, "SLICE_ELEMENTS", slice_elements)
    logits, target = example()
    logits[..., VOCAB:] = 100.0  # padding would dominate the softmax if it were counted
    losses, grad = ours(logits, target)
    expected_losses, expected_grad = reference(logits, target)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7)
    assert torch.all(grad[..., VOCAB:] == 0)


def test_bf16_logits_give_fp32_losses_and_bf16_gradients():
    logits, target = example(torch.bfloat16)
    losses, grad = ours(logits, target)
    expected_losses, expected_grad = reference(logits, target)  # fp32 arithmetic on the same bf16 values
    assert losses.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(losses, expected_losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.float(), expected_grad, rtol=1e-2, atol=1e-3)  # the gradient's bf16 rounding


def split_over_two_ranks():
    from lightning_bridge.distributed import initialize_model_parallel

    initialize_model_parallel(tensor_model_parallel_size=2)
    rank = torch.distributed.get_rank()
    logits, target = example()
    part = PADDED // 2  # rank 1 holds 24..47: real columns 24..44 and the padding
    losses, grad = ours(logits[..., rank * part:(rank + 1) * part], target)
    return losses, grad


def test_tensor_parallel_split_equals_the_whole_vocabulary():
    logits, target = example()
    expected_losses, expected_grad = reference(logits, target)
    (losses0, grad0), (losses1, grad1) = launch(split_over_two_ranks, 2)
    torch.testing.assert_close(losses0, expected_losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(losses1, losses0, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([grad0, grad1], dim=-1), expected_grad, rtol=1e-6, atol=1e-7)
