"""Megatron layer specs for families that megatron-core 0.16's local GPT layer cannot express.

Each difference is a module swapped into megatron-core's own local spec, so everything else
(attention kernels, MLP, bias-dropout-add, pipeline and tensor parallelism) stays Megatron's:

- :class:`RowParallelLinearWithPostNorm`: a row-parallel linear layer whose full output goes
  through a norm before the residual add (OLMo 2's ``post_attention_layernorm`` and
  ``post_feedforward_layernorm``). Under sequence parallelism the output is split along the
  sequence, so the norm is a :class:`~lightning_bridge.norms.TorchNorm`. megatron-core 0.16's ``TransformerLayerSubmodules`` has no
  post-attention / post-MLP norm slot; the output projections are where it fits.
- :class:`ProjectionRMSNorm`: RMSNorm over a whole query or key projection, all heads together
  (OLMo 2's ``q_norm`` / ``k_norm``), where Megatron's q/k layernorm normalises each head. Under
  tensor parallelism each rank holds a slice of the heads, so the sum of squares is all-reduced
  over the tensor-parallel group: the norm is the full projection's on every layout. The weight
  is whole on every rank, so that Megatron's sum of q/k-norm gradients over TP is right.
- :class:`ZeroCenteredRMSNorm`: RMSNorm scaling by (1 + weight), the stored weight an offset from
  1 (Gemma; Megatron's ``layernorm_zero_centered_gamma``, which the local torch norm refuses).
  The final norm is part of the block, so Gemma's spec is a whole-block spec.
- :class:`EmbeddingScaledTransformerLayer`: megatron-core 0.16's ``GPTModel`` builds its embedding
  outside any spec, so Gemma's embedding scale (sqrt(hidden_size)) is applied where the
  embeddings enter the first layer: the same values, in the same dtype, as transformers.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer

from lightning_bridge.norms import TorchNorm
from lightning_bridge.provider import local_layer_spec

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig

    from lightning_bridge.provider import GPTModelProvider


class RowParallelLinearWithPostNorm(RowParallelLinear):
    """A row-parallel linear layer followed by a norm of its full (reduced) output.

    The output bias, if any, is added before the norm, so the layer returns no separate bias.
    The norm's weight is the same on every tensor-parallel rank (``post_layernorm.weight``).

    ``forward`` is ``finish_output(*linear_forward(input_))``: an adapter wrapping the layer
    (:class:`lightning_bridge.lora.LoraLinear`) adds its output between the two, before the norm.
    """

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig,
                 post_layernorm: type = TorchNorm, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.post_layernorm = post_layernorm(config=config, hidden_size=output_size,
                                             eps=config.layernorm_epsilon)

    def forward(self, input_):
        return self.finish_output(*self.linear_forward(input_))

    def linear_forward(self, input_):
        """The row-parallel linear part: (output, bias) in Megatron's convention."""
        return super().forward(input_)

    def finish_output(self, output, bias):
        """The linear part's (output, bias) -> the layer's: bias added, then the post-norm."""
        if bias is not None:
            output = output + bias
        return self.post_layernorm(output), None


class ProjectionRMSNorm(MegatronModule):
    """RMSNorm over all heads of a query or key projection (not per head), as OLMo 2 applies it.

    Built in Megatron's q/k layernorm slot, it receives [seq, batch, heads, head_dim] with this
    rank's heads; ``heads`` names the config field that counts them over all ranks
    (``num_attention_heads`` for queries, ``num_query_groups`` for keys). Every tensor-parallel
    rank holds the whole weight and uses the slice of its heads: Megatron sums q/k layernorm
    gradients over the tensor-parallel group, which assembles the whole gradient on every rank.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float, heads: str):
        super().__init__(config=config)
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.full_size = getattr(config, heads) * hidden_size
        self.local_size = self.full_size // self.tp_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.full_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(*x.shape[:-2], -1).float()
        squares = flat.pow(2).sum(-1, keepdim=True)
        if self.tp_size > 1:
            squares = _AllReduceSum.apply(squares, self.tp_group)
        normed = flat * torch.rsqrt(squares / self.full_size + self.eps)
        start = ps.get_tensor_model_parallel_rank() * self.local_size
        weight = self.weight[start:start + self.local_size]
        return (weight * normed).to(x.dtype).reshape(x.shape)


class ZeroCenteredRMSNorm(torch.nn.Module):
    """RMSNorm that scales by (1 + weight), computed in float32 and cast back (Gemma's norm)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        # under sequence parallelism each rank sees part of the sequence: Megatron sums these grads
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class EmbeddingScaledTransformerLayer(TransformerLayer):
    """A transformer layer that, as the model's first layer, first multiplies the embeddings it
    receives by ``embedding_multiplier``, rounded to their dtype as transformers rounds it."""

    def __init__(self, *args, embedding_multiplier: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.embedding_multiplier = embedding_multiplier

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.layer_number == 1:  # global: only the first layer of the first pipeline stage
            multiplier = torch.tensor(self.embedding_multiplier).to(hidden_states.dtype)
            hidden_states = hidden_states * multiplier.to(hidden_states.device)
        return super().forward(hidden_states, *args, **kwargs)


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group; every rank's result feeds its own slice, so gradients are summed too."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def olmo2_layer_spec(provider: GPTModelProvider) -> ModuleSpec:
    """megatron-core's local GPT layer with OLMo 2's norms: no pre-norms, post-norms on the
    attention and MLP outputs, and RMSNorm over the whole query and key projections."""
    spec = local_layer_spec(provider)
    layer = spec.submodules
    attention, mlp = layer.self_attention, layer.mlp
    post_norm_linear = ModuleSpec(module=RowParallelLinearWithPostNorm)
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(
        attention.submodules,
        linear_proj=post_norm_linear,
        q_layernorm=ModuleSpec(module=ProjectionRMSNorm, params={"heads": "num_attention_heads"}),
        k_layernorm=ModuleSpec(module=ProjectionRMSNorm, params={"heads": "num_query_groups"}),
    ))
    mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules,
                                                                  linear_fc2=post_norm_linear))
    return dataclasses.replace(spec, submodules=dataclasses.replace(
        layer, input_layernorm=IdentityOp, pre_mlp_layernorm=IdentityOp, self_attention=attention, mlp=mlp,
    ))


def gemma_block_spec(provider: GPTModelProvider) -> ModuleSpec:
    """megatron-core's local GPT layers with Gemma's (1 + w) RMSNorms, the embeddings scaled by
    sqrt(hidden_size) as they enter the first layer, and a (1 + w) final norm."""
    if provider.virtual_pipeline_model_parallel_size and (
            provider.account_for_embedding_in_pipeline_split or provider.account_for_loss_in_pipeline_split):
        raise ValueError("Gemma with virtual pipeline stages does not support "
                         "account_for_embedding_in_pipeline_split / account_for_loss_in_pipeline_split: "
                         "its block spec cannot tell the virtual stages apart. Leave both False.")
    spec = local_layer_spec(provider)
    layer = dataclasses.replace(
        spec, module=EmbeddingScaledTransformerLayer,
        params={**spec.params, "embedding_multiplier": provider.hidden_size ** 0.5},
        submodules=dataclasses.replace(spec.submodules, input_layernorm=ZeroCenteredRMSNorm,
                                       pre_mlp_layernorm=ZeroCenteredRMSNorm),
    )
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(provider), layer_norm=ZeroCenteredRMSNorm,
    ))
