"""GPT-2: learned absolute positions, LayerNorm and biases everywhere, GELU (tanh), tied head.

HF's ``Conv1D`` stores weights as [in, out], the transpose of ``nn.Linear``; ``c_attn`` fuses
[q; k; v] (multi-head attention: one query group per head).

Not supported (refused with a ValueError naming the setting): ``scale_attn_by_inverse_layer_idx``
(Megatron's query-key layer scaling undoes itself in the softmax, so it cannot reproduce it) and
``add_cross_attention``. Checkpoints whose tensor names lack the ``transformer.`` prefix (saved
from ``GPT2Model``, like the original ``openai-community/gpt2`` upload) are reported as missing
tensors: load and re-save them with ``GPT2LMHeadModel`` first.
"""

from __future__ import annotations

from typing import Any

from lightning_bridge.conversion.mappings import (
    ColumnParallel,
    FusedQKV,
    Replicated,
    TransposedColumnParallel,
    TransposedFusedQKV,
    TransposedRowParallel,
    VocabParallel,
    WeightMapping,
)
from lightning_bridge.families.base import ModelBridge, hf_activation
from lightning_bridge.families.registry import register


@register
class GPT2Bridge(ModelBridge):
    architectures = ("GPT2LMHeadModel",)
    config_fields = {
        "num_layers": "n_layer",
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_query_groups": "n_head",
        "layernorm_epsilon": "layer_norm_epsilon",
        "attention_dropout": "attn_pdrop",
        "hidden_dropout": "resid_pdrop",
        "seq_length": "n_positions",
        "vocab_size": "vocab_size",
        "init_method_std": "initializer_range",
    }
    fixed_config = {
        "normalization": "LayerNorm",
        "gated_linear_unit": False,
        "add_bias_linear": True,
        "position_embedding_type": "learned_absolute",
    }
    ignored_hf_patterns = ("*.attn.bias", "*.attn.masked_bias")  # causal-mask buffers of old saves

    def check_supported(self) -> None:
        for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if getattr(self.hf_config, flag, False):
                raise ValueError(f"GPT2Config with {flag}=True is not supported: Megatron's GPT layer "
                                 "cannot reproduce it exactly.")

    def computed_config(self) -> dict[str, Any]:
        cfg = self.hf_config
        return {
            **super().computed_config(),
            "activation_func": hf_activation(cfg, "activation_function"),
            "ffn_hidden_size": cfg.n_inner or 4 * cfg.n_embd,
            "softmax_scale": None if cfg.scale_attn_weights else 1.0,
        }

    def mappings(self) -> list[WeightMapping]:
        return [
            VocabParallel("embedding.word_embeddings.weight", "transformer.wte.weight"),
            Replicated("embedding.position_embeddings.weight", "transformer.wpe.weight"),
            Replicated("decoder.layers.*.input_layernorm.weight", "transformer.h.*.ln_1.weight"),
            Replicated("decoder.layers.*.input_layernorm.bias", "transformer.h.*.ln_1.bias"),
            TransposedFusedQKV("decoder.layers.*.self_attention.linear_qkv.weight",
                               "transformer.h.*.attn.c_attn.weight"),
            FusedQKV("decoder.layers.*.self_attention.linear_qkv.bias", "transformer.h.*.attn.c_attn.bias"),
            TransposedRowParallel("decoder.layers.*.self_attention.linear_proj.weight",
                                  "transformer.h.*.attn.c_proj.weight"),
            Replicated("decoder.layers.*.self_attention.linear_proj.bias",
                       "transformer.h.*.attn.c_proj.bias"),
            Replicated("decoder.layers.*.pre_mlp_layernorm.weight", "transformer.h.*.ln_2.weight"),
            Replicated("decoder.layers.*.pre_mlp_layernorm.bias", "transformer.h.*.ln_2.bias"),
            TransposedColumnParallel("decoder.layers.*.mlp.linear_fc1.weight",
                                     "transformer.h.*.mlp.c_fc.weight"),
            ColumnParallel("decoder.layers.*.mlp.linear_fc1.bias", "transformer.h.*.mlp.c_fc.bias"),
            TransposedRowParallel("decoder.layers.*.mlp.linear_fc2.weight",
                                  "transformer.h.*.mlp.c_proj.weight"),
            Replicated("decoder.layers.*.mlp.linear_fc2.bias", "transformer.h.*.mlp.c_proj.bias"),
            Replicated("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
            Replicated("decoder.final_layernorm.bias", "transformer.ln_f.bias"),
            VocabParallel("output_layer.weight", "lm_head.weight"),
        ]
