"""Tiny random checkpoints of real architectures, built locally with transformers (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

BASE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama3.1": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})),
    "llama3.2": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "llama-mha": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(num_key_value_heads=4)),
    "llama-mqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(num_key_value_heads=1)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=5)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=24)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(tie_word_embeddings=True)),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(
        pad_token_id=0, sliding_window=5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, {}),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(
        head_dim=24, tie_word_embeddings=True)),
    # larger weights (initializer_range) so soft-capping and the sliding window (4 < 16 tokens) matter
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(
        head_dim=24, query_pre_attn_scalar=32, sliding_window=4, initializer_range=0.2,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, tie_word_embeddings=True)),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        head_dim=24, query_pre_attn_scalar=32, sliding_window=4, initializer_range=0.2,
        num_hidden_layers=4, sliding_window_pattern=3,  # sliding, sliding, full, sliding
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    "phi2": (transformers.PhiConfig, transformers.PhiForCausalLM, dict(  # 16 * 0.4 = 6.4: 6 rotary dims
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4})),
    # MoE: 4 experts, top-2, expert FFN 32 (Qwen3-MoE renormalises the top-k weights iff norm_topk_prob)
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)),
    "qwen3-moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=24)),
    # GLM-4.5: a dense first layer, then 4 sigmoid-routed experts in 2 groups (the best group's top 2)
    # scaled by 2.5, a shared expert; half-rotary heads with q/k norm and q/k/v biases
    "glm4-moe": (transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM, dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, use_qk_norm=True,
        attention_bias=True, num_hidden_layers=4)),
    # DeepSeek-V3: multi-latent attention (q and kv compressed to 48 and 32, rotary on 8 of each head's
    # 24 q/k dims, v heads of 16) with YaRN and DeepSeek's mscale; GLM-4.5's MoE after a dense layer
    "deepseek-v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
        num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        num_hidden_layers=4, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
            "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})),
    # DeepSeek-V3 without q compression (one q_proj, as DeepSeek-V2-Lite) and with plain rope
    "deepseek-v3-q": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        n_shared_experts=2, first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=1.5,
        num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


def make_hf_config(family: str, **overrides) -> transformers.PretrainedConfig:
    config_cls, _, extra = FAMILIES[family]
    return config_cls(**{**BASE, **extra, **overrides})


def make_checkpoint(family: str, folder: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    max_shard_size: str | None = None, **overrides) -> Path:
    """Save a tiny random ``family`` model to ``folder``; biases and norms made non-trivial."""
    torch.manual_seed(seed)
    config = make_hf_config(family, **overrides)
    _, model_cls, _ = FAMILIES[family]
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("bias"):  # .ln_: GPT-2's norms
                param.add_(torch.randn_like(param) * 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("correction_bias"):  # MoE routers' expert bias (a stored buffer)
                buffer.add_(torch.randn_like(buffer) * 0.01)  # small: routing still follows the tokens
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return Path(folder)


def every_dtype_tensors() -> dict[str, torch.Tensor]:
    """One small tensor of each dtype and shape kind a checkpoint reader must handle bitwise."""
    generator = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(33, 17, generator=generator).to(torch.bfloat16),
        "f32": torch.randn(5, 7, 3, generator=generator),
        "f16": torch.randn(1000, generator=generator).half(),
        "i64": torch.arange(-50, 50, dtype=torch.int64),
        "bool": torch.rand(9, generator=generator) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "f8": torch.randn(64, generator=generator).to(torch.float8_e4m3fn),
    }
