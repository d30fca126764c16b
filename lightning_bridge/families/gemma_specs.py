"""Megatron layer pieces for Gemma 2 and Gemma 3, on top of Gemma's (``families.specs``).

Each difference from megatron-core 0.16's local GPT layer is a module swapped into its spec, so
attention kernels, MLP, bias-dropout-add and tensor/pipeline parallelism stay Megatron's:

- sandwich norms: (1 + w) RMSNorms before *and after* attention and the MLP. The post-norms sit
  in the output projections (:class:`~lightning_bridge.families.specs.RowParallelLinearWithPostNorm`),
  the only place megatron-core 0.16's layer has for them;
- attention scores soft-capped, ``tanh(s / cap) * cap``, after the softmax scale and before the
  mask and softmax (Gemma 2's ``attn_logit_softcapping``): the core attention of
  :func:`lightning_bridge.attention.core_attention_spec` with ``softcap`` (flex attention, or
  ``SoftcappedDotProductAttention`` under ``attention_backend="local"``);
- sliding-window and full-attention layers: Megatron's own ``window_size`` with
  ``window_attn_skip_freq`` as a per-layer list, indexed by the global layer number, so every
  pipeline stage knows which of its layers slide;
- :class:`GemmaTransformerLayer`: Gemma's embedding scale in the first layer and, for Gemma 3,
  a rotary embedding with its own frequencies in the sliding-window layers
  (``rope_parameters["sliding_attention"]``); full-attention layers use the model's;
- :class:`FinalLogitSoftcapping`: a model hook that soft-caps the output layer's logits, so the
  training loss and every caller of the model see the capped logits (``final_logit_softcapping``).
  megatron-core 0.16's ``GPTModel`` builds its output layer outside any spec.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.utils import is_layer_window_attention

from lightning_bridge.attention import SoftcappedDotProductAttention, core_attention_spec, softcap  # noqa: F401 (re-exported)
from lightning_bridge.families.specs import (
    EmbeddingScaledTransformerLayer,
    RowParallelLinearWithPostNorm,
    ZeroCenteredRMSNorm,
)
from lightning_bridge.provider import local_layer_spec

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel

    from lightning_bridge.provider import GPTModelProvider

logger = logging.getLogger(__name__)


class GemmaTransformerLayer(EmbeddingScaledTransformerLayer):
    """Gemma's layer: embeddings scaled in the first layer; optionally, in sliding-window layers,
    rotary embeddings from ``local_rotary_inv_freq`` instead of the model's (Gemma 3)."""

    def __init__(self, *args, local_rotary_inv_freq: torch.Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.local_rotary = None
        sliding = is_layer_window_attention(self.config.window_size, self.config.window_attn_skip_freq,
                                            self.layer_number)
        if local_rotary_inv_freq is not None and sliding:
            # Megatron's own rotary module (its frequencies a plain attribute, so a bf16 cast of
            # the model leaves them in float32), with the sliding layers' frequencies.
            self.local_rotary = RotaryEmbedding(kv_channels=self.config.kv_channels, rotary_percent=1.0,
                                                use_cpu_initialization=True)
            self.local_rotary.inv_freq = local_rotary_inv_freq.float().clone()

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.local_rotary is not None and kwargs.get("rotary_pos_emb") is not None:
            kwargs["rotary_pos_emb"] = self.local_rotary(kwargs["rotary_pos_emb"].shape[0])
        return super().forward(hidden_states, *args, **kwargs)


@dataclasses.dataclass(frozen=True)
class GemmaSandwichBlockSpec:
    """A layer-spec function (``GPTModelProvider.layer_spec``) for Gemma 2 and Gemma 3.

    ``attn_logit_softcapping``: the attention score cap, or None. ``local_rotary_inv_freq``: the
    sliding-window layers' rope frequencies when they differ from the model's, or None. q/k norms
    ((1 + w), per head) come with the provider's ``qk_layernorm``.
    """

    attn_logit_softcapping: float | None = None
    local_rotary_inv_freq: torch.Tensor | None = None

    def __call__(self, provider: GPTModelProvider) -> ModuleSpec:
        if provider.virtual_pipeline_model_parallel_size and (provider.account_for_embedding_in_pipeline_split
                                                              or provider.account_for_loss_in_pipeline_split):
            raise ValueError("Gemma with virtual pipeline stages does not support "
                             "account_for_embedding_in_pipeline_split / account_for_loss_in_pipeline_split: "
                             "its block spec cannot tell the virtual stages apart. Leave both False.")
        if self.attn_logit_softcapping and provider.apply_query_key_layer_scaling:
            raise ValueError("attn_logit_softcapping cannot be combined with "
                             "apply_query_key_layer_scaling=True (Megatron would scale the scores after the "
                             "cap). Set it to False.")
        spec = local_layer_spec(provider)
        layer, attention, mlp = spec.submodules, spec.submodules.self_attention, spec.submodules.mlp
        post_norm_linear = ModuleSpec(module=RowParallelLinearWithPostNorm,
                                      params={"post_layernorm": ZeroCenteredRMSNorm})
        attention_parts = {"linear_proj": post_norm_linear}
        if self.attn_logit_softcapping:
            attention_parts["core_attention"] = core_attention_spec(provider, softcap=self.attn_logit_softcapping)
        if provider.qk_layernorm:
            attention_parts.update(q_layernorm=ZeroCenteredRMSNorm, k_layernorm=ZeroCenteredRMSNorm)
        attention = dataclasses.replace(attention, submodules=dataclasses.replace(attention.submodules,
                                                                                  **attention_parts))
        mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules,
                                                                      linear_fc2=post_norm_linear))
        layer_spec = dataclasses.replace(
            spec, module=GemmaTransformerLayer,
            params={**spec.params, "embedding_multiplier": provider.hidden_size ** 0.5,
                    "local_rotary_inv_freq": self.local_rotary_inv_freq},
            submodules=dataclasses.replace(layer, input_layernorm=ZeroCenteredRMSNorm,
                                           self_attention=attention, pre_mlp_layernorm=ZeroCenteredRMSNorm,
                                           mlp=mlp),
        )
        return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
            layer_specs=[layer_spec] * get_num_layers_to_build(provider), layer_norm=ZeroCenteredRMSNorm,
        ))


class _SoftcapOutput:
    """A forward hook on the output layer: soft-caps the logits it returns."""

    def __init__(self, cap: float):
        self.cap = cap

    def __call__(self, module: torch.nn.Module, inputs, output):
        logits, bias = output
        return softcap(logits, self.cap), bias


@dataclasses.dataclass(frozen=True)
class FinalLogitSoftcapping:
    """A model hook (``GPTModelProvider.model_hook``): the last stage's logits soft-capped at ``cap``.

    Registered as a forward hook on ``output_layer``, it is part of the model: Megatron's loss,
    ``verify.megatron_logits`` and any other caller see the capped logits. Logits are capped per
    tensor-parallel vocabulary shard, which is exact (the cap is elementwise).
    """

    cap: float

    def __call__(self, model: GPTModel, provider: GPTModelProvider) -> None:
        output_layer = getattr(model, "output_layer", None)
        if output_layer is not None and model.post_process:
            output_layer.register_forward_hook(_SoftcapOutput(self.cap))
