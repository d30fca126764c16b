"""DeepSeek-V3: multi-latent attention (MLA) and GLM-4.5's mixture of experts (which DeepSeek's is).

Attention is megatron-core's MLA (an ``MLATransformerConfig``, the local MLA layer spec):

- queries: ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj`` (``linear_q_down_proj``, ``q_layernorm``,
  ``linear_q_up_proj``), or one ``q_proj`` (``linear_q_proj``) when ``q_lora_rank`` is None; each
  head's rows are [``qk_nope_head_dim`` | ``qk_rope_head_dim``] in both;
- keys and values: ``kv_a_proj_with_mqa`` gives [``kv_lora_rank`` latent | ``qk_rope_head_dim`` shared
  rotary key] in that order, as ``linear_kv_down_proj`` does; ``kv_a_layernorm`` (``kv_layernorm``) on the
  latent; ``kv_b_proj`` (``linear_kv_up_proj``) gives each head [k nope | v]; ``o_proj`` (``linear_proj``);
- rotary embedding on the ``qk_rope_head_dim`` dims: HF's ``rope_interleave=True`` (the default, and
  DeepSeek's checkpoints) rotates interleaved pairs (x0, x1), (x2, x3), ... and writes them as
  [evens | odds]; Megatron's MLA de-interleaves the same way before its ``rotate_half`` rope, so the
  weights convert unchanged. ``rope_interleave=False`` is refused;
- YaRN (DeepSeek-V3's ``rope_type="yarn"``: ``factor``, ``original_max_position_embeddings``,
  ``beta_fast``/``beta_slow``, ``mscale``/``mscale_all_dim``) is MLA's own ``rope_type="yarn"``: the same
  frequencies, the same factor on cos/sin, and the softmax scale times ``mscale(mscale_all_dim)**2``.

The MLP is GLM-4.5 MoE's (see :mod:`.glm4_moe`): dense below ``first_k_dense_replace``, then routed
experts with sigmoid scores, the correction bias, group-limited routing, ``routed_scaling_factor``
and a shared expert; multi-token-prediction layers are skipped.

Not supported, refused by name: ``rope_interleave=False``, ``attention_bias=True`` (Megatron's MLA
down projections have no bias), rope types other than default and yarn, YaRN with an explicit
``attention_factor``, ``truncate=False`` or ``mscale_all_dim`` without ``mscale``; and GLM-4.5 MoE's
routing refusals.
"""

from __future__ import annotations

from typing import Any, ClassVar

from lightning_bridge.conversion.mappings import (
    ColumnParallel,
    Replicated,
    RowParallel,
    VocabParallel,
    WeightMapping,
)
from lightning_bridge.families.base import ModelBridge, hf_activation, hf_dtype, rope_parameters
from lightning_bridge.families.glm4_moe import (
    SIGMOID_ROUTER,
    check_sigmoid_routing,
    mtp_layers,
    sigmoid_moe_config,
    sigmoid_moe_mappings,
)
from lightning_bridge.families.registry import register
from lightning_bridge.provider import MLAModelProvider


