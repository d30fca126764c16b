"""Qwen3-MoE: Qwen3's attention (q/k norm per head) with a sparse mixture-of-experts MLP.

The router (``mlp.gate``) takes a softmax over all experts and keeps the top k; it renormalises
them iff ``norm_topk_prob``. Megatron's router matches both: softmax before the top-k without
renormalisation (``moe_router_pre_softmax=True``), or after it, which renormalises. Experts are
gated MLPs of ``moe_intermediate_size``.

Not supported, refused by name: dense MLP layers among the sparse ones (``decoder_sparse_step``
other than 1, non-empty ``mlp_only_layers``), and top-1 routing with ``norm_topk_prob=True``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from lightning_bridge.conversion.mappings import WeightMapping
from lightning_bridge.families.mixtral import MOE_CONFIG, moe_mappings, refuse_top1_renormalised
from lightning_bridge.families.qwen3 import Qwen3Bridge
from lightning_bridge.families.registry import register


@register
class Qwen3MoeBridge(Qwen3Bridge):
    architectures = ("Qwen3MoeForCausalLM",)
    config_fields: ClassVar[dict[str, str]] = {
        **Qwen3Bridge.config_fields,
        "num_moe_experts": "num_experts",
        "moe_router_topk": "num_experts_per_tok",
        "ffn_hidden_size": "moe_intermediate_size",  # every layer is sparse: no dense FFN
        "moe_ffn_hidden_size": "moe_intermediate_size",
        "moe_aux_loss_coeff": "router_aux_loss_coef",
    }
    fixed_config: ClassVar[dict[str, Any]] = {**Qwen3Bridge.fixed_config, **MOE_CONFIG}

    def check_supported(self) -> None:
        super().check_supported()
        cfg = self.hf_config
        step = getattr(cfg, "decoder_sparse_step", 1)
        dense_layers = list(getattr(cfg, "mlp_only_layers", None) or [])
        if step != 1 or dense_layers:
            raise ValueError(
                f"Qwen3MoeConfig with decoder_sparse_step={step} and mlp_only_layers={dense_layers} is not "
                "supported: only models whose every layer is sparse (decoder_sparse_step=1, "
                "mlp_only_layers=[]) convert."
            )
        refuse_top1_renormalised(cfg, renormalise=bool(cfg.norm_topk_prob))

    def computed_config(self) -> dict[str, Any]:
        return {**super().computed_config(), "moe_router_pre_softmax": not self.hf_config.norm_topk_prob}

    def mappings(self) -> list[WeightMapping]:
        dense = [m for m in super().mappings() if ".mlp." not in m.megatron]
        return dense + moe_mappings("mlp", "gate_proj", "up_proj", "down_proj")
