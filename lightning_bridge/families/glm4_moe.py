"""GLM-4.5 MoE: Llama's attention with partial rotary, optional q/k norm and q/k/v biases, and a
mixture of experts with a shared expert after ``first_k_dense_replace`` dense layers.

- partial rotary: the first ``partial_rotary_factor`` of each head's dims rotate (HF's
  ``rotate_half`` on them), Megatron's ``rotary_percent``;
- ``use_qk_norm``: RMSNorm per query and key head before the rotary embedding (``qk_layernorm``);
- ``attention_bias``: biases on q, k and v, none on the output projection (``add_qkv_bias``);
- the router (``mlp.gate``) scores experts with a sigmoid, picks the top k of score +
  ``e_score_correction_bias`` (Megatron's ``expert_bias`` buffer), optionally within the best
  ``topk_group`` of ``n_group`` expert groups (a group's score is the sum of its two best), takes
  the picked experts' plain scores, renormalises them and multiplies them by
  ``routed_scaling_factor``: Megatron's sigmoid top-k router with the same settings, the router in
  float32 as HF keeps it;
- the shared expert (``mlp.shared_experts``, ``n_shared_experts`` x ``moe_intermediate_size``) is
  added to the routed experts' output: Megatron's shared expert, ungated;
- layers below ``first_k_dense_replace`` are dense gated MLPs of ``intermediate_size``
  (``moe_layer_freq`` as a pattern).

Training: Megatron updates the expert bias from the token counts (DeepSeek's auxiliary-loss-free
balancing, ``moe_router_bias_update_rate``); HF's config has no auxiliary loss, so none is added
(``moe_router_load_balancing_type="none"``). Multi-token-prediction layers (``num_nextn_predict_layers``,
stored as layers after ``num_hidden_layers``) are not converted: import skips them and export
writes none.

Not supported, refused by name: ``norm_topk_prob=False`` and top-1 routing (Megatron renormalises
sigmoid scores iff k > 1), group-limited routing with ``num_experts_per_tok // topk_group`` other
than 2 (Megatron sums that many best scores of a group, HF two), ``n_shared_experts=0``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from lightning_bridge.conversion.mappings import QKV, GatedMLP, Replicated, RowParallel, WeightMapping
from lightning_bridge.families.base import ModelBridge, rope_parameters
from lightning_bridge.families.llama import LlamaBridge
from lightning_bridge.families.mixtral import MOE_CONFIG, moe_mappings, refuse_top1_renormalised
from lightning_bridge.families.registry import register

logger = logging.getLogger(__name__)

SIGMOID_ROUTER: dict[str, Any] = {
    **MOE_CONFIG,
    "moe_router_score_function": "sigmoid",
    "moe_router_enable_expert_bias": True,
    "moe_router_dtype": "fp32",  # HF routes in float32 (its gate and correction bias stay float32)
    "moe_router_load_balancing_type": "none",
}


@register
class Glm4MoeBridge(LlamaBridge):
    architectures = ("Glm4MoeForCausalLM",)
    config_fields: ClassVar[dict[str, str]] = {
        **LlamaBridge.config_fields,
        "num_moe_experts": "n_routed_experts",
        "moe_router_topk": "num_experts_per_tok",
        "moe_ffn_hidden_size": "moe_intermediate_size",
    }
    fixed_config: ClassVar[dict[str, Any]] = {**LlamaBridge.fixed_config, **SIGMOID_ROUTER}

    @property
    def ignored_hf_patterns(self) -> tuple[str, ...]:
        """The multi-token-prediction layers, numbered after the model's own."""
        cfg = self.hf_config
        mtp = range(cfg.num_hidden_layers, cfg.num_hidden_layers + (mtp_layers(cfg) or 0))
        return (*ModelBridge.ignored_hf_patterns, *(f"model.layers.{i}.*" for i in mtp))

    def check_supported(self) -> None:
        check_sigmoid_routing(self.hf_config)

    def computed_config(self) -> dict[str, Any]:
        cfg = self.hf_config
        params = rope_parameters(cfg)
        return {
            **super().computed_config(),
            **sigmoid_moe_config(cfg),
            "rotary_percent": params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)),
            "qk_layernorm": bool(cfg.use_qk_norm),
            "add_qkv_bias": bool(cfg.attention_bias),
        }

    def mappings(self) -> list[WeightMapping]:
        cfg = self.hf_config
        attention = [m for m in super().mappings() if ".mlp." not in m.megatron]
        table = attention + sigmoid_moe_mappings(cfg)
        if cfg.attention_bias:
            table.append(QKV("decoder.layers.*.self_attention.linear_qkv.bias", (
                "model.layers.*.self_attn.q_proj.bias",
                "model.layers.*.self_attn.k_proj.bias",
                "model.layers.*.self_attn.v_proj.bias",
            )))
        if cfg.use_qk_norm:
            table += [Replicated(f"decoder.layers.*.self_attention.{x}_layernorm.weight",
                                 f"model.layers.*.self_attn.{x}_norm.weight") for x in "qk"]
        return table


