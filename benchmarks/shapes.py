"""Model shapes the benchmarks use, and random HF checkpoints of them written locally."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import transformers

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=True),
    "llama-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False),
    # Llama-3-8B layers, 12 of them: fits one GPU with Adam beside transformers' fp32 copy
    "llama3-8b-12l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=12, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                          rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                          tie_word_embeddings=False),
    # Mixtral-like MoE: 8 experts of FFN 4096, top-2
    "mixtral-moe": dict(hidden_size=2048, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=8192, num_local_experts=8,
                        num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                        tie_word_embeddings=False),
    # Qwen3-30B-A3B-like MoE, 8 of its layers: 64 fine-grained experts of FFN 768, top-8, qk-norm
    "qwen3-moe": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=8,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                      max_position_embeddings=8192, num_experts=64, num_experts_per_tok=8, norm_topk_prob=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False),
    "tiny-moe": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, num_local_experts=4,
                     num_experts_per_tok=2, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False),
}


def llama_config(shapes: str, dtype: torch.dtype = torch.bfloat16) -> transformers.PretrainedConfig:
    """The HF config of ``shapes``: Llama, Mixtral (``num_local_experts``) or Qwen3-MoE (``num_experts``)."""
    fields = SHAPES[shapes]
    config_cls = (transformers.MixtralConfig if "num_local_experts" in fields
                  else transformers.Qwen3MoeConfig if "num_experts" in fields else transformers.LlamaConfig)
    config = config_cls(**fields)
    config.dtype = dtype
    return config


def random_checkpoint(shapes: str, folder: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write (once) a random-weight HF checkpoint of ``shapes``; built on the GPU when there is one.

    The model is built in ``dtype`` directly (not in float32 then cast), so a CPU needs about the
    checkpoint's size in memory, not three times it.
    """
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(llama_config(shapes, dtype), dtype=dtype)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    os.rename(tmp, folder)
    print(f"wrote random {shapes} checkpoint to {folder} in {time.perf_counter() - start:.1f} s", flush=True)
    return folder
