"""Phi-1, Phi-1.5 and Phi-2 (``PhiForCausalLM``): a parallel attention + MLP block, partial rotary,
LayerNorm and biases everywhere, and an output layer with a bias.

Each layer is ``x + attention(norm(x)) + mlp(norm(x))``: one ``input_layernorm`` feeds both
branches (:class:`ParallelAttentionMLPLayer`, megatron-core's local layer otherwise). q, k and v are
separate HF projections with biases (fused into ``linear_qkv``), the MLP is ``fc1`` -> ``gelu_new``
(tanh GELU) -> ``fc2``, and rotary embeddings cover the first ``int(head_dim * partial_rotary_factor)``
dimensions of each head, rounded down by HF and by Megatron alike. megatron-core 0.16's ``GPTModel``
builds its output layer without a bias, so :func:`add_output_layer_bias` gives the last stage's
output layer one (split over tensor-parallel ranks like the weight, padded vocabulary rows zero).
With ``tie_word_embeddings=True`` the output weight is the embedding's and the bias stays its own.
``embd_pdrop`` becomes the embedding dropout (Megatron would use ``resid_pdrop`` there).

Precision: Megatron computes the attention softmax in float32 (``attention_softmax_in_fp32``), as
HF's eager attention does; in float32 the logits match transformers to 1e-5.

Not supported, refused with a ValueError naming the setting: ``qk_layernorm=True`` and any rope type
other than ``default``. Selective recompute of the input norm or the MLP alone
(``recompute_modules``) is not applied inside the parallel layer; full-layer recompute is.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from lightning_bridge.conversion.mappings import (
    QKV,
    ColumnParallel,
    Replicated,
    RowParallel,
    VocabParallel,
    WeightMapping,
)
from lightning_bridge.families.base import ModelBridge, rope_parameters
from lightning_bridge.families.registry import register
from lightning_bridge.provider import GPTModelProvider, local_layer_spec

logger = logging.getLogger(__name__)


class ParallelAttentionMLPLayer(TransformerLayer):
    """A transformer layer whose attention and MLP read the same normed input and add to the same
    residual: ``x + dropout(attention(norm(x))) + dropout(mlp(norm(x)))`` (Phi-2, GPT-J).

    megatron-core 0.16's ``TransformerLayer`` runs the MLP on the attention's output; the spec's
    ``pre_mlp_layernorm`` is unused here and set to ``IdentityOp``.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                rotary_pos_emb: torch.Tensor | None = None, rotary_pos_cos: torch.Tensor | None = None,
                rotary_pos_sin: torch.Tensor | None = None, rotary_pos_cos_sin: torch.Tensor | None = None,
                attention_bias: torch.Tensor | None = None, inference_context: Any = None,
                packed_seq_params: Any = None, sequence_len_offset: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, **kwargs: Any):
        inference_context = inference_context or kwargs.get("inference_params")
        normed = self.input_layernorm(hidden_states)
        attention = self.self_attention(
            normed, attention_mask=attention_mask, inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
            packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
        )
        mlp = self.mlp(normed)
        # transformers' order of additions: attention + mlp + residual
        output = self._with_bias_and_dropout(*attention) + self._with_bias_and_dropout(*mlp) + hidden_states
        return make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True), context

    def _with_bias_and_dropout(self, output: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is not None:
            output = output + bias
        return F.dropout(output, p=self.hidden_dropout, training=self.training)


def phi2_layer_spec(provider: GPTModelProvider) -> ModuleSpec:
    """megatron-core's local GPT layer (LayerNorm, biases) with attention and MLP in parallel."""
    spec = local_layer_spec(provider)
    return dataclasses.replace(spec, module=ParallelAttentionMLPLayer,
                               submodules=dataclasses.replace(spec.submodules, pre_mlp_layernorm=IdentityOp))


def add_output_layer_bias(model: GPTModel, provider: GPTModelProvider, embedding_dropout: float = 0.0) -> None:
    """Give the last stage's output layer a bias (HF ``lm_head.bias``), and set the embedding dropout.

    The bias is created as ``ColumnParallelLinear(bias=True)`` creates it: zeros, this rank's slice
    of the padded vocabulary, marked tensor-parallel along its only axis, so Megatron's forward adds
    it, DDP reduces its gradient and ``sharded_state_dict`` splits it like the weight.
    """
    output_layer = getattr(model, "output_layer", None) if model.post_process else None
    if output_layer is not None and output_layer.bias is None:
        device = next(model.parameters()).device
        bias = torch.nn.Parameter(torch.zeros(output_layer.output_size_per_partition,
                                              dtype=provider.params_dtype, device=device))
        set_tensor_model_parallel_attributes(bias, True, 0, 1)
        bias.allreduce = True
        output_layer.bias = bias
        logger.debug("output_layer.bias added: %d vocabulary rows on this rank", bias.shape[0])
    if model.pre_process:
        model.embedding.embedding_dropout.p = embedding_dropout


@register
class Phi2Bridge(ModelBridge):
    architectures = ("PhiForCausalLM",)
    config_fields: ClassVar[dict[str, str]] = {
        "num_layers": "num_hidden_layers",
        "hidden_size": "hidden_size",
        "ffn_hidden_size": "intermediate_size",
        "num_attention_heads": "num_attention_heads",
        "num_query_groups": "num_key_value_heads",
        "kv_channels": "head_dim",
        "layernorm_epsilon": "layer_norm_eps",
        "attention_dropout": "attention_dropout",
        "hidden_dropout": "resid_pdrop",
        "seq_length": "max_position_embeddings",
        "vocab_size": "vocab_size",
        "init_method_std": "initializer_range",
    }
    fixed_config: ClassVar[dict[str, Any]] = {
        "normalization": "LayerNorm",
        "gated_linear_unit": False,
        "add_bias_linear": True,
        "add_qkv_bias": True,
        "position_embedding_type": "rope",
        "layer_spec": phi2_layer_spec,
    }

    def check_supported(self) -> None:
        cfg = self.hf_config
        if getattr(cfg, "qk_layernorm", False):
            raise ValueError("PhiConfig with qk_layernorm=True is not supported: its per-head LayerNorm "
                             "(with bias) has no Megatron equivalent here. Use qk_layernorm=False.")
        rope_type = rope_parameters(cfg).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"PhiConfig with rope_type={rope_type!r} is not supported: only the default "
                             "rope type is reproduced exactly for Phi. Use rope_type='default'.")

    def computed_config(self) -> dict[str, Any]:
        cfg = self.hf_config
        return {
            **super().computed_config(),
            "rotary_percent": rope_parameters(cfg).get(
                "partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 0.5)),
            "model_hook": functools.partial(add_output_layer_bias,
                                            embedding_dropout=float(getattr(cfg, "embd_pdrop", 0.0) or 0.0)),
        }

    def mappings(self) -> list[WeightMapping]:
        layer = "model.layers.*"
        return [
            VocabParallel("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
            Replicated("decoder.layers.*.input_layernorm.weight", f"{layer}.input_layernorm.weight"),
            Replicated("decoder.layers.*.input_layernorm.bias", f"{layer}.input_layernorm.bias"),
            QKV("decoder.layers.*.self_attention.linear_qkv.weight",
                tuple(f"{layer}.self_attn.{p}_proj.weight" for p in "qkv")),
            QKV("decoder.layers.*.self_attention.linear_qkv.bias",
                tuple(f"{layer}.self_attn.{p}_proj.bias" for p in "qkv")),
            RowParallel("decoder.layers.*.self_attention.linear_proj.weight", f"{layer}.self_attn.dense.weight"),
            Replicated("decoder.layers.*.self_attention.linear_proj.bias", f"{layer}.self_attn.dense.bias"),
            ColumnParallel("decoder.layers.*.mlp.linear_fc1.weight", f"{layer}.mlp.fc1.weight"),
            ColumnParallel("decoder.layers.*.mlp.linear_fc1.bias", f"{layer}.mlp.fc1.bias"),
            RowParallel("decoder.layers.*.mlp.linear_fc2.weight", f"{layer}.mlp.fc2.weight"),
            Replicated("decoder.layers.*.mlp.linear_fc2.bias", f"{layer}.mlp.fc2.bias"),
            Replicated("decoder.final_layernorm.weight", "model.final_layernorm.weight"),
            Replicated("decoder.final_layernorm.bias", "model.final_layernorm.bias"),
            VocabParallel("output_layer.weight", "lm_head.weight"),
            VocabParallel("output_layer.bias", "lm_head.bias"),
        ]
