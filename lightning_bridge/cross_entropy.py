"""Vocabulary-parallel cross-entropy without an fp32 copy of the full-vocabulary logits.

megatron-core's ``vocab_parallel_cross_entropy`` wants fp32 logits, so a bf16 model first copies
its [tokens, vocab / TP] logits to fp32 (8.6 GB at 16k tokens x 128k vocabulary) and then keeps
an fp32 softmax of the same size for the backward pass. This function reads the logits in their
own dtype a slice of tokens at a time, upcasting only the slice: the forward pass keeps one
log-sum-exp per token, and the backward pass recomputes the softmax slice by slice and writes the
gradient in the logits' dtype. The arithmetic is fp32 throughout, as megatron-core's.

Columns past ``vocab_size`` (Megatron pads the vocabulary to split it evenly over TP ranks) are
left out of the softmax and get a zero gradient, so the loss equals the one over the real vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

# fp32 elements upcast at once: 256 MiB, few enough slices that kernel launches do not count
SLICE_ELEMENTS = 1 << 26


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token cross-entropy of ``target`` under ``logits``, this TP rank's vocabulary slice [..., V / TP].

    ``vocab_size`` is the real vocabulary (columns at or past it are Megatron's padding). Returns
    fp32 losses of ``target``'s shape.
    """
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_size)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_size: int) -> torch.Tensor:
        group = _tp_group()
        partition = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * partition if group is not None else 0
        real = max(0, min(partition, vocab_size - start))  # this rank's columns that are real tokens
        flat, flat_target = logits.reshape(-1, partition), target.reshape(-1)
        rows = flat.shape[0]
        row_max = torch.full((rows,), float("-inf"), dtype=torch.float32, device=logits.device)
        sum_exp = torch.zeros(rows, dtype=torch.float32, device=logits.device)
        if real:
            for begin, end in _slices(rows, partition):
                piece = flat[begin:end, :real].to(torch.float32, copy=True)  # never the logits themselves
                row_max[begin:end] = piece.amax(dim=-1)
                sum_exp[begin:end] = piece.sub_(row_max[begin:end, None]).exp_().sum(dim=-1)
        local = flat_target - start
        owned = (local >= 0) & (local < real)
        picked = flat.gather(1, local.clamp(0, partition - 1)[:, None]).squeeze(1).float()
        target_logit = torch.where(owned, picked, torch.zeros_like(picked))
        if group is not None:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            sum_exp.mul_(torch.exp(row_max - global_max).nan_to_num_(0.0))  # a rank with no real columns: 0
            dist.all_reduce(sum_exp, group=group)
            dist.all_reduce(target_logit, group=group)
            row_max = global_max
        log_sum_exp = sum_exp.log_().add_(row_max)
        ctx.save_for_backward(logits, local, owned, log_sum_exp)
        ctx.real = real
        return (log_sum_exp - target_logit).view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, local, owned, log_sum_exp = ctx.saved_tensors
        real = ctx.real
        partition = logits.shape[-1]
        flat = logits.reshape(-1, partition)
        grad = torch.zeros_like(flat)
        scale = grad_loss.reshape(-1).float()
        if not real:  # a TP rank holding only padding columns
            return grad.view_as(logits), None, None
        column = local.clamp(0, real - 1)[:, None]
        minus_one = -owned.float()[:, None]  # the target's one-hot, on the rank that owns it
        for begin, end in _slices(flat.shape[0], partition):
            softmax = flat[begin:end, :real].to(torch.float32, copy=True)
            softmax.sub_(log_sum_exp[begin:end, None]).exp_()
            softmax.scatter_add_(1, column[begin:end], minus_one[begin:end])  # no host sync
            grad[begin:end, :real] = softmax.mul_(scale[begin:end, None])
        return grad.view_as(logits), None, None


def _slices(rows: int, partition: int):
    step = max(1, SLICE_ELEMENTS // max(partition, 1))
    for begin in range(0, rows, step):
        yield begin, min(begin + step, rows)


def _tp_group():
    if not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()