# --- DeepSeek's mixture of experts, shared by GLM-4.5 MoE and DeepSeek-V3 --------------------------
def check_sigmoid_routing(cfg: Any) -> None:
    """Refuse, by name, the DeepSeek-style routing settings Megatron's router cannot reproduce."""
    name = type(cfg).__name__
    if not cfg.norm_topk_prob:
        raise ValueError(f"{name} with norm_topk_prob=False is not supported: Megatron's sigmoid router "
                         "always renormalises the top-k scores. Use norm_topk_prob=True.")
    refuse_top1_renormalised(cfg, renormalise=True)
    if cfg.n_group > 1 and cfg.num_experts_per_tok // cfg.topk_group != 2:
        raise ValueError(
            f"{name} with n_group={cfg.n_group}, topk_group={cfg.topk_group} and num_experts_per_tok="
            f"{cfg.num_experts_per_tok} is not supported: HF scores a group by its two best experts, "
            "Megatron by its num_experts_per_tok // topk_group best. Use n_group=1, or "
            "num_experts_per_tok = 2 x topk_group.")
    if not cfg.n_shared_experts:
        raise ValueError(f"{name} with n_shared_experts=0 is not supported: every MoE layer of this family "
                         "has a shared expert. Use n_shared_experts >= 1.")
    if mtp_layers(cfg):
        logger.info("%s: the %d multi-token-prediction layer(s) are not converted (import skips them, "
                    "export writes none).", name, mtp_layers(cfg))


def sigmoid_moe_config(cfg: Any) -> dict[str, Any]:
    """Provider fields of the MoE: dense first layers, the shared expert, scaled grouped routing."""
    return {
        "moe_layer_freq": [int(i >= cfg.first_k_dense_replace) for i in range(cfg.num_hidden_layers)],
        "moe_shared_expert_intermediate_size": cfg.moe_intermediate_size * cfg.n_shared_experts,
        "moe_router_topk_scaling_factor": cfg.routed_scaling_factor,
        "moe_router_num_groups": cfg.n_group if cfg.n_group > 1 else None,
        "moe_router_group_topk": cfg.topk_group if cfg.n_group > 1 else None,
    }


def sigmoid_moe_mappings(cfg: Any) -> list[WeightMapping]:
    """The MLP tables: a dense gated MLP below ``first_k_dense_replace``, routed and shared experts above."""
    dense_layers = frozenset(range(min(cfg.first_k_dense_replace, cfg.num_hidden_layers)))
    moe_layers = frozenset(range(cfg.num_hidden_layers)) - dense_layers
    dense = [
        GatedMLP("decoder.layers.*.mlp.linear_fc1.weight", (
            "model.layers.*.mlp.gate_proj.weight",
            "model.layers.*.mlp.up_proj.weight",
        ), layers=dense_layers),
        RowParallel("decoder.layers.*.mlp.linear_fc2.weight", "model.layers.*.mlp.down_proj.weight",
                    layers=dense_layers),
    ]
    shared = "model.layers.*.mlp.shared_experts"
    sparse = [
        *moe_mappings("mlp", "gate_proj", "up_proj", "down_proj"),
        Replicated("decoder.layers.*.mlp.router.expert_bias",
                   "model.layers.*.mlp.gate.e_score_correction_bias"),
        GatedMLP("decoder.layers.*.mlp.shared_experts.linear_fc1.weight",
                 (f"{shared}.gate_proj.weight", f"{shared}.up_proj.weight")),
        RowParallel("decoder.layers.*.mlp.shared_experts.linear_fc2.weight",
                    f"{shared}.down_proj.weight"),
    ]
    return dense + [type(m)(m.megatron, m.hf, layers=moe_layers) for m in sparse]


def mtp_layers(hf_config: Any) -> int:
    """How many multi-token-prediction layers the checkpoint may hold after the model's layers."""
    return int(getattr(hf_config, "num_nextn_predict_layers", 0) or 0)
