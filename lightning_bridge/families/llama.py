"""Llama 2, 3, 3.1 (llama3 rope scaling) and 3.2 (tied embeddings): HF <-> Megatron tables."""

from __future__ import annotations

from lightning_bridge.conversion.mappings import (
    QKV,
    GatedMLP,
    Replicated,
    RowParallel,
    VocabParallel,
    WeightMapping,
)
from lightning_bridge.families.base import ModelBridge
from lightning_bridge.families.registry import register


@register
class LlamaBridge(ModelBridge):
    architectures = ("LlamaForCausalLM",)
    config_fields = {
        "num_layers": "num_hidden_layers",
        "hidden_size": "hidden_size",
        "ffn_hidden_size": "intermediate_size",
        "num_attention_heads": "num_attention_heads",
        "num_query_groups": "num_key_value_heads",
        "kv_channels": "head_dim",
        "layernorm_epsilon": "rms_norm_eps",
        "attention_dropout": "attention_dropout",
        "seq_length": "max_position_embeddings",
        "vocab_size": "vocab_size",
        "init_method_std": "initializer_range",
    }
    fixed_config = {
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "hidden_dropout": 0.0,
        "position_embedding_type": "rope",
    }

    def check_supported(self) -> None:
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(self.hf_config, flag, False):
                raise ValueError(
                    f"{type(self.hf_config).__name__} with {flag}=True is not supported: "
                    "Megatron's GPT layer cannot give q/k/v/o biases without MLP biases. "
                    "Use a checkpoint with attention_bias=False and mlp_bias=False."
                )

    def mappings(self) -> list[WeightMapping]:
        return [
            VocabParallel("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
            Replicated("decoder.layers.*.input_layernorm.weight", "model.layers.*.input_layernorm.weight"),
            QKV("decoder.layers.*.self_attention.linear_qkv.weight", (
                "model.layers.*.self_attn.q_proj.weight",
                "model.layers.*.self_attn.k_proj.weight",
                "model.layers.*.self_attn.v_proj.weight",
            )),
            RowParallel("decoder.layers.*.self_attention.linear_proj.weight", "model.layers.*.self_attn.o_proj.weight"),
            Replicated("decoder.layers.*.pre_mlp_layernorm.weight", "model.layers.*.post_attention_layernorm.weight"),
            GatedMLP("decoder.layers.*.mlp.linear_fc1.weight", (
                "model.layers.*.mlp.gate_proj.weight",
                "model.layers.*.mlp.up_proj.weight",
            )),
            RowParallel("decoder.layers.*.mlp.linear_fc2.weight", "model.layers.*.mlp.down_proj.weight"),
            Replicated("decoder.final_layernorm.weight", "model.norm.weight"),
            VocabParallel("output_layer.weight", "lm_head.weight"),
        ]