@register
class DeepseekV3Bridge(ModelBridge):
    architectures = ("DeepseekV3ForCausalLM",)
    provider_class = MLAModelProvider
    config_fields: ClassVar[dict[str, str]] = {
        "num_layers": "num_hidden_layers",
        "hidden_size": "hidden_size",
        "ffn_hidden_size": "intermediate_size",
        "num_attention_heads": "num_attention_heads",
        "layernorm_epsilon": "rms_norm_eps",
        "attention_dropout": "attention_dropout",
        "seq_length": "max_position_embeddings",
        "vocab_size": "vocab_size",
        "init_method_std": "initializer_range",
        "kv_lora_rank": "kv_lora_rank",
        "qk_head_dim": "qk_nope_head_dim",
        "qk_pos_emb_head_dim": "qk_rope_head_dim",
        "v_head_dim": "v_head_dim",
        "kv_channels": "v_head_dim",  # the core attention's output per head
        "num_moe_experts": "n_routed_experts",
        "moe_router_topk": "num_experts_per_tok",
        "moe_ffn_hidden_size": "moe_intermediate_size",
    }
    fixed_config: ClassVar[dict[str, Any]] = {
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "hidden_dropout": 0.0,
        "position_embedding_type": "rope",
        "qk_layernorm": True,  # MLA: the RMSNorms of the compressed q and kv
        **SIGMOID_ROUTER,
    }

    @property
    def ignored_hf_patterns(self) -> tuple[str, ...]:
        """The multi-token-prediction layers, numbered after the model's own."""
        cfg = self.hf_config
        mtp = range(cfg.num_hidden_layers, cfg.num_hidden_layers + mtp_layers(cfg))
        return (*ModelBridge.ignored_hf_patterns, *(f"model.layers.{i}.*" for i in mtp))

    def check_supported(self) -> None:
        cfg, name = self.hf_config, type(self.hf_config).__name__
        if not getattr(cfg, "rope_interleave", True):
            raise ValueError(f"{name} with rope_interleave=False is not supported: Megatron's multi-latent "
                             "attention always rotates interleaved pairs. Use rope_interleave=True "
                             "(DeepSeek's checkpoints do).")
        if cfg.attention_bias:
            raise ValueError(f"{name} with attention_bias=True is not supported: Megatron's multi-latent "
                             "attention has no biases on its projections. Use attention_bias=False.")
        check_sigmoid_routing(cfg)
        mla_rope_config(cfg)  # refuses rope settings MLA cannot reproduce

    def computed_config(self) -> dict[str, Any]:
        cfg = self.hf_config
        return {
            "activation_func": hf_activation(cfg),
            "params_dtype": hf_dtype(cfg),
            "share_embeddings_and_output_weights": bool(getattr(cfg, "tie_word_embeddings", False)),
            "q_lora_rank": cfg.q_lora_rank,  # None (one q projection) is a value here
            **mla_rope_config(cfg),
            **sigmoid_moe_config(cfg),
        }

    def mappings(self) -> list[WeightMapping]:
        attn, mla = "model.layers.*.self_attn", "decoder.layers.*.self_attention"
        if self.hf_config.q_lora_rank is None:
            queries = [ColumnParallel(f"{mla}.linear_q_proj.weight", f"{attn}.q_proj.weight")]
        else:
            queries = [
                ColumnParallel(f"{mla}.linear_q_down_proj.weight", f"{attn}.q_a_proj.weight"),
                Replicated(f"{mla}.q_layernorm.weight", f"{attn}.q_a_layernorm.weight"),
                ColumnParallel(f"{mla}.linear_q_up_proj.weight", f"{attn}.q_b_proj.weight"),
            ]
        return [
            VocabParallel("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
            Replicated("decoder.layers.*.input_layernorm.weight", "model.layers.*.input_layernorm.weight"),
            *queries,
            # whole on every TP rank (see provider.MLAModelProvider)
            Replicated(f"{mla}.linear_kv_down_proj.weight", f"{attn}.kv_a_proj_with_mqa.weight"),
            Replicated(f"{mla}.kv_layernorm.weight", f"{attn}.kv_a_layernorm.weight"),
            ColumnParallel(f"{mla}.linear_kv_up_proj.weight", f"{attn}.kv_b_proj.weight"),
            RowParallel(f"{mla}.linear_proj.weight", f"{attn}.o_proj.weight"),
            Replicated("decoder.layers.*.pre_mlp_layernorm.weight",
                       "model.layers.*.post_attention_layernorm.weight"),
            *sigmoid_moe_mappings(self.hf_config),
            Replicated("decoder.final_layernorm.weight", "model.norm.weight"),
            VocabParallel("output_layer.weight", "lm_head.weight"),
        ]


def mla_rope_config(cfg: Any) -> dict[str, Any]:
    """MLA's rotary fields for the HF rope parameters: plain rope, or YaRN with DeepSeek's mscale."""
    params, name = rope_parameters(cfg), type(cfg).__name__
    rope_type = params.get("rope_type", params.get("type", "default"))
    base = {"rotary_base": params.get("rope_theta", 10000.0)}
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{name} with partial_rotary_factor={params['partial_rotary_factor']} is not "
                         "supported: multi-latent attention rotates all qk_rope_head_dim dims. Remove "
                         "partial_rotary_factor.")
    if rope_type == "default":
        return {**base, "rope_type": "rope"}
    if rope_type != "yarn":
        raise ValueError(f"{name} with rope_type={rope_type!r} is not supported: Megatron's multi-latent "
                         "attention has plain rope and YaRN only. Supported rope types: ['default', 'yarn'].")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    refused = [
        ("attention_factor", params.get("attention_factor") is not None,
         "Megatron derives it from mscale and mscale_all_dim"),
        ("truncate=False", params.get("truncate", True) is False, "Megatron rounds the correction range"),
        ("mscale_all_dim without mscale", bool(mscale_all_dim) and not mscale,
         "HF then scales cos/sin by mscale(factor) alone, Megatron by mscale(factor) / mscale(factor, "
         "mscale_all_dim)"),
    ]
    for setting, present, why in refused:
        if present:
            raise ValueError(f"{name} with YaRN {setting} is not supported: {why}. Use DeepSeek-V3's YaRN "
                             "parameters (factor, mscale, mscale_all_dim, beta_fast, beta_slow, "
                             "original_max_position_embeddings).")
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or cfg.max_position_embeddings / original  # HF's own fallback
    # HF: cos/sin x mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set (else
    # x mscale(factor, 1)); softmax scale x mscale(factor, mscale_all_dim)**2 when that is set.
    both = bool(mscale) and bool(mscale_all_dim)
    return {
        **base,
        "rope_type": "yarn",
        "rotary_scaling_factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": params.get("beta_fast") or 32,
        "beta_slow": params.get("beta_slow") or 1,
        "mscale": mscale if both else 1.0,
        "mscale_all_dim": mscale_all_dim if both else 0.0,
    }
